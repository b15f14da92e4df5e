"""A rejected request must not break the next one (real servers, tiny Qwen2.5-VL).

Each case sends a failing request first, then the valid request a client would send next with
the same video; the valid one must be a 200 whose greedy answer and prompt-token count equal
those of the same video answered before any failure. That reference is answered by the same
server, at the start of the module, with a client-given ``uuid`` on the video part: vLLM then
keys the processed video by that uuid instead of the video's content hash
(``MultiModalInputs.get_mm_hashes``), so nothing of the reference is cached (in either cache
or as a KV prefix) under the key the failing and the valid request use -- as on a fresh
server, without starting one per reference (two servers instead of five; the module runs on
vLLM 0.32 and 0.33).

* rejected after the video was processed (``max_tokens`` -1 or 0, a second video that does
  not decode, a client that disconnects at once): without :mod:`hieravid_vllm.patches.api_server.mm_sender_cache`
  the API server's shadow cache (P0) believes the engine (P1) holds the video, sends its hash
  only, and the engine's cache miss ("P0/P1 cache drift") becomes a 500; checked with vLLM's
  default ``lru`` cache type (full mode) and with ``shm`` (input_only mode);
* ``file://`` on a server without ``--allowed-local-media-path``: a 400 with vLLM's message
  (was a 500), and outside the allowed folder a 400;
* a misspelled HieraVid key in ``mm_processor_kwargs``: a 400 naming ``hieravid_budget``
  (was a 200 at the server's budget).
"""
from __future__ import annotations

import base64
import json
import socket

import httpx
import pytest

from hieravid_vllm.testing.expect import expected_kept, qwen_video_grid
from hieravid_vllm.testing.hf_reference import hf_video_prompt
from hieravid_vllm.testing.video import read_video_frames, video_data_url

pytestmark = [pytest.mark.vllm, pytest.mark.vllm033]  # vllm033: also run on vLLM 0.33

BUDGET = 0.3
QUESTION = "What happens in this video?"
FLAGS = ["--hieravid-budget", str(BUDGET), "--hieravid-allow-request-budget",
         "--trust-request-mm-kwargs", "--limit-mm-per-prompt", '{"video": 2}']


@pytest.fixture(scope="module")
def videos(make_videos):
    # one clip per case, so that every case starts from a video no server has cached
    names = ["max_tokens_neg", "max_tokens_zero", "second_video_bad", "disconnect",
             "misspelled", "shm", "file", "other"]
    return make_videos({n: dict(num_frames=8, width=56, height=84, num_scenes=2, seed=40 + i)
                        for i, n in enumerate(names)})


def _body(server, content, max_tokens=6, **extra) -> dict:
    return {"model": server.model_name, "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": content}], **extra}


def _content(*urls, uuid=None) -> list:
    parts = [{"type": "video_url", "video_url": {"url": u}} for u in urls]
    if uuid is not None:
        for i, part in enumerate(parts):
            part["uuid"] = f"{uuid}-{i}"
    return parts + [{"type": "text", "text": QUESTION}]


def _post(server, content, max_tokens=6, **extra):
    r = httpx.post(server.base_url + "/chat/completions", timeout=120,
                   json=_body(server, content, max_tokens, **extra))
    return r.status_code, r.json()


def _valid(server, video, budget=None, uuid=None):
    extra = {"mm_processor_kwargs": {"hieravid_budget": budget}} if budget else {}
    status, body = _post(server, _content(video_data_url(video), uuid=uuid), **extra)
    assert status == 200, body
    return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]


def _references(server, videos, keys) -> dict:
    """``{(video, budget): (answer, prompt tokens)}`` answered by ``server`` under a uuid of
    their own (see the module docstring); call before the server sees any failure."""
    return {(name, budget): _valid(server, videos[name], budget, uuid=f"reference-{name}-{budget}")
            for name, budget in keys}


