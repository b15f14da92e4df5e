"""Shared plumbing of the HieraVid Triton kernels: Triton import, backend choice, kernel builds.

Backend choice (every dispatch takes ``backend=``):

* ``"auto"`` (default; the environment variable ``HIERAVID_KERNELS_BACKEND`` overrides the
  default): the Triton kernel when Triton is importable and every input tensor is on a CUDA
  device, otherwise the pure-PyTorch reference in :mod:`hieravid_vllm.core`.
* ``"triton"``: always the Triton kernel. CUDA tensors run the compiled kernel; CPU tensors run
  it under Triton's interpreter (what the CPU test suite does).
* ``"torch"``: always the reference.

The interpreter needs ``TRITON_INTERPRET=1`` in the environment *when triton is first imported*:
Triton's standard library (``tl.max``, ``tl.sum``, ``tl.cumsum``, ...) is decorated at import and
only the interpreted form can run on CPU tensors. Our own kernels are plain functions built per
device on first use (``triton.jit`` for CUDA, ``InterpretedFunction`` for CPU), so they do not
care in which order things were imported; :func:`interpreter_ready` tells whether the standard
library is usable on CPU in this process.
"""
import contextlib
import os
import types
from typing import Callable, Dict, Tuple

import torch

try:  # Triton is optional: without it every dispatch uses the reference
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # lets kernel signatures be defined
    HAS_TRITON = False


if HAS_TRITON:
    class _HelperFunction(triton.runtime.JITFunction):
        """A ``triton.jit`` device function that an interpreted kernel can call too: Triton's
        code generator inlines / calls it as any JITFunction (it never uses ``__call__``); under
        the interpreter the kernel body is plain Python and ``__call__`` runs the function."""

        def __call__(self, *args, **kwargs):
            return self.fn(*args, **kwargs)


def jit_helper(fn: Callable):
    """``triton.jit`` for device functions called from our kernels (shared steps of the greedy
    MAP kernels, scan / reduce combine functions), usable from compiled and interpreted
    kernels alike (the interpreter calls ``.fn`` of a combine function)."""
    return _HelperFunction(fn) if HAS_TRITON else fn

__all__ = ["HAS_TRITON", "triton", "tl", "jit_helper", "interpreter_ready", "use_triton", "build",
           "poisoned_outputs", "empty", "next_pow2", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_ENV_BACKEND = "HIERAVID_KERNELS_BACKEND"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def interpreter_ready() -> bool:
    """True when Triton kernels can run on CPU tensors in this process (interpreter)."""
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(tl.max, InterpretedFunction)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for these inputs: True = Triton kernel, False = reference."""
    if backend is None or backend == "auto":
        backend = os.environ.get(_ENV_BACKEND, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not importable")
    if not on_cuda and not interpreter_ready():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported in this process (see kernels/_utils.py)")
    return True


_BUILT: Dict[Tuple[Callable, bool], object] = {}


class _Interpreted:
    """``kernel[grid](...)`` under the interpreter, with TRITON_INTERPRET=1 set for the call
    (parts of Triton's interpreter check it while running)."""

    def __init__(self, fn: Callable) -> None:
        from triton.runtime.interpreter import InterpretedFunction
        self.kernel = InterpretedFunction(fn)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            old = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                return launch(*args, **kwargs)
            finally:
                if old is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = old
        return run


def build(fn: Callable, device: torch.device):
    """The launchable kernel for ``fn`` on ``device``: compiled (CUDA) or interpreted (CPU)."""
    interpret = torch.device(device).type == "cpu"
    key = (fn, interpret)
    k = _BUILT.get(key)
    if k is None:
        k = _Interpreted(fn) if interpret else triton.jit(fn)
        _BUILT[key] = k
    return k


# ------------------------------------------------------------------------------------------
# output allocation (tests poison every output and scratch buffer to catch unwritten elements)
# ------------------------------------------------------------------------------------------
_POISON = [False]
POISON_INT = -7777  # distinct from -1 (the legitimate padding of selections)


@contextlib.contextmanager
def poisoned_outputs():
    """Within this context every buffer a Triton launch writes (outputs and scratch) starts
    filled with NaN (floats) / ``POISON_INT`` (integers) instead of being left uninitialised."""
    old = _POISON[0]
    _POISON[0] = True
    try:
        yield
    finally:
        _POISON[0] = old


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if not _POISON[0]:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON_INT, dtype=dtype, device=device)
