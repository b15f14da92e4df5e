"""``Qwen2VLVideoBackend.compute_frames_index_to_sample``: clips with too few frames.

What: a clip reporting no frames is rejected as "not a decodable video"; a clip with fewer
frames than the temporal patch size (a one-frame clip) is rejected with a message saying so
and pointing to ``image_url`` (both 400s).
Why: the Qwen2-VL loader (Qwen2-VL, Qwen2.5-VL) floors the frame count to a multiple of the
temporal patch size (2), gets 0 and raises ``ZeroDivisionError`` (500 "division by zero");
a PNG sent as ``video/mp4`` reports -2^63 frames and ``torch.arange`` raises
``RuntimeError`` (500). A one-frame clip is rejected rather than served: vLLM's OpenCV
reader cannot decode it anyway (its end-of-stream seek leaves the capture unreadable), and
a single frame is an image, which the API already accepts.
When it can go: when vLLM validates the frame count before sampling (client error).
Changes only responses that were errors already.
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.multimodal.video"
TARGETS = ("Qwen2VLVideoBackend.compute_frames_index_to_sample",)


def frame_count_check(source, temporal_patch_size: int) -> None:
    n = int(source.total_frames_num)
    if n <= 0:
        raise ValueError("Could not decode the video: the data is not a video with decodable "
                         f"frames (the container reports {n} frames)")
    if n < temporal_patch_size:
        raise ValueError(
            f"The video has {n} frame(s); this model needs at least {temporal_patch_size} "
            f"frames per video (its temporal patch size). Send a single frame as an "
            f"image_url instead.")


def apply(module) -> None:
    def make(orig):
        def compute_frames_index_to_sample(cls, source, target, **kwargs):
            frame_count_check(source, int(kwargs.get("temporal_patch_size", 2)))
            return orig(cls, source, target, **kwargs)
        return compute_frames_index_to_sample

    wrap(module.Qwen2VLVideoBackend, "compute_frames_index_to_sample", make)
