"""Keep vLLM's two multimodal processor caches in step (API server process).

With ``--mm-processor-cache-type lru`` (vLLM's default) the API server keeps a metadata-only
"shadow" (P0, ``LruKeyReplicatedSenderCache``) of the engine core's cache of processed items
(P1, ``LruKeyReplicatedReceiverCache``). When P0 says an item is cached, the request carries
only the item's hash and the engine takes the data from P1.

vLLM 0.32 (and 0.33, same code) records an item in P0 when the request is *rendered*, before
it is handed to the engine. A request rejected after rendering never reaches the engine, yet
P0 believes P1 holds its items:

* a sampling parameter rejected after the media were processed (``max_tokens: -1``: 400),
  a second medium that fails to load after the first was processed, a client that
  disconnects before its stream starts, ...;
* the next request with the same video is sent without data, P1 misses
  (``MultiModalCacheMissError``: "P0/P1 cache drift"), the engine returns a retryable error,
  and the API server answers **500** to a valid request. Only a third try succeeds.

The patch makes P0 record what P1 received, not what was rendered:

1. ``LruKeyReplicatedSenderCache`` (:func:`patch_sender_cache`): an item rendered with its
   data is inserted as *unconfirmed*. ``is_cached_item`` is true only for confirmed items,
   and ``get_and_update_item`` never strips the data of an unconfirmed one, so until
   confirmed every request sends the data again (P1 stores it; sending twice is harmless).
   Insertions and LRU evictions happen where vLLM makes them (the processing thread), so
   P0's eviction order still mirrors P1's.
2. The engine-core clients' ``add_request`` / ``add_request_async`` (:func:`patch_clients`):
   once a request is handed to the engine, the items it carried data for are confirmed.
   Confirming only flags an entry (no insertion, no eviction), so it cannot race with a
   render between its ``is_cached`` and ``get_and_update_item`` calls.

Drift that vLLM can still meet (P1 evicting an item P0 keeps, under memory pressure) keeps
vLLM's own retryable path. ``--mm-processor-cache-type shm`` and ``--mm-processor-cache-gb 0``
have no shadow and are not patched. Can go when vLLM records P0 entries only for requests
that reach the engine.
"""
from __future__ import annotations

import functools
import logging
import weakref

logger = logging.getLogger("vllm.hieravid_vllm")

_MARK = "_hieravid_mm_sync_patched"


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


def patch_sender_cache() -> None:
    from vllm.multimodal.cache.base import MultiModalProcessorCacheItemMetadata
    from vllm.multimodal.cache.lru import LruKeyReplicatedSenderCache as Cache

    if getattr(Cache.get_and_update_item, _MARK, False):
        return
    orig_invalidate, orig_clear = Cache.invalidate, Cache.clear_cache

    def is_cached_item(self, mm_hash: str) -> bool:
        return mm_hash in self._cache and mm_hash not in _unconfirmed(self)

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
                _CACHES.add(self)
            _trim(self, unconfirmed)
        return mm_item  # rendered with its data: the engine gets the data

    @functools.wraps(orig_invalidate)
    def invalidate(self, mm_hash: str) -> None:
        _unconfirmed(self).discard(mm_hash)
        orig_invalidate(self, mm_hash)

    @functools.wraps(orig_clear)
    def clear_cache(self) -> None:
        _unconfirmed(self).clear()
        orig_clear(self)

    def confirm(self, mm_hash: str) -> None:
        """The engine received ``mm_hash``'s data: later requests may send its hash only."""
        _unconfirmed(self).discard(mm_hash)

    for fn in (is_cached_item, get_and_update_item, invalidate, clear_cache, confirm):
        setattr(fn, _MARK, True)
    Cache.is_cached_item = is_cached_item
    Cache.get_and_update_item = get_and_update_item
    Cache.invalidate = invalidate
    Cache.clear_cache = clear_cache
    Cache.hieravid_confirm = confirm


#: the sender caches of this process that hold unconfirmed items (one per renderer)
_CACHES: "weakref.WeakSet" = weakref.WeakSet()


def _confirm_sent(request) -> None:
    """``request`` was handed to the engine: confirm the items it carried data for."""
    features = getattr(request, "mm_features", None)
    if not features or not _CACHES:
        return
    hashes = [f.mm_hash or f.identifier for f in features if f.data is not None]
    for cache in list(_CACHES):
        for h in hashes:
            cache.hieravid_confirm(h)


def patch_clients() -> None:
    from vllm.v1.engine import core_client as cc

    for cls_name, meth in (("InprocClient", "add_request"), ("SyncMPClient", "add_request"),
                           ("AsyncMPClient", "add_request_async"),
                           ("DPAsyncMPClient", "add_request_async")):
        cls = getattr(cc, cls_name, None)
        orig = cls.__dict__.get(meth) if cls is not None else None
        if orig is None or getattr(orig, _MARK, False):
            continue
        if meth.endswith("_async"):
            @functools.wraps(orig)
            async def wrapped(self, request, _orig=orig):
                await _orig(self, request)
                _confirm_sent(request)
        else:
            @functools.wraps(orig)
            def wrapped(self, request, _orig=orig):
                _orig(self, request)
                _confirm_sent(request)
        setattr(wrapped, _MARK, True)
        setattr(cls, meth, wrapped)


def apply() -> None:
    """Apply the P0/P1 cache patches (idempotent); a missing vLLM hook is logged."""
    for patch in (patch_sender_cache, patch_clients):
        try:
            patch()
        except (ImportError, AttributeError) as e:  # pragma: no cover - other vLLM layout
            logger.warning("hieravid-vllm: mm cache sync %s not applied: %s",
                           patch.__name__, e)
