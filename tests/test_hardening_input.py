"""Hardening (issue #7): bad and unusual video input against a real HieraVid server.

One vLLM OpenAI server (tiny Qwen2.5-VL, ``--hieravid-budget 0.3 --hieravid-mode
input_only``: all pruning before the LLM, so the prompt-token count is the schedule's input
count; the default full mode is exercised by test_hardening_load.py) with the limits an
operator sets (see ``deploy/``):

* ``VLLM_MAX_IMAGE_PIXELS`` = 224 x 224: a larger video frame is rejected (400);
* ``--media-io-kwargs {"video": {"fps": 8, "max_frames": 16}}``: a longer clip is sampled
  down to 16 frames (vLLM's Qwen2-VL loader, as transformers does), not rejected;
* ``--limit-mm-per-prompt {"video": 2, "image": 1}``;
* ``VLLM_VIDEO_FETCH_TIMEOUT=3``, ``VLLM_MEDIA_FETCH_MAX_RETRIES=1``: a ``video_url`` that
  cannot be fetched fails within seconds.

Every bad request must get a 400 with a message that says what is wrong, and the next good
request must be served with the right prompt-token count. Several media in one prompt must be
served with prompt tokens = text + each video's kept count (+ the image's tokens, never
pruned), and the tokens kept for a video must not depend on what else was in its batch
(server-side dumps through ``HIERAVID_DEBUG_DIR``, see also test_hardening_determinism.py).
"""
from __future__ import annotations

import base64
import itertools
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from hieravid_vllm.testing.hf_reference import hf_video_prompt
from hieravid_vllm.testing.expect import (assert_input_dumps_match_core, expected_kept,
                                          input_dumps, qwen_video_grid)
from hieravid_vllm.testing.server import free_port
from hieravid_vllm.testing.video import (read_video_frames, video_data_url,
                                         write_single_frame_video)

pytestmark = pytest.mark.vllm

FPS = 8
BUDGET = 0.3
MAX_PIXELS = 224 * 224
MAX_FRAMES = 16
FETCH_TIMEOUT = 3
QUESTION = "What happens in this video?"


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clips(make_videos, tmp_path_factory):
    out = make_videos({
        "good": dict(num_frames=8, width=56, height=56, num_scenes=2, seed=1),
        "other": dict(num_frames=12, width=84, height=56, num_scenes=2, seed=2),
        "long": dict(num_frames=64, width=56, height=56, num_scenes=4, seed=3),
        "big": dict(num_frames=4, width=448, height=448, num_scenes=1, seed=4)})
    d = tmp_path_factory.mktemp("hardening-media")
    out["one"] = write_single_frame_video(d / "one.mp4", width=56, height=56).path
    import cv2

    zero = d / "zero.mp4"  # a valid mp4 container with no frame in it
    cv2.VideoWriter(str(zero), cv2.VideoWriter_fourcc(*"mp4v"), float(FPS), (56, 56)).release()
    out["zero"] = zero
    ok, png = cv2.imencode(".png", np.full((56, 56, 3), 127, np.uint8))
    assert ok
    (d / "frame.png").write_bytes(png.tobytes())
    out["png"] = d / "frame.png"
    return out


@pytest.fixture(scope="module")
def server(model, debug_dir, start_server):
    s = start_server(model, "hardening-input", [
        "--hieravid-budget", str(BUDGET), "--hieravid-mode", "input_only",
        "--limit-mm-per-prompt", '{"video": 2, "image": 1}'],
        media_io_kwargs={"video": {"max_frames": MAX_FRAMES}},
        env={"HIERAVID_DEBUG_DIR": str(debug_dir),
             "VLLM_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
             "VLLM_VIDEO_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
             "VLLM_MEDIA_FETCH_MAX_RETRIES": "1"})
    yield s
    s.stop()


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def _post(server, content, max_tokens=4, timeout=120.0):
    """Raw OpenAI chat request (status code and JSON body, no client-side retries)."""
    t0 = time.monotonic()
    r = httpx.post(server.base_url + "/chat/completions", timeout=timeout, json={
        "model": server.model_name, "max_tokens": max_tokens, "temperature": 0.0,
        "messages": [{"role": "user", "content": content}]})
    return r.status_code, r.json(), time.monotonic() - t0


def _kept(t: int, per_frame: int) -> int:
    return expected_kept(t, per_frame, BUDGET, mode="input_only")


def _expected_good(model, clips) -> int:
    frames = read_video_frames(clips["good"])
    hf = hf_video_prompt(model, frames, QUESTION)
    return hf.text_tokens + _kept(*qwen_video_grid(frames))


def _assert_good_request_served(server, model, clips):
    status, body, _ = _post(server, [_video(video_data_url(clips["good"])),
                                     {"type": "text", "text": QUESTION}])
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == _expected_good(model, clips)
    assert server.healthy()


