"""``LruKeyReplicatedSenderCache`` (``is_cached_item``, ``get_and_update_item``,
``invalidate``, ``clear_cache``): the API server's cache shadow records what the engine got.

With ``--mm-processor-cache-type lru`` (vLLM's default) the API server keeps a metadata-only
"shadow" (P0, ``LruKeyReplicatedSenderCache``) of the engine core's cache of processed items
(P1, ``LruKeyReplicatedReceiverCache``). When P0 says an item is cached, the request carries
only the item's hash and the engine takes the data from P1.

Why: vLLM 0.32 (and 0.33, same code) records an item in P0 when the request is *rendered*,
before it is handed to the engine. A request rejected after rendering (a sampling parameter
rejected after the media were processed, a second medium that fails to load, a client that
disconnects before its stream starts, ...) never reaches the engine, yet P0 believes P1
holds its items: the next request with the same video is sent without data, P1 misses
("P0/P1 cache drift"), and the API server answers **500** to a valid request.

What: an item rendered with its data is inserted as *unconfirmed*. ``is_cached_item`` is
true only for confirmed items, and ``get_and_update_item`` never strips the data of an
unconfirmed one, so until confirmed every request sends the data again (P1 stores it;
sending twice is harmless). Insertions and LRU evictions happen where vLLM makes them (the
processing thread), so P0's eviction order still mirrors P1's. Items are confirmed by the
engine-core clients' patch (:mod:`hieravid_vllm.patches.api_server.mm_client_confirm`).
Drift that vLLM can still meet (P1 evicting an item P0 keeps) keeps vLLM's own retryable
path. ``--mm-processor-cache-type shm`` and ``--mm-processor-cache-gb 0`` have no shadow.

When it can go: when vLLM records P0 entries only for requests that reach the engine.
Changes only which requests carry an item's data, never a result.
"""
from __future__ import annotations

import weakref

from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.multimodal.cache.lru"
TARGETS = ("LruKeyReplicatedSenderCache.is_cached_item",
           "LruKeyReplicatedSenderCache.get_and_update_item",
           "LruKeyReplicatedSenderCache.invalidate",
           "LruKeyReplicatedSenderCache.clear_cache")

#: the sender caches of this process that hold unconfirmed items (one per renderer)
CACHES: "weakref.WeakSet" = weakref.WeakSet()


def _unconfirmed(cache) -> set:
    s = cache.__dict__.get("_hieravid_unconfirmed")
    if s is None:
        s = cache.__dict__["_hieravid_unconfirmed"] = set()
    return s


def _trim(cache, unconfirmed: set) -> None:
    """Forget unconfirmed hashes the LRU has evicted (bounded bookkeeping)."""
    if len(unconfirmed) > 64 and len(unconfirmed) > 2 * len(cache._cache):
        for h in [h for h in unconfirmed if h not in cache._cache]:
            unconfirmed.discard(h)


def confirm(cache, mm_hash: str) -> None:
    """The engine received ``mm_hash``'s data: later requests may send its hash only."""
    _unconfirmed(cache).discard(mm_hash)


def apply(module) -> None:
    from vllm.multimodal.cache.base import MultiModalProcessorCacheItemMetadata

    def make_is_cached(_orig):
        def is_cached_item(self, mm_hash: str) -> bool:
            return mm_hash in self._cache and mm_hash not in _unconfirmed(self)
        return is_cached_item

    def make_get_and_update(_orig):
        def get_and_update_item(self, mm_item, mm_hash: str):
            unconfirmed = _unconfirmed(self)
            cached = self._cache.get(mm_hash)
            if mm_item is None:  # the processor saw is_cached_item: confirmed
                assert cached is not None, f"Expected a cached item for {mm_hash=}"
                return None, cached.prompt_updates
            if cached is None:
                self.cache_if_fits(self._cache, mm_hash, MultiModalProcessorCacheItemMetadata(
                    *mm_item))
                if mm_hash in self._cache:
                    unconfirmed.add(mm_hash)
                    CACHES.add(self)
                _trim(self, unconfirmed)
            return mm_item  # rendered with its data: the engine gets the data
        return get_and_update_item

    def make_invalidate(orig):
        def invalidate(self, mm_hash: str) -> None:
            _unconfirmed(self).discard(mm_hash)
            orig(self, mm_hash)
        return invalidate

    def make_clear(orig):
        def clear_cache(self) -> None:
            _unconfirmed(self).clear()
            orig(self)
        return clear_cache

    cls = module.LruKeyReplicatedSenderCache
    wrap(cls, "is_cached_item", make_is_cached)
    wrap(cls, "get_and_update_item", make_get_and_update)
    wrap(cls, "invalidate", make_invalidate)
    wrap(cls, "clear_cache", make_clear)
