"""Compatibility shim: the vLLM patches live in :mod:`hieravid_vllm.patches` (one file per
patched vLLM symbol, the registry and ``apply_all``), the decisions they make in
:mod:`hieravid_vllm.engine_setup`. This module re-exports the names older code imports."""
from hieravid_vllm.engine_setup import (  # noqa: F401
    KV_GROUPS_ENV, RUNNER_MODULES, SCHEDULER_CLS, STAGE_ATTENTION_BACKENDS, SUPPORTED_VLLM,
    V2_RUNNER_ENV, HieraVidHfOverrides, _attention_backends, check_vllm_version,
    check_worker_setup, configure_stages, prompt_needs, select_v1_runner, stage_kv_groups,
    stages_unsupported_reason, vllm_version)
from hieravid_vllm.patches import MARK as _MARK  # noqa: F401
from hieravid_vllm.patches import apply_all  # noqa: F401
