"""``KVCacheCoordinator.get_num_blocks_to_allocate`` / ``allocate_new_blocks`` /
``cache_blocks``, per instance: a request that already holds every block a step needs, and has
no new full block to cache, skips the per-group calls.

What: :class:`hieravid_vllm.scheduler.HieraVidScheduler` rebinds these two methods on its
KV cache coordinator (:func:`wrap_stage_coordinator`; one instance, not the class). When
the request already holds, in every KV cache group, the blocks for ``num_tokens`` tokens
(group ``g`` > 0 counted compacted: :meth:`hieravid_vllm.stages.StageSpans.compact`) and
brings no new prefix-cache blocks, the answer is vLLM's own: 0 blocks to allocate, no new
blocks (every group's manager returns that in this case: its running-request path gives
``max(cdiv(n, block_size) - held, 0)``, its other path the same with no computed blocks and
no partial hit). Likewise ``cache_blocks`` returns at once when no group has a new full
block to cache (every group's manager returns at its ``num_cached_blocks >= num_full_blocks``
check then; only with prefix caching on in every group and cache blocks of the hash block
size, so that no partial tail block is cached either). Anything else (a new or resumed
request, a prefix hit, a step that crosses a block boundary in any group) goes to vLLM's
coordinator, whose managers count compacted tokens through
:mod:`hieravid_vllm.patches.engine_core.stage_kv_manager`.
Why: with one KV cache group per stage, vLLM asks every group's manager twice per running
request per step, through a wrapper each for the stage groups; on a decode step that is
nearly all of the scheduler's extra work in full mode (issue #14's profile) although a
group needs a new block only once per ``block_size`` tokens.
When it can go: with :mod:`stage_kv_manager` (when vLLM lets a KV cache group allocate fewer
tokens than the request has), or when vLLM's coordinator itself skips groups with room.
Only when every group's manager is vLLM's plain ``FullAttentionManager`` (HieraVid's stage
groups are; anything else keeps vLLM's path); the registry checks that the methods exist.
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap_instance

MODULE = "vllm.v1.core.kv_cache_coordinator"
TARGETS = ("KVCacheCoordinator.get_num_blocks_to_allocate",
           "KVCacheCoordinator.allocate_new_blocks", "KVCacheCoordinator.cache_blocks")


def wrap_stage_coordinator(coordinator, spans_of) -> bool:
    """Give ``coordinator`` the fast path described in the module docstring.

    ``spans_of(request_id)``: the request's :class:`hieravid_vllm.stages.StageSpans`
    (``NO_SPANS`` for a request without a pruned video). Returns False (and changes nothing)
    unless every manager is a plain ``FullAttentionManager``."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    managers = tuple(coordinator.single_type_managers)
    if not managers or any(type(m) is not FullAttentionManager for m in managers):
        return False
    # per group: (request -> blocks, block size, requests with a pending copy-on-write
    # block), read live on every call (vLLM mutates these containers in place)
    groups = tuple((g, m.req_to_blocks, m.block_size, getattr(m, "_partial_hit_reqs", {}))
                   for g, m in enumerate(managers))

    def holds_all(request_id, num_tokens) -> bool:
        compact = spans_of(request_id).compact
        for g, req_to_blocks, block_size, partial in groups:
            blocks = req_to_blocks.get(request_id)
            if not blocks or request_id in partial:
                return False
            if len(blocks) * block_size < (compact(g, num_tokens) if g else num_tokens):
                return False
        return True

    def make_n(orig_n):
        def get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                       *args, **kwargs):
            if not any(new_computed_blocks) and holds_all(request_id, num_tokens):
                return 0
            return orig_n(request_id, num_tokens, new_computed_blocks, *args, **kwargs)
        return get_num_blocks_to_allocate

    def make_alloc(orig_alloc):
        def allocate_new_blocks(request_id, num_tokens, *args, **kwargs):
            if holds_all(request_id, num_tokens):
                return tuple([] for _ in groups)
            return orig_alloc(request_id, num_tokens, *args, **kwargs)
        return allocate_new_blocks

    wrap_instance(coordinator, "get_num_blocks_to_allocate", make_n)
    wrap_instance(coordinator, "allocate_new_blocks", make_alloc)
    if all(m.enable_caching and m.kv_cache_spec.prefix_cacheable and
           m.block_size == m.block_pool.hash_block_size for m in managers):
        cacheable = coordinator.get_num_cacheable_tokens
        cached = tuple((g, m.num_cached_block, m.block_size) for g, m in enumerate(managers))

        def nothing_to_cache(request_id, num_computed_tokens) -> bool:
            compact = spans_of(request_id).compact
            for g, num_cached_block, block_size in cached:
                n = cacheable(num_computed_tokens, g)
                full = (compact(g, n) if g else n) // block_size
                if num_cached_block.get(request_id, 0) < full:
                    return False
            return True

        def make_cache(orig_cache):
            def cache_blocks(request, num_computed_tokens, *args, **kwargs):
                if nothing_to_cache(request.request_id, num_computed_tokens):
                    return None
                return orig_cache(request, num_computed_tokens, *args, **kwargs)
            return cache_blocks

        wrap_instance(coordinator, "cache_blocks", make_cache)
    return True
