"""``SingleTypeKVCacheManager.get_num_blocks_to_allocate`` / ``allocate_new_blocks`` /
``cache_blocks``, per instance: stage ``g``'s KV group counts compacted tokens.

What: :class:`hieravid_vllm.scheduler.HieraVidScheduler` rebinds these methods on the KV
cache manager of every stage group ``g > 0`` (:func:`wrap_stage_manager`; one instance, not
the class): token counts become :func:`hieravid_vllm.stages.compacted_tokens` (the request's
tokens minus the visual tokens dropped before stage ``g``), so a request holds about the sum
over stages of its kept tokens and admission counts that footprint.
Why: vLLM's managers allocate every group for all of a request's tokens.
When it can go: when vLLM lets a KV cache group allocate fewer tokens than the request has.
Only with one KV cache group per stage (HieraVid full mode); the registry checks that the
methods exist (it applies nothing itself: the scheduler does, per manager).
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap_instance

MODULE = "vllm.v1.core.single_type_kv_cache_manager"
TARGETS = ("SingleTypeKVCacheManager.get_num_blocks_to_allocate",
           "SingleTypeKVCacheManager.allocate_new_blocks",
           "SingleTypeKVCacheManager.cache_blocks")


def wrap_stage_manager(manager, g: int, spans_of) -> None:
    """Make the KV cache manager of stage ``g``'s group count compacted tokens.

    ``spans_of(request_id)``: the request's :class:`hieravid_vllm.stages.StageSpans`
    (``NO_SPANS`` for a request without a pruned video). Called on every scheduling step for
    every running request, so the wrappers take vLLM's arguments as they come and touch only
    the token counts."""

    def make_n(orig_n):
        def get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                       total_computed_tokens, num_local_computed_tokens,
                                       num_tokens_main_model, *args, **kwargs):
            c = spans_of(request_id).compact
            return orig_n(request_id, c(g, num_tokens), new_computed_blocks,
                          total_computed_tokens, num_local_computed_tokens,
                          c(g, num_tokens_main_model), *args, **kwargs)
        return get_num_blocks_to_allocate

    def make_alloc(orig_alloc):
        def allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, *args,
                                **kwargs):
            c = spans_of(request_id).compact
            return orig_alloc(request_id, c(g, num_tokens), c(g, num_tokens_main_model),
                              *args, **kwargs)
        return allocate_new_blocks

    def make_cache(orig_cache):
        def cache_blocks(request, num_tokens, *args, **kwargs):
            return orig_cache(request, spans_of(request.request_id).compact(g, num_tokens),
                              *args, **kwargs)
        return cache_blocks

    wrap_instance(manager, "get_num_blocks_to_allocate", make_n)
    wrap_instance(manager, "allocate_new_blocks", make_alloc)
    wrap_instance(manager, "cache_blocks", make_cache)
