"""``MediaConnector.load_from_url`` + ``load_from_url_async``: unfetchable URLs are a 400.

What: for ``http(s)`` URLs, network errors and timeouts left after vLLM's retries become a
400 naming the URL. How long a fetch may take is vLLM's: ``VLLM_VIDEO_FETCH_TIMEOUT``
seconds for the first attempt, 4x longer on each of the ``VLLM_MEDIA_FETCH_MAX_RETRIES``
attempts, with 1 s, 4 s, ... sleeps between them (defaults 30 s and 3: about 10.5 minutes
for a URL that never answers).
Why: vLLM treats network errors as transient, retries and then re-raises them (a 500).
When it can go: when vLLM reports an unreachable media URL as a client error.
Changes only responses that were errors already.
"""
from __future__ import annotations

import asyncio

from hieravid_vllm.patches._wrap import wrap
from hieravid_vllm.patches.api_server._media import client_error_types, network_error_types

MODULE = "vllm.multimodal.media.connector"
TARGETS = ("MediaConnector.load_from_url", "MediaConnector.load_from_url_async")


def _is_http(url) -> bool:
    return isinstance(url, str) and url[:4].lower() == "http"


def _fetch_error(url: str, e: BaseException) -> Exception:
    from vllm.exceptions import VLLMValidationError

    reason = str(e) or type(e).__name__
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        reason = "timed out (VLLM_VIDEO_FETCH_TIMEOUT / VLLM_IMAGE_FETCH_TIMEOUT)"
    return VLLMValidationError(f"Could not fetch media from {url}: {reason}")


def _as_client_error(url, e: BaseException):
    """The 400 for a network error left after vLLM's retries on an ``http(s)`` URL; None for
    anything else (re-raised as it is)."""
    if isinstance(e, client_error_types()) or not isinstance(e, network_error_types()) or \
            not _is_http(url):
        return None
    return _fetch_error(url, e)


def apply(module) -> None:
    def make_async(orig):
        async def load_from_url_async(self, url, media_io, *args, **kwargs):
            try:
                return await orig(self, url, media_io, *args, **kwargs)
            except Exception as e:
                err = _as_client_error(url, e)
                if err is None:
                    raise
                raise err from e
        return load_from_url_async

    def make_sync(orig):
        def load_from_url(self, url, media_io, *args, **kwargs):
            try:
                return orig(self, url, media_io, *args, **kwargs)
            except Exception as e:
                err = _as_client_error(url, e)
                if err is None:
                    raise
                raise err from e
        return load_from_url

    wrap(module.MediaConnector, "load_from_url_async", make_async)
    wrap(module.MediaConnector, "load_from_url", make_sync)
