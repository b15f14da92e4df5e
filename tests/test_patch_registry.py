"""The patch registry (:mod:`hieravid_vllm.patches`) against the installed vLLM, in process.

* every registered patch's targets exist in this vLLM and, after ``apply_all``, carry the
  one HieraVid marker (the worker patches once vLLM imported their runner module);
* ``apply_all`` twice wraps once: the wrapper's ``__wrapped__`` is vLLM's original;
* a function other vLLM modules imported by name (``block_pool``'s copy of the block
  hasher) is patched there too;
* the registry lists each patch (and each target) once, and its docstring names them all;
* a patch whose target is missing is left out with a warning and makes :func:`require`
  fail with an error naming it.
"""
from __future__ import annotations

import importlib
import logging

import pytest

from hieravid_vllm import patches
from hieravid_vllm.patches import PATCHES, Patch


@pytest.fixture(scope="module")
def applied():
    patches.apply_all()
    patches.apply_all()
    for p in PATCHES:  # what a worker imports: the lazy patches apply on import
        if p.lazy:
            importlib.import_module(p.module)
    return PATCHES


def _targets(p: Patch):
    module = importlib.import_module(p.module)
    return [(t, patches.resolve(module, t)) for t in p.targets]


def test_every_target_exists_and_is_wrapped(applied):
    assert patches.missing() == {}
    patches.require()  # nothing missing: HieraVid could be enabled
    for p in applied:
        for t, obj in _targets(p):
            if p.apply is None:  # applied per instance by the HieraVid scheduler
                assert not patches.is_wrapped(obj), (p.name, t)
            else:
                assert patches.is_wrapped(obj), f"{p.name}: {p.module}.{t} not wrapped"


def test_apply_all_twice_wraps_once(applied):
    patches.apply_all()
    for p in applied:
        if p.apply is None:
            continue
        for t, obj in _targets(p):
            fn = getattr(obj, "__func__", obj)
            assert not patches.is_wrapped(fn.__wrapped__), f"{p.name}: {t} wrapped twice"
            assert getattr(fn.__wrapped__, "__qualname__", "").endswith(t.split(".")[-1])


def test_by_name_copies_are_patched(applied):
    from vllm.v1.core import block_pool, kv_cache_utils

    assert block_pool.generate_block_hash_extra_keys is \
        kv_cache_utils.generate_block_hash_extra_keys
    assert patches.is_wrapped(block_pool.generate_block_hash_extra_keys)
    entry = next(p for p in PATCHES if p.name == "block_hasher")
    assert entry.by_name == ("vllm.v1.core.block_pool",)


def test_registry_lists_each_patch_once():
    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names))
    targets = [(p.module, t) for p in PATCHES for t in p.targets]
    dup = {x for x in targets if targets.count(x) > 1}
    assert not dup, dup
    assert {p.process for p in PATCHES} == {"api_server", "engine_core", "worker"}
    doc = patches.__doc__
    for p in PATCHES:
        assert f"``{p.name}``" in doc, p.name
        for t in p.targets:
            assert t.split(".")[-1] in doc, (p.name, t)


def test_missing_target_is_an_error_naming_the_patch(monkeypatch, caplog):
    fake = Patch("fake_patch", "engine_core", "vllm.v1.core.kv_cache_utils",
                 ("NoSuchClass.no_such_method",), lambda module: None)
    monkeypatch.setattr(patches, "PATCHES", PATCHES + (fake,))
    monkeypatch.setattr(patches, "_missing", {})
    with caplog.at_level(logging.WARNING, logger="vllm.hieravid_vllm"):
        patches.apply_all()  # HieraVid off: a warning, start-up goes on
    assert "fake_patch" in caplog.text and "NoSuchClass" in caplog.text
    assert set(patches.missing()) == {"fake_patch"}
    with pytest.raises(RuntimeError, match="patch 'fake_patch'.*NoSuchClass.no_such_method"):
        patches.require()
    with pytest.raises(RuntimeError, match="fake_patch"):
        patches.require("engine_core")
    patches.require("worker")  # other processes' patches are all there


def test_missing_target_stops_a_hieravid_engine_config(monkeypatch):
    """With HieraVid options, ``create_engine_config`` refuses to start, naming the patch."""
    from vllm.engine.arg_utils import EngineArgs

    from hieravid_vllm.testing.models import build_tiny_model

    patches.apply_all()
    monkeypatch.setattr(patches, "_missing", {"fake_patch": "vLLM has no x.y"})
    args = EngineArgs(model=str(build_tiny_model("qwen2_5_vl")),
                      additional_config={"hieravid": {"budget": 0.3}})
    with pytest.raises(RuntimeError, match="fake_patch"):
        args.create_engine_config()
