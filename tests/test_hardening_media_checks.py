"""The media patches (``hieravid_vllm/patches/api_server/``) on vLLM's own loaders, in process.

No server: vLLM's ``VideoMediaIO`` / ``MediaConnector`` are called directly with the
patches applied, for both video loaders this project's models use (``qwen2_vl``: Qwen2-VL and
Qwen2.5-VL; ``opencv``: LLaVA-OneVision). Good clips must decode to exactly the frames OpenCV
reads on its own; bad ones must raise ``ValueError`` / ``VLLMClientError`` (what vLLM's
server answers with a 400) with a message naming the problem. The server tests
(test_hardening_input.py) check the same cases end to end on Qwen2.5-VL.
"""
from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from hieravid_vllm.testing.video import (read_video_frames, write_single_frame_video,
                                         write_static_video)

BACKENDS = ["qwen2_vl", "opencv"]


@pytest.fixture(scope="module")
def patched():
    from hieravid_vllm import patches

    patches.apply_all()
    patches.apply_all()  # idempotent
    from vllm.multimodal.media.video import VideoMediaIO

    assert getattr(VideoMediaIO.load_bytes, patches.MARK)
    assert not getattr(VideoMediaIO.load_bytes.__wrapped__, patches.MARK, False)
    return patches


@pytest.fixture(scope="module")
def clips(make_videos, tmp_path_factory):
    d = tmp_path_factory.mktemp("media-checks")
    import cv2

    ok, png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))
    assert ok
    good = make_videos({"good": dict(num_frames=8, width=56, height=56, num_scenes=2,
                                     seed=1)})["good"]
    return {
        "good": good.read_bytes(),
        "two": write_static_video(d / "two.mp4", num_frames=2, width=56, height=56).path
        .read_bytes(),
        "one": write_single_frame_video(d / "one.mp4", width=56, height=56).path.read_bytes(),
        "png": png.tobytes(),
        "text": b"not a video at all\n" * 10,
        "good_path": good,
    }


def _io(backend):
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    return VideoMediaIO(ImageMediaIO(), video_backend=backend, fps=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_clips_decode_unchanged(patched, clips, backend):
    frames, meta = _io(backend).load_bytes(clips["good"]).media
    np.testing.assert_array_equal(frames, read_video_frames(clips["good_path"]))
    assert meta["total_num_frames"] == 8
    frames, _ = _io(backend).load_bytes(clips["two"]).media
    assert frames.shape[0] == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,fragment", [
    ("one", {"qwen2_vl": "needs at least 2 frames per video",
             "opencv": "no frame could be decoded"}),
    ("png", {"qwen2_vl": "not a video with decodable frames", "opencv": "Could not"}),
    ("text", {"qwen2_vl": "Could not open video stream",
              "opencv": "Could not open video stream"}),
])
def test_bad_clips_raise_value_error(patched, clips, backend, case, fragment):
    with pytest.raises(ValueError, match=fragment[backend]):
        _io(backend).load_bytes(clips[case])


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/clip.mp4"


def test_unreachable_url_is_a_client_error(patched, monkeypatch):
    from vllm.exceptions import VLLMClientError
    from vllm.multimodal.media.connector import MediaConnector

    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", "1")
    url = _closed_port_url()
    conn = MediaConnector()
    with pytest.raises(VLLMClientError, match="Could not fetch media from " + url):
        asyncio.run(conn.load_from_url_async(url, _io("qwen2_vl"), fetch_timeout=2))
    with pytest.raises(VLLMClientError, match="Could not fetch media from " + url):
        conn.load_from_url(url, _io("qwen2_vl"), fetch_timeout=2)


def test_data_url_errors_are_not_called_fetch_errors(patched, clips):
    import base64

    from vllm.multimodal.media.connector import MediaConnector

    url = "data:video/mp4;base64," + base64.b64encode(clips["one"]).decode()
    with pytest.raises(ValueError, match="needs at least 2 frames") as e:
        asyncio.run(MediaConnector().load_from_url_async(url, _io("qwen2_vl")))
    assert "fetch" not in str(e.value)
