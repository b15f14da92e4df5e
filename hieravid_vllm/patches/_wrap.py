"""The one way HieraVid replaces a vLLM function: :func:`wrap` (and :func:`wrap_instance`).

Every replacement carries one marker attribute (:data:`MARK`) and keeps the original as
``__wrapped__`` (``functools.wraps``), so applying a patch twice wraps once and tests can
check what is patched. ``staticmethod`` / ``classmethod`` descriptors are kept as they were.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Any, Callable, Iterable, Optional

#: the marker attribute of every HieraVid wrapper
MARK = "_hieravid_patched"


def is_wrapped(fn: Any) -> bool:
    """True for a HieraVid wrapper (also through a ``staticmethod`` / ``classmethod``)."""
    return bool(getattr(getattr(fn, "__func__", fn), MARK, False))


def _unwrap_descriptor(raw: Any):
    if isinstance(raw, staticmethod):
        return raw.__func__, staticmethod
    if isinstance(raw, classmethod):
        return raw.__func__, classmethod
    return raw, None


def wrap(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable], *,
         by_name_in: Iterable[str] = ()) -> Callable:
    """Replace ``owner.name`` (a class or a module attribute) by ``make_wrapper(orig)``.

    Idempotent: an attribute that already is a HieraVid wrapper (on ``owner`` or, for a
    class, inherited from a base) is left alone and returned. ``orig`` is the plain function
    (the ``__func__`` of a static/class method; the descriptor type is restored). The
    wrapper gets ``functools.wraps(orig)`` (``__wrapped__`` = ``orig``) and :data:`MARK`.
    ``by_name_in``: modules that imported the same function object by name
    (``from ... import f``); each one whose attribute still *is* ``orig`` gets the wrapper
    too (the module is imported). Raises ``AttributeError`` when the target is missing.
    """
    raw = inspect.getattr_static(owner, name)  # AttributeError names the missing target
    orig, descriptor = _unwrap_descriptor(raw)
    if is_wrapped(orig):
        return orig
    wrapper = functools.wraps(orig)(make_wrapper(orig))
    setattr(wrapper, MARK, True)
    setattr(owner, name, descriptor(wrapper) if descriptor is not None else wrapper)
    for mod_name in by_name_in:
        mod = sys.modules.get(mod_name) or importlib.import_module(mod_name)
        if getattr(mod, name, None) is orig:
            setattr(mod, name, wrapper)
    return wrapper


def wrap_instance(obj: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> \
        Optional[Callable]:
    """Like :func:`wrap` for one object: ``obj.name`` (a bound method) is replaced on the
    instance only; ``make_wrapper`` gets the bound original."""
    orig = getattr(obj, name)
    if is_wrapped(orig):
        return orig
    wrapper = functools.wraps(orig)(make_wrapper(orig))
    setattr(wrapper, MARK, True)
    setattr(obj, name, wrapper)
    return wrapper
