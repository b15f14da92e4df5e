"""The decisions HieraVid makes about vLLM's configuration and workers (no patching).

The vLLM patches that call these live in :mod:`hieravid_vllm.patches`:

* :func:`check_vllm_version`: HieraVid options on a vLLM the patches were not written for
  stop start-up;
* :class:`HieraVidHfOverrides`: the ``hf_overrides`` step that swaps the architecture for
  its HieraVid variant and writes the options into the HF config;
* :func:`select_v1_runner`, :func:`configure_stages`, :func:`stages_unsupported_reason`:
  what ``EngineArgs.create_engine_config`` changes when HieraVid is on;
* :func:`prompt_needs`: what the input-processor check counts for a full-mode prompt;
* :func:`stage_kv_groups`: one KV cache group per stage (engine core), given to vLLM by the
  ``kv_cache_groups`` patch (0.32) or the models' :class:`StageKVCacheGroupingMixin` (0.33);
* :func:`check_worker_setup`: the worker start-up guard after ``load_model``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from hieravid_vllm import options as hv_options

logger = logging.getLogger("vllm.hieravid_vllm")

#: vLLM versions these patches are written for (major.minor prefixes); the patch registry
#: (:mod:`hieravid_vllm.patches`) picks each patch's variant for the installed one.
SUPPORTED_VLLM = ("0.32.", "0.33.")


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version() -> None:
    """Fail with a clear message on a vLLM version the patches were not written for."""
    v = vllm_version()
    if not v.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"hieravid-vllm supports vLLM {', '.join(s + 'x' for s in SUPPORTED_VLLM)} but vLLM "
            f"{v} is installed; install a supported vLLM (pip install 'hieravid-vllm[gpu]') or "
            f"start without --hieravid-budget / --hieravid-config")



class HieraVidHfOverrides:
    """``hf_overrides`` callable (picklable: it travels to the engine processes).

    Applies the user's own ``hf_overrides`` first, then swaps the architecture for its
    HieraVid variant and stores the options as ``hf_config.hieravid``.
    """

    def __init__(self, options: dict, user: Any = None):
        self.options = options
        self.user = user

    def __call__(self, hf_config):
        from hieravid_vllm.models import HIERAVID_ARCHITECTURES

        user = self.user
        if callable(user):
            hf_config = user(hf_config)
        elif user:
            for k, v in user.items():
                setattr(hf_config, k, v)
        archs = list(getattr(hf_config, "architectures", None) or [])
        names = {v[0] for v in HIERAVID_ARCHITECTURES.values()}
        if not any(a in HIERAVID_ARCHITECTURES or a in names for a in archs):
            if not any(archs):  # vLLM also calls this on a blank probe config
                return hf_config
            raise ValueError(
                f"--hieravid-budget: HieraVid supports {sorted(HIERAVID_ARCHITECTURES)}; this "
                f"checkpoint's architecture is {archs}")
        hf_config.architectures = [HIERAVID_ARCHITECTURES[a][0] if a in HIERAVID_ARCHITECTURES
                                   else a for a in archs]
        setattr(hf_config, hv_options.CONFIG_KEY, dict(self.options))
        return hf_config

    def __repr__(self) -> str:  # shows up in vLLM's config log line
        return f"HieraVidHfOverrides({self.options})"


#: the V1 model runners HieraVid hooks (module -> class)
RUNNER_MODULES = {
    "vllm.v1.worker.gpu_model_runner": "GPUModelRunner",
    "vllm.v1.worker.cpu_model_runner": "CPUModelRunner",
}


#: attention backends whose metadata builders the in-LLM stages feed (full mode). Run through
#: a real engine on CPU: CPU_ATTN, FLEX_ATTENTION, TRITON_ATTN (tests/test_stages_backends.py);
#: FLASH_ATTN's builder run on CPU, FLASHINFER's inputs checked (tests/test_stages_builders.py);
#: none run on a GPU here yet
STAGE_ATTENTION_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN",
                            "FLEX_ATTENTION")
#: backends whose builder returns independent metadata per build, so that stages sharing one
#: KV cache group (and so one builder) may be built one after another -- off CUDA only
#: (tests/test_stages_backends.py, shared-group cases); everything else needs a group per stage
SHARED_GROUP_BACKENDS = ("CPU_ATTN", "TRITON_ATTN")


def _attention_backends(model) -> set:
    from vllm.model_executor.layers.attention.attention import Attention

    return {m.attn_backend.get_name() for m in model.modules() if isinstance(m, Attention)}


def check_worker_setup(runner, model) -> None:
    """Start-up guard in every worker, after the model is loaded: HieraVid runs only with
    the runner, attention backends, CUDA-graph mode and KV layout it has hooks for; anything
    else stops start-up with a message naming the setting (never a silently wrong answer)."""
    raw = getattr(model, "hieravid_options", None)
    if raw is None:
        return
    from hieravid_vllm import patches

    patches.require("worker")  # every worker-side patch found its vLLM target
    opts = raw if isinstance(raw, hv_options.ServingOptions) else \
        hv_options.ServingOptions.from_dict(raw)
    if type(runner).__name__ not in RUNNER_MODULES.values() or \
            type(runner).__module__ not in RUNNER_MODULES:
        raise RuntimeError(f"HieraVid: model runner {type(runner).__module__}."
                           f"{type(runner).__name__} has no HieraVid hooks; set "
                           f"{V2_RUNNER_ENV}=0 (or start without --hieravid-budget)")
    try:
        record_worker_setup(runner, model, opts)
    except Exception:  # diagnostics only: never stop start-up
        logger.warning("HieraVid: could not record the worker setup", exc_info=True)
    if opts.config.mode != "full":
        return
    mode = getattr(getattr(runner, "compilation_config", None), "cudagraph_mode", None)
    if getattr(mode, "name", None) in _ATTENTION_CAPTURING_GRAPHS:
        raise RuntimeError(
            f"HieraVid full mode: CUDA graph mode {mode.name} captures the attention metadata "
            f"and would replay it for every stage; use --compilation-config "
            f"'{{\"cudagraph_mode\": \"PIECEWISE\"}}' (HieraVid's default), --enforce-eager, "
            f"or --hieravid-mode input_only")
    backends = _attention_backends(model)
    unknown = sorted(backends - set(STAGE_ATTENTION_BACKENDS))
    if unknown:
        raise RuntimeError(
            f"HieraVid full mode: attention backend {', '.join(unknown)} is not one the "
            f"in-LLM stages build metadata for ({', '.join(STAGE_ATTENTION_BACKENDS)}); pick "
            f"one with --attention-backend, or use --hieravid-mode input_only")
    from vllm.platforms import current_platform

    hf_config = runner.model_config.hf_config
    text = getattr(hf_config, "text_config", None) or hf_config
    depths = set(opts.config.layers_per_stage(int(text.num_hidden_layers)))
    shared = os.environ.get(KV_GROUPS_ENV, "1") == "0" or len(depths) != 1
    if shared and (current_platform.is_cuda_alike() or
                   not backends <= set(SHARED_GROUP_BACKENDS)):
        raise RuntimeError(
            "HieraVid full mode with one KV cache group shared by all stages (stages of "
            f"unequal depth, or {KV_GROUPS_ENV}=0) builds every stage's metadata with one "
            f"builder; attention backend(s) {', '.join(sorted(backends))} on this platform "
            "are not known to return independent metadata per build (FlashInfer plans, FA3 "
            "scheduler metadata and FlexAttention's buffers are per builder: every stage would "
            f"run with the last stage's); unset {KV_GROUPS_ENV}, use stage boundaries of equal "
            "depth, or --hieravid-mode input_only")


#: File prefix of the per-worker setup records written to $HIERAVID_DEBUG_DIR (JSON).
WORKER_DUMP_PREFIX = "worker"


def worker_setup_info(runner, model, opts) -> dict:
    """What one worker runs: runner class, attention backends of the LLM's layers, tensor
    parallel rank/size, device, dtype and the HieraVid mode/budget in effect."""
    info = {"runner": f"{type(runner).__module__}.{type(runner).__name__}",
            "attention_backends": sorted(_attention_backends(model)),
            "mode": opts.config.mode, "budget": opts.config.budget}
    try:
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        info["tp_rank"] = int(get_tensor_model_parallel_rank())
        info["tp_size"] = int(get_tensor_model_parallel_world_size())
    except Exception:  # pragma: no cover - no distributed state
        info["tp_rank"], info["tp_size"] = 0, 1
    p = next(iter(model.parameters()), None)
    info["device"] = str(p.device) if p is not None else "unknown"
    info["dtype"] = str(p.dtype).replace("torch.", "") if p is not None else "unknown"
    return info


def record_worker_setup(runner, model, opts) -> dict:
    """Log what this worker runs and, with ``HIERAVID_DEBUG_DIR`` set, write it to
    ``<dir>/worker-<pid>.json`` (read by ``python -m hieravid_vllm.selfcheck``)."""
    info = worker_setup_info(runner, model, opts)
    logger.info("HieraVid worker: runner %s, attention backend(s) %s, TP rank %s/%s, %s %s, "
                "mode %s", info["runner"], ",".join(info["attention_backends"]) or "-",
                info["tp_rank"], info["tp_size"], info["device"], info["dtype"], info["mode"])
    from hieravid_vllm.models.common import DEBUG_DIR_ENV

    debug_dir = os.environ.get(DEBUG_DIR_ENV)
    if debug_dir:
        import json
        from pathlib import Path

        path = Path(debug_dir) / f"{WORKER_DUMP_PREFIX}-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info))
    return info


#: Where vLLM's scheduler is replaced by the HieraVid one (full mode only).
SCHEDULER_CLS = "hieravid_vllm.scheduler.HieraVidScheduler"


#: CUDA-graph modes whose graphs capture the attention metadata (seq lens, query start
#: locations, slot mappings): the per-stage metadata would be ignored on replay
_ATTENTION_CAPTURING_GRAPHS = ("FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY")


def _cudagraph_reason(engine_args) -> Optional[str]:
    cc = getattr(engine_args, "compilation_config", None)
    mode = getattr(cc, "cudagraph_mode", None)
    name = getattr(mode, "name", None) or (str(mode).upper() if mode is not None else None)
    if name in _ATTENTION_CAPTURING_GRAPHS:
        return f"CUDA graphs that capture attention (--compilation-config cudagraph_mode={name})"
    if getattr(getattr(cc, "pass_config", None), "fuse_attn_quant", None):
        return "attention+quant fusion (--compilation-config pass_config.fuse_attn_quant, which " \
               "forces full CUDA graphs)"
    if getattr(cc, "use_inductor_graph_partition", None):
        return "inductor graph partitioning (--compilation-config use_inductor_graph_partition)"
    if getattr(cc, "splitting_ops", None) is not None:
        return "custom graph splitting ops (--compilation-config splitting_ops)"
    if os.environ.get("VLLM_BATCH_INVARIANT", "0").strip() not in ("", "0"):
        return "batch-invariant mode (VLLM_BATCH_INVARIANT=1)"
    return None


def stages_unsupported_reason(engine_args) -> Optional[str]:
    """Why the in-LLM stages cannot run with these engine arguments (None: they can).

    Each case remaps token rows or captures attention metadata in a way the per-stage
    compaction does not follow (module docstring of :mod:`hieravid_vllm.stages`); all of them
    work with ``mode=input_only`` (all pruning before the LLM)."""
    if int(getattr(engine_args, "pipeline_parallel_size", 1) or 1) > 1:
        return "pipeline parallelism"
    if getattr(engine_args, "speculative_config", None):
        return "speculative decoding"
    if getattr(engine_args, "data_parallel_size", 1) not in (None, 1):
        return "data parallelism"
    cls = getattr(engine_args, "scheduler_cls", None)
    if cls not in (None, SCHEDULER_CLS) and "AsyncScheduler" not in str(cls) and \
            "vllm.v1.core.sched.scheduler.Scheduler" not in str(cls):
        return f"a custom --scheduler-cls ({cls})"
    if getattr(engine_args, "enable_lora", False):
        return "LoRA (--enable-lora: its token-to-adapter mapping is for the uncompacted rows)"
    for flag, attr in (("--decode-context-parallel-size", "decode_context_parallel_size"),
                       ("--prefill-context-parallel-size", "prefill_context_parallel_size")):
        if int(getattr(engine_args, attr, 1) or 1) > 1:
            return f"context parallelism ({flag})"
    if getattr(engine_args, "kv_transfer_config", None) is not None:
        return "KV connectors (--kv-transfer-config: they expect one KV cache group)"
    if getattr(engine_args, "ec_transfer_config", None) is not None:
        return ("encoder-cache connectors (--ec-transfer-config: a video's input-stage segment "
                "layout, which the stages select by, does not travel with its encoder output)")
    if getattr(engine_args, "disable_hybrid_kv_cache_manager", None):
        return "--disable-hybrid-kv-cache-manager (the stages need one KV cache group each)"
    if getattr(engine_args, "enable_dbo", False):
        return ("dual-batch overlap (--enable-dbo: its micro-batches split the step's rows, "
                "which the per-stage metadata does not follow)")
    if int(getattr(engine_args, "ubatch_size", 0) or 0) > 1:
        return "micro-batching (--ubatch-size > 1: same as --enable-dbo)"
    if getattr(engine_args, "async_scheduling", None):
        return "--async-scheduling (the HieraVid scheduler plans each step synchronously)"
    return _cudagraph_reason(engine_args)


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _needs_v2_runner(engine_args) -> Optional[str]:
    hisparse = getattr(getattr(engine_args, "attention_config", None), "hisparse_config", None)
    if hisparse is not None:
        return "HiSparse (--attention-config hisparse_config)"
    if getattr(engine_args, "watermark_config", None) is not None:
        return "watermarking (--watermark-config)"
    return None


def select_v1_runner(engine_args) -> None:
    """HieraVid hooks vLLM's V1 model runner (``gpu_model_runner`` / ``cpu_model_runner``);
    Model Runner V2 (``vllm/v1/worker/gpu/``, vLLM's GPU default whenever Triton imports) has
    none of the hooks. Decided here, once, in the process that creates the engine config:
    ``VLLM_USE_V2_MODEL_RUNNER=0`` goes into the environment every vLLM process inherits
    (the workers read ``VllmConfig.use_v2_model_runner`` from it). A setting that needs V2
    is a start-up error naming it."""
    feature = _needs_v2_runner(engine_args)
    if feature is not None:
        raise ValueError(f"{feature} needs vLLM's Model Runner V2, which HieraVid does not hook; "
                         f"start without {feature.split(' (')[0]} or without --hieravid-budget")
    raw = os.environ.get(V2_RUNNER_ENV)
    if raw is not None and raw.strip().lower() in ("1", "true", "yes"):
        raise ValueError(f"{V2_RUNNER_ENV}={raw}: HieraVid hooks vLLM's V1 model runner only; "
                         f"unset {V2_RUNNER_ENV} (HieraVid selects the V1 runner) or start "
                         f"without --hieravid-budget")
    if raw is None or raw.strip().lower() not in ("0", "false", "no"):
        os.environ[V2_RUNNER_ENV] = "0"
        logger.info("HieraVid: using vLLM's V1 model runner (%s=0; Model Runner V2 has no "
                    "HieraVid hooks)", V2_RUNNER_ENV)


def check_kernel_env() -> None:
    """Start-up check of the kernels' launch setting ``HIERAVID_DPP_SPLIT``, of the CPU
    greedy's host loop ``HIERAVID_HOST_GREEDY`` and of ``HIERAVID_BOUNDARY_COUNTS`` (read by
    every worker at its first selection): a bad value stops start-up naming the variable
    instead of failing the first video request inside the engine. (numba itself is imported
    by the workers only, see :func:`hieravid_vllm.core.dpp.check_host_greedy_env`.)"""
    from hieravid_vllm.core.dpp import boundary_counts_on_device, check_host_greedy_env

    check_host_greedy_env()
    boundary_counts_on_device()
    try:
        from hieravid_kernels.dpp import default_split
    except ImportError:  # pragma: no cover - the package ships both
        return
    import torch

    default_split(torch.device("cuda"))


def configure_stages(engine_args, opts: hv_options.ServingOptions) -> hv_options.ServingOptions:
    """Full mode: install the HieraVid scheduler (and piecewise CUDA graphs, because each
    stage has its own attention metadata); fall back to input-only with a warning where the
    stages cannot run, before any process reads the options (so placeholder counts and
    pruning agree). Both modes: :func:`check_kernel_env`."""
    check_kernel_env()
    if opts.config.mode != "full":
        return opts
    if getattr(engine_args, "mm_processor_cache_type", None) == "shm":
        # the engine core then holds shared-memory handles, not the video's grid, and the
        # HieraVid scheduler needs the grid to count each stage's tokens
        raise ValueError(
            "--mm-processor-cache-type shm is not supported with --hieravid-mode full (the "
            "engine core cannot read a video's grid from shared-memory handles); use "
            "--mm-processor-cache-type lru (vLLM's default) or --hieravid-mode input_only")
    reason = stages_unsupported_reason(engine_args)
    if reason is not None:
        logger.warning("HieraVid: the layer-level stages do not support %s; using "
                       "mode=input_only (all pruning before the LLM) with budget %s",
                       reason, opts.config.budget)
        return opts.model_copy(update={"config": opts.config.model_copy(
            update={"mode": "input_only"})})
    engine_args.scheduler_cls = SCHEDULER_CLS
    if getattr(engine_args, "async_scheduling", None) is None:
        engine_args.async_scheduling = False
    try:
        from vllm.config import CUDAGraphMode
        from vllm.platforms import current_platform

        cc = engine_args.compilation_config
        if current_platform.is_cuda_alike() and getattr(cc, "cudagraph_mode", None) is None:
            cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    except Exception:  # pragma: no cover - platform specific
        logger.debug("HieraVid: could not set the CUDA graph mode", exc_info=True)
    return opts



def prompt_needs(prompt_len: int, mm_placeholders) -> tuple:
    """(tokens from the first video to the end of the prompt, encoder tokens of all media)."""
    first = None
    enc = 0
    for modality, positions in (mm_placeholders or {}).items():
        for pos in positions:
            enc += int(pos.get_num_embeds())
            if modality == "video":
                first = pos.offset if first is None else min(first, pos.offset)
    return (0 if first is None else prompt_len - first), enc


#: Set to 0 to keep one KV cache group (no per-stage memory savings; for debugging).
KV_GROUPS_ENV = "HIERAVID_KV_GROUPS"


def stage_kv_groups(vllm_config, kv_cache_spec) -> Optional[list]:
    """Layer names of each stage's KV cache group, or None where one group must stay (HieraVid
    off or not in full mode, non-uniform specs, stages of unequal depth: vLLM shares each
    KV tensor between one layer of every group, so groups need equal layer counts)."""
    from hieravid_vllm.stages import stage_layer_names

    if os.environ.get(KV_GROUPS_ENV, "1") == "0":
        return None
    hf_config = vllm_config.model_config.hf_config
    raw = getattr(hf_config, hv_options.CONFIG_KEY, None)
    if not raw:
        return None
    cfg = hv_options.ServingOptions.from_dict(raw).config
    if cfg.mode != "full" or len(set(kv_cache_spec.values())) != 1:
        return None
    text = getattr(hf_config, "text_config", None) or hf_config
    bounds = list(cfg.stage_boundaries(int(text.num_hidden_layers)))
    by_stage = stage_layer_names(kv_cache_spec, bounds)
    groups = [by_stage.get(g, []) for g in range(len(bounds))]
    if sum(map(len, groups)) != len(kv_cache_spec) or len(groups) < 2 or len({len(g) for g in groups}) != 1:
        return None
    return groups


class StageKVCacheGroupingMixin:
    """vLLM 0.33's ``SupportsKVCacheGrouping`` (``model_executor/models/interfaces.py``) for
    the HieraVid models: the model declares its KV cache groups, one per stage in full mode
    (:func:`stage_kv_groups`), vLLM's default grouping otherwise. vLLM 0.32 has no such
    interface and never calls it; there the registry's ``kv_cache_groups`` patch does the
    same (:mod:`hieravid_vllm.patches.engine_core.kv_cache_groups`).

    It is a base of each HieraVid model class in the class's own module: vLLM caches a lazily
    registered model's interfaces keyed on that module file's hash, so the declaration must
    change that file (a base added in another module would leave a stale cache entry)."""

    @classmethod
    def get_kv_cache_groups(cls, vllm_config, kv_cache_spec):
        from vllm.v1.core import kv_cache_planning

        groups = stage_kv_groups(vllm_config, kv_cache_spec)
        if groups is None:
            return kv_cache_planning.get_kv_cache_groups(vllm_config, kv_cache_spec)
        return kv_cache_planning.create_kv_cache_group_specs(kv_cache_spec, groups)
