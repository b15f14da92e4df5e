"""``kv_cache_utils.get_kv_cache_groups``: one KV cache group per HieraVid stage.

What: in full mode, the layers of each stage form their own KV cache group
(:func:`hieravid_vllm.engine_setup.stage_kv_groups`), so the KV cache manager allocates every
stage only the slots its kept tokens need (the HieraVid scheduler's stage managers,
:mod:`hieravid_vllm.patches.engine_core.stage_kv_manager`).
Why: vLLM groups layers by KV spec only; it has no notion of layers that hold fewer tokens.
When it can go: when vLLM lets a model declare per-layer token counts (KV groups).
Unchanged behaviour without HieraVid full mode (``stage_kv_groups`` is None).
"""
from __future__ import annotations

from hieravid_vllm import engine_setup as hv_setup
from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.core.kv_cache_utils"
TARGETS = ("get_kv_cache_groups",)


def apply(module) -> None:
    def make(orig):
        def get_kv_cache_groups(vllm_config, kv_cache_spec):
            groups = hv_setup.stage_kv_groups(vllm_config, kv_cache_spec)
            if groups is None:
                return orig(vllm_config, kv_cache_spec)
            return module.create_kv_cache_group_specs(kv_cache_spec, groups)
        return get_kv_cache_groups

    wrap(module, "get_kv_cache_groups", make)