def _hf_multi_media_tokens(model, content_types, videos, images):
    """(text tokens, video tokens per video, image tokens) of one user turn with the given
    media parts, from transformers' processor on the same decoded frames."""
    from hieravid_vllm.testing.hf_reference import _processor

    proc = _processor(str(model))
    msgs = [{"role": "user", "content": [{"type": t} for t in content_types] +
             [{"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    kw = {"videos": list(videos)} if videos else {}
    if images:
        kw["images"] = list(images)
    enc = proc(text=[text], return_tensors="np", **kw)
    ids = np.asarray(enc["input_ids"][0])
    vid = proc.tokenizer.convert_tokens_to_ids(proc.video_token)
    img = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    plain = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_text = len(plain) - plain.count(vid) - plain.count(img)
    per_video = [int(t) * int(h) * int(w) // 4 for t, h, w in enc.get("video_grid_thw", [])]
    assert sum(per_video) == int((ids == vid).sum())
    return n_text, per_video, int((ids == img).sum())


def _new_dumps(debug_dir, before: set) -> list[dict]:
    return input_dumps(debug_dir, exclude=before)


def _dump_names(debug_dir) -> set:
    return {p.name for p in debug_dir.glob("video-*.pt")}


def _corrupt_cases(clips) -> dict[str, tuple[bytes, str, str]]:
    """name -> (data, mime, expected message fragment)."""
    raw = clips["good"].read_bytes()
    flipped = bytearray(raw)
    for i in range(0, len(flipped), 37):  # header and index included
        flipped[i] ^= 0xFF
    return {
        "truncated_mp4": (raw[: len(raw) // 2], "video/mp4", "Could not open video stream"),
        "bit_flipped_mp4": (bytes(flipped), "video/mp4", "Could not open video stream"),
        "png_as_video": (clips["png"].read_bytes(), "video/mp4", "Could not decode the video"),
        "text_as_video": (b"this is plain text, not a video\n" * 20, "video/mp4",
                          "Could not open video stream"),
        "zero_frame_mp4": (clips["zero"].read_bytes(), "video/mp4",
                           "Could not open video stream"),
        # decision (hieravid_vllm/patches/api_server/video_frames.py): a one-frame clip is rejected, not served
        "one_frame_mp4": (clips["one"].read_bytes(), "video/mp4",
                          "needs at least 2 frames per video"),
        "frame_over_pixel_limit": (clips["big"].read_bytes(), "video/mp4",
                                   f"exceed the maximum of {MAX_PIXELS} pixels"),
    }


# ------------------------------------------------------------------------------------------
# bad input: 400 with a message, then the server serves the next request
# ------------------------------------------------------------------------------------------
CORRUPT = ["truncated_mp4", "bit_flipped_mp4", "png_as_video", "text_as_video",
           "zero_frame_mp4", "one_frame_mp4", "frame_over_pixel_limit"]


@pytest.mark.parametrize("case", CORRUPT)
def test_bad_video_gets_400_then_next_request_served(server, model, clips, case):
    data, mime, fragment = _corrupt_cases(clips)[case]
    status, body, secs = _post(server, [_video(_data_url(data, mime)),
                                        {"type": "text", "text": QUESTION}], timeout=60)
    assert status == 400, body
    assert body["error"]["type"] == "BadRequestError"
    assert fragment in body["error"]["message"], body
    assert secs < 30
    _assert_good_request_served(server, model, clips)


def test_unreachable_video_url_fails_fast(server, model, clips):
    port = free_port()  # nothing listens there: connection refused
    url = f"http://127.0.0.1:{port}/x.mp4"
    status, body, secs = _post(server, [_video(url), {"type": "text", "text": QUESTION}])
    assert status == 400, body
    assert f"Could not fetch media from {url}" in body["error"]["message"]
    assert secs < FETCH_TIMEOUT + 5
    _assert_good_request_served(server, model, clips)


def test_video_url_that_never_answers_times_out(server, model, clips):
    # a listening socket that accepts and never replies: the fetch timeout must end it
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/never.mp4"
        status, body, secs = _post(server, [_video(url), {"type": "text", "text": QUESTION}])
    finally:
        stop.set()
        th.join(5)
        for c in held:
            c.close()
        sock.close()
    assert status == 400, body
    assert "timed out" in body["error"]["message"] and url in body["error"]["message"]
    assert FETCH_TIMEOUT - 0.5 <= secs < FETCH_TIMEOUT + 10
    _assert_good_request_served(server, model, clips)


def test_too_many_videos_rejected(server, model, clips):
    url = video_data_url(clips["good"])
    status, body, _ = _post(server, [_video(url)] * 3 + [{"type": "text", "text": QUESTION}])
    assert status == 400, body
    assert "At most 2 video(s)" in body["error"]["message"]
    _assert_good_request_served(server, model, clips)


# ------------------------------------------------------------------------------------------
# limits that sample down instead of rejecting
# ------------------------------------------------------------------------------------------
def test_clip_over_frame_limit_is_sampled_down(server, model, clips, debug_dir):
    before = _dump_names(debug_dir)
    status, body, _ = _post(server, [_video(video_data_url(clips["long"])),
                                     {"type": "text", "text": QUESTION}])
    assert status == 200, body
    frames = read_video_frames(clips["long"])
    assert frames.shape[0] == 64 > MAX_FRAMES
    # what vLLM's Qwen2-VL loader (and transformers) sample: 16 frames, uniformly
    sampled = frames[np.arange(0, 64, 64 / MAX_FRAMES).astype(int)]
    hf = hf_video_prompt(model, sampled, QUESTION)
    t, per_frame = qwen_video_grid(sampled)
    assert t == MAX_FRAMES // 2
    assert body["usage"]["prompt_tokens"] == hf.text_tokens + _kept(t, per_frame)
    dumps = _new_dumps(debug_dir, before)
    assert [tuple(d["features"].shape[:3]) for d in dumps] == [(t, 2, 2)]


# ------------------------------------------------------------------------------------------
# several media in one prompt
# ------------------------------------------------------------------------------------------
_PADS = itertools.count(1)


def _with_trailing_bytes(path, tmp_path, name):
    """Same clip, new bytes (a trailing pad of a length never used before, which the decoder
    ignores): vLLM's caches key media by their bytes, so the server encodes and prunes it
    afresh."""
    p = tmp_path / name
    p.write_bytes(path.read_bytes() + b"\0" * (64 * next(_PADS)))
    return p


def test_two_videos_in_one_prompt(server, model, clips, debug_dir, tmp_path):
    a = _with_trailing_bytes(clips["good"], tmp_path, "a2.mp4")
    b = _with_trailing_bytes(clips["other"], tmp_path, "b2.mp4")
    fa, fb = read_video_frames(a), read_video_frames(b)
    before = _dump_names(debug_dir)
    status, body, _ = _post(server, [_video(video_data_url(a)), _video(video_data_url(b)),
                                     {"type": "text", "text": QUESTION}])
    assert status == 200, body
    n_text, per_video, _ = _hf_multi_media_tokens(model, ["video", "video"], [fa, fb], [])
    ga, gb = qwen_video_grid(fa), qwen_video_grid(fb)
    assert per_video == [ga[0] * ga[1], gb[0] * gb[1]]
    assert body["usage"]["prompt_tokens"] == n_text + _kept(*ga) + _kept(*gb)
    # each video's selection is the core's on its own features
    batched = assert_input_dumps_match_core(debug_dir, 2, exclude=before)
    assert [tuple(d["features"].shape[:3]) for d in batched] == [(ga[0], 2, 2), (gb[0], 2, 3)]

    # video "a" alone (fresh bytes again): same features and the same kept tokens as in the
    # two-video batch; the vision tower sees a different batch, the selection must not care
    a_alone = _with_trailing_bytes(clips["good"], tmp_path, "a3.mp4")
    before = _dump_names(debug_dir)
    status, body, _ = _post(server, [_video(video_data_url(a_alone)),
                                     {"type": "text", "text": QUESTION}])
    assert status == 200, body
    (alone,) = _new_dumps(debug_dir, before)
    torch.testing.assert_close(alone["features"], batched[0]["features"], rtol=1e-4, atol=1e-5)
    assert torch.equal(alone["kept_indices"], batched[0]["kept_indices"])


def test_video_and_image_in_one_prompt(server, model, clips, debug_dir, tmp_path):
    import cv2

    a = _with_trailing_bytes(clips["good"], tmp_path, "a4.mp4")
    fa = read_video_frames(a)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", image[..., ::-1])
    assert ok
    before = _dump_names(debug_dir)
    status, body, _ = _post(server, [
        _video(video_data_url(a)),
        {"type": "image_url", "image_url": {"url": _data_url(png.tobytes(), "image/png")}},
        {"type": "text", "text": QUESTION}])
    assert status == 200, body
    n_text, per_video, n_image = _hf_multi_media_tokens(model, ["video", "image"], [fa],
                                                        [image])
    assert n_image == (56 // 28) * (84 // 28)  # images are never pruned
    assert body["usage"]["prompt_tokens"] == n_text + _kept(*qwen_video_grid(fa)) + n_image
    assert len(_new_dumps(debug_dir, before)) == 1  # only the video went through HieraVid
    _assert_good_request_served(server, model, clips)
