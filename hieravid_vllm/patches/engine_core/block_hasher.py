"""``kv_cache_utils.generate_block_hash_extra_keys`` (and ``block_pool``'s by-name copy):
per-request keys for blocks whose KV depends on the request.

What: adds :func:`hieravid_vllm.scheduler.hieravid_extra_keys` to vLLM's block-hash extra
keys: the block holding the start of a request's first video gets a per-request key (hashes
chain, so every later block is per-request too). Patched under both names vLLM calls it by:
``kv_cache_utils.generate_block_hash_extra_keys`` (block hashes, prefix cache) and the copy
``block_pool`` imported by name (KV-cache events: without it, events would announce
question-dependent blocks under a key other requests share).
Why: in full mode later stages store a request's KV compacted (token ``p`` at ``p - D_g``),
so a block from the first video on holds KV that depends on the question and on the
request's own continuation; it must never be shared through the prefix cache.
When it can go: when vLLM lets a scheduler or model add block-hash extra keys.
Active only in a process whose :class:`hieravid_vllm.scheduler.HieraVidScheduler` was
created (:func:`enable`; as when the patch was applied on importing the scheduler): the
wrapper passes through otherwise, so without HieraVid full mode prefix caching is vLLM's.
"""
from __future__ import annotations

MODULE = "vllm.v1.core.kv_cache_utils"
TARGETS = ("generate_block_hash_extra_keys",)
#: modules that import the function by name (``from ... import``): patched too
BY_NAME = ("vllm.v1.core.block_pool",)

_enabled = False


def enable() -> None:
    """Add the per-request keys from now on in this process (called by the HieraVid
    scheduler; applies the patch if the plugin has not, as the import-time patch did)."""
    import importlib

    global _enabled
    apply(importlib.import_module(MODULE))
    _enabled = True


def apply(module) -> None:
    from hieravid_vllm.patches._wrap import wrap

    def make(orig):
        def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx,
                                           start_mm_idx):
            keys, nxt = orig(request, start_token_idx, end_token_idx, start_mm_idx)
            if not _enabled:
                return keys, nxt
            from hieravid_vllm.scheduler import hieravid_extra_keys

            extra = hieravid_extra_keys(request, start_token_idx, end_token_idx)
            if extra is not None:
                keys = (keys or ()) + (extra,)
            return keys, nxt
        return generate_block_hash_extra_keys

    wrap(module, "generate_block_hash_extra_keys", make, by_name_in=BY_NAME)