@pytest.fixture(scope="module")
def server(model, start_server, videos):
    """The ``lru`` server (full mode, no ``--allowed-local-media-path``) with its references:
    every test that sends it a failure asks for this fixture, so they are answered first."""
    s = start_server(model, "rejected-lru", FLAGS)
    try:
        s.fresh = _references(s, videos, [(n, None) for n in (
            "max_tokens_neg", "max_tokens_zero", "second_video_bad", "disconnect", "misspelled",
            "file")] + [("misspelled", 0.1)])
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def shm_server(model, start_server, videos, tmp_path_factory):
    """``--mm-processor-cache-type shm`` (input_only mode: full mode refuses it at start-up,
    see test_stages_unit.py) with ``--allowed-local-media-path``, and its references."""
    allowed = tmp_path_factory.mktemp("allowed-media")
    s = start_server(model, "rejected-shm", FLAGS + [
        "--hieravid-mode", "input_only", "--mm-processor-cache-type", "shm"],
        allowed_local_media_path=allowed)
    try:
        s.allowed, s.fresh = allowed, _references(s, videos, [("shm", None), ("other", None)])
        yield s
    finally:
        s.stop()


def _expected_prompt_tokens(model, video, budget=BUDGET, mode="full") -> int:
    frames = read_video_frames(video)
    hf = hf_video_prompt(model, frames, QUESTION)
    return hf.text_tokens + expected_kept(*qwen_video_grid(frames), budget, mode=mode)


@pytest.mark.parametrize("case,max_tokens", [("max_tokens_neg", -1), ("max_tokens_zero", 0)])
def test_rejected_sampling_params_then_same_video(server, videos, model, case, max_tokens):
    status, body = _post(server, _content(video_data_url(videos[case])), max_tokens)
    assert status == 400 and "max_tokens" in body["error"]["message"], body
    got = _valid(server, videos[case])
    assert got == server.fresh[(case, None)]
    assert got[1] == _expected_prompt_tokens(model, videos[case])


def test_second_video_fails_then_first_alone(server, videos):
    good = video_data_url(videos["second_video_bad"])
    raw = videos["other"].read_bytes()
    bad = "data:video/mp4;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    status, body = _post(server, _content(good, bad))
    assert status == 400, body
    assert _valid(server, videos["second_video_bad"]) == server.fresh[("second_video_bad", None)]


def test_client_disconnects_at_once_then_same_video(server, videos):
    """The request is read and the connection dropped before any answer: whether or not it
    reached the engine, the next request with that video is served."""
    payload = json.dumps(_body(server, _content(video_data_url(videos["disconnect"])),
                               stream=True)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
    assert _valid(server, videos["disconnect"]) == server.fresh[("disconnect", None)]


def test_misspelled_budget_key_is_400_then_served(server, videos, model):
    url = video_data_url(videos["misspelled"])
    for key in ("hieravid_budgte", "hieravid-budget", "HieraVid_Budget", "hieravid"):
        status, body = _post(server, _content(url), mm_processor_kwargs={key: 0.1})
        assert status == 400, (key, body)
        msg = body["error"]["message"]
        assert "hieravid_budget" in msg and key in msg, msg
    got = _valid(server, videos["misspelled"], 0.1)
    assert got == server.fresh[("misspelled", 0.1)]
    assert got[1] == _expected_prompt_tokens(model, videos["misspelled"], 0.1)
    # the budget reached the selection: the server's own budget keeps more
    assert server.fresh[("misspelled", None)][1] > got[1]


def test_file_url_without_allowed_path_is_400(server, videos):
    status, body = _post(server, _content(videos["file"].resolve().as_uri()))
    assert status == 400, body
    assert "Cannot load local files without `--allowed-local-media-path`" in \
        body["error"]["message"]
    assert _valid(server, videos["file"]) == server.fresh[("file", None)]


def test_file_url_outside_allowed_path_is_400(shm_server, videos, model):
    status, body = _post(shm_server, _content(videos["other"].resolve().as_uri()))
    assert status == 400, body
    assert "must be a subpath of `--allowed-local-media-path" in body["error"]["message"]
    inside = shm_server.allowed / "inside.mp4"
    inside.write_bytes(videos["other"].read_bytes())
    status, body = _post(shm_server, _content(inside.as_uri()))
    assert status == 200, body
    got = body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]
    assert got == shm_server.fresh[("other", None)]
    assert got[1] == _expected_prompt_tokens(model, videos["other"], mode="input_only")


def test_shm_cache_type_rejected_then_same_video(shm_server, videos, model):
    """``--mm-processor-cache-type shm``: the rejected request leaves nothing behind either."""
    status, body = _post(shm_server, _content(video_data_url(videos["shm"])), -1)
    assert status == 400, body
    got = _valid(shm_server, videos["shm"])
    assert got == shm_server.fresh[("shm", None)]
    assert got[1] == _expected_prompt_tokens(model, videos["shm"], mode="input_only")
