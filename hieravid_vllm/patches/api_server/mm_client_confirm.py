"""Engine-core clients' ``add_request`` / ``add_request_async`` (``InprocClient``,
``SyncMPClient``, ``AsyncMPClient``, ``DPAsyncMPClient``): confirm the processor-cache items
a request carried once the engine received it.

What: after the request is handed to the engine, the items it carried data for are
confirmed in this process's sender caches
(:mod:`hieravid_vllm.patches.api_server.mm_sender_cache`). Confirming only flags an entry (no
insertion, no eviction), so it cannot race with a render between its ``is_cached`` and
``get_and_update_item`` calls.
Why / when it can go: see :mod:`hieravid_vllm.patches.api_server.mm_sender_cache`.
Changes only which requests carry an item's data, never a result.
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap
from hieravid_vllm.patches.api_server import mm_sender_cache

MODULE = "vllm.v1.engine.core_client"
TARGETS = ("InprocClient.add_request", "SyncMPClient.add_request",
           "AsyncMPClient.add_request_async", "DPAsyncMPClient.add_request_async")


def confirm_sent(request) -> None:
    """``request`` was handed to the engine: confirm the items it carried data for."""
    features = getattr(request, "mm_features", None)
    if not features or not mm_sender_cache.CACHES:
        return
    hashes = [f.mm_hash or f.identifier for f in features if f.data is not None]
    for cache in list(mm_sender_cache.CACHES):
        for h in hashes:
            mm_sender_cache.confirm(cache, h)


def apply(module) -> None:
    def make_sync(orig):
        def add_request(self, request):
            orig(self, request)
            confirm_sent(request)
        return add_request

    def make_async(orig):
        async def add_request_async(self, request):
            await orig(self, request)
            confirm_sent(request)
        return add_request_async

    for target in TARGETS:
        cls_name, meth = target.split(".")
        wrap(getattr(module, cls_name), meth,
             make_async if meth.endswith("_async") else make_sync)
