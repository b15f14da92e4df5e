"""The patch registry (:mod:`hieravid_vllm.patches`) against the installed vLLM, in process.

* every registered patch's targets exist in this vLLM and, after ``apply_all``, carry the
  one HieraVid marker (the worker patches once vLLM imported their runner module);
* ``apply_all`` twice wraps once: the wrapper's ``__wrapped__`` is vLLM's original;
* a function other vLLM modules imported by name (``block_pool``'s copy of the block
  hasher) is patched there too;
* the registry lists each patch (and each target) once per supported vLLM version, and its
  docstring names them all;
* per version: each supported version gets one variant of every patch, an unsupported one only
  the ``always`` patches; where a patch has variants, the other version's variant does not
  fit this vLLM (so the variant really is needed); on 0.33 the HieraVid models declare their
  KV cache grouping through vLLM's ``SupportsKVCacheGrouping``;
* a patch whose target is missing is left out with a warning and makes :func:`require`
  fail with an error naming it.
"""
from __future__ import annotations

import importlib
import logging

import pytest

from hieravid_vllm import patches
from hieravid_vllm.engine_setup import SUPPORTED_VLLM, vllm_version
from hieravid_vllm.patches import PATCHES, Patch

pytestmark = pytest.mark.vllm033  # also run on vLLM 0.33 (make test)


@pytest.fixture(scope="module")
def applied():
    patches.apply_all()
    patches.apply_all()
    for p in patches.active():  # what a worker imports: the lazy patches apply on import
        if p.lazy:
            importlib.import_module(p.module)
    return patches.active()


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


@pytest.mark.parametrize("version", [s + "0" for s in SUPPORTED_VLLM])
def test_registry_lists_each_patch_once(version):
    registry = patches.active(version)
    names = [p.name for p in registry]
    assert len(names) == len(set(names))
    assert set(names) == {p.name for p in PATCHES}  # a variant of every patch
    assert all(p.for_version(version) for p in registry)
    targets = [(p.module, t) for p in registry for t in p.targets]
    dup = {x for x in targets if targets.count(x) > 1}
    assert not dup, dup
    assert {p.process for p in registry} == {"api_server", "engine_core", "worker"}
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


def test_unsupported_version_gets_only_the_always_patches():
    assert patches.active("0.31.2") == tuple(p for p in PATCHES if p.always)
    assert patches.active("0.34.0") == tuple(p for p in PATCHES if p.always)
    assert {p.name for p in patches.active("0.34.0")} == {"cli_args", "engine_config"}


def test_other_versions_variants_do_not_fit_this_vllm():
    """Each patch with per-version variants: the installed vLLM's variant resolves (above),
    every other variant misses a module or target here."""
    here = vllm_version()
    assert here.startswith(SUPPORTED_VLLM)
    others = [p for p in PATCHES if not p.for_version(here)]
    assert others, "no per-version variants"
    for p in others:
        assert any(p.name == q.name for q in patches.active()), p.name
        try:
            module = importlib.import_module(p.module)
        except ImportError:
            continue
        missing = []
        for t in p.targets:
            try:
                patches.resolve(module, t)
            except AttributeError:
                missing.append(t)
        assert missing, f"{p.name} ({p.versions}) fits vLLM {here} too"


def test_models_declare_kv_cache_grouping_on_033():
    """vLLM 0.33: the HieraVid model classes implement ``SupportsKVCacheGrouping`` (vLLM's
    registry reports it), so the default config builder asks them for the groups."""
    if not vllm_version().startswith("0.33."):
        pytest.skip("SupportsKVCacheGrouping is vLLM 0.33's")
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_kv_cache_grouping

    from hieravid_vllm.models import HIERAVID_ARCHITECTURES
    from hieravid_vllm.plugin import register

    register()
    for name, path in HIERAVID_ARCHITECTURES.values():
        module, cls = path.split(":")
        assert supports_kv_cache_grouping(getattr(importlib.import_module(module), cls)), name
        info = ModelRegistry._try_inspect_model_cls(name)
        assert info is not None and info.supports_kv_cache_grouping, name


def test_unknown_vllm_version_is_refused_at_start_up(monkeypatch):
    """With HieraVid options, a vLLM outside :data:`SUPPORTED_VLLM` stops
    ``create_engine_config`` with an error naming the installed and the supported versions."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from hieravid_vllm.testing.models import build_tiny_model

    patches.apply_all()
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    args = EngineArgs(model=str(build_tiny_model("qwen2_5_vl")),
                      additional_config={"hieravid": {"budget": 0.3}})
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x, 0\.33\.x but vLLM 0\.34\.0"):
        args.create_engine_config()
