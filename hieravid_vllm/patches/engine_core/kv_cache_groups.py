"""One KV cache group per HieraVid stage: ``kv_cache_utils.get_kv_cache_groups`` (vLLM 0.32)
or the model's own grouping (vLLM 0.33).

What: in full mode, the layers of each stage form their own KV cache group
(:func:`hieravid_vllm.engine_setup.stage_kv_groups`), so the KV cache manager allocates every
stage only the slots its kept tokens need (the HieraVid scheduler's stage managers,
:mod:`hieravid_vllm.patches.engine_core.stage_kv_manager`).
Why: vLLM groups layers by KV spec only; it has no notion of layers that hold fewer tokens.
Per vLLM version (the registry picks the variant, :mod:`hieravid_vllm.patches`):

* 0.32: :func:`apply` wraps ``vllm.v1.core.kv_cache_utils.get_kv_cache_groups`` (vLLM 0.32
  has no way for a model to choose its groups);
* 0.33: no patch. The function moved to ``vllm.v1.core.kv_cache_planning`` and vLLM lets a
  model own its grouping (``SupportsKVCacheGrouping``, honoured by
  ``DefaultKVCacheConfigBuilder.get_kv_cache_groups``); the HieraVid models implement it
  (:class:`hieravid_vllm.engine_setup.StageKVCacheGroupingMixin`). The registry only checks
  that the builder hook and the functions the models call exist (:data:`TARGETS_033`).

When it can go: the 0.32 variant with vLLM 0.32 support; the 0.33 one is vLLM's interface.
Unchanged behaviour without HieraVid full mode (``stage_kv_groups`` is None).
"""
from __future__ import annotations

from hieravid_vllm import engine_setup as hv_setup
from hieravid_vllm.patches._wrap import wrap

#: vLLM 0.32: the patched function
MODULE = "vllm.v1.core.kv_cache_utils"
TARGETS = ("get_kv_cache_groups",)

#: vLLM 0.33: what the models' ``get_kv_cache_groups`` relies on (checked, not patched)
MODULE_033 = "vllm.v1.core.kv_cache_planning"
TARGETS_033 = ("DefaultKVCacheConfigBuilder.get_kv_cache_groups", "get_kv_cache_groups",
               "create_kv_cache_group_specs")


def apply(module) -> None:
    """vLLM 0.32: wrap ``kv_cache_utils.get_kv_cache_groups``."""
    def make(orig):
        def get_kv_cache_groups(vllm_config, kv_cache_spec):
            groups = hv_setup.stage_kv_groups(vllm_config, kv_cache_spec)
            if groups is None:
                return orig(vllm_config, kv_cache_spec)
            return module.create_kv_cache_group_specs(kv_cache_spec, groups)
        return get_kv_cache_groups

    wrap(module, "get_kv_cache_groups", make)
