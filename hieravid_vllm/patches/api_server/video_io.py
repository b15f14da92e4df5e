"""``VideoMediaIO.load_bytes``: undecodable videos are a 400.

What: an exception other than ``ValueError`` / ``VLLMClientError`` from any video loader
becomes ``ValueError("Could not decode the video: ...")``, and a video that decodes to 0
frames is rejected.
Why: vLLM answers the loaders' other exceptions (OpenCV, torch) with a 500.
When it can go: when vLLM's ``VideoMediaIO`` maps decoder errors to client errors.
Changes only responses that were errors already.
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap
from hieravid_vllm.patches.api_server._media import client_error_types

MODULE = "vllm.multimodal.media.video"
TARGETS = ("VideoMediaIO.load_bytes",)


def _num_frames(video) -> int | None:
    frames = video[0] if isinstance(video, tuple) else video
    shape = getattr(frames, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else None


def apply(module) -> None:
    def make(orig):
        def load_bytes(self, data: bytes):
            try:
                out = orig(self, data)
            except client_error_types():
                raise
            except Exception as e:  # vLLM would answer 500
                raise ValueError(f"Could not decode the video: {type(e).__name__}: {e}") from e
            n = _num_frames(getattr(out, "media", out))
            if n == 0:
                raise ValueError("Could not decode the video: no frame could be decoded")
            return out
        return load_bytes

    wrap(module.VideoMediaIO, "load_bytes", make)
