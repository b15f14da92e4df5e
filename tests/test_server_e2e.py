"""End to end: vLLM's OpenAI server serves each tiny architecture a base64 mp4 video.

One server per architecture (module-scoped, parametrised: pytest starts them one after
another and stops each before the next). ``usage.prompt_tokens`` must equal what
transformers' processor produces for the same decoded frames: the expanded video tokens plus
the chat template's text tokens. The clip is written at the fps the server samples with
(``--media-io-kwargs {"video": {"fps": 8}}``), so both sides see every frame.
"""
from __future__ import annotations

import pytest

from hieravid_vllm.testing.hf_reference import (expected_video_tokens, hf_text_prompt_tokens,
                                                hf_video_prompt)
from hieravid_vllm.testing.models import ARCHS, build_tiny_model, model_info
from hieravid_vllm.testing.server import VLLMServer, video_chat
from hieravid_vllm.testing.video import read_video_frames, write_scene_video

pytestmark = pytest.mark.vllm

FPS = 8
NUM_FRAMES = 16
SIZE = 224
QUESTION = "What happens in this video?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e-video") / "scenes.mp4"
    video = write_scene_video(path, num_frames=NUM_FRAMES, width=SIZE, height=SIZE, fps=FPS,
                              num_scenes=2, seed=0)
    frames = read_video_frames(video.path)
    assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3)
    return video, frames


@pytest.fixture(scope="module", params=ARCHS)
def served(request, start_server, clip):
    arch = request.param
    model_dir = build_tiny_model(arch)
    # raises VLLMServerError naming the root cause if the server does not come up
    server = start_server(model_dir, f"e2e-{arch}", video_fps=FPS,
                          allowed_local_media_path=clip[0].path.parent)
    try:
        yield arch, model_dir, server
    finally:
        server.stop()


def _ctx(server: VLLMServer) -> str:
    return f"\nserver log tail:\n{server.log_tail(40)}"


def test_video_chat_prompt_tokens_match_hf_processor(served, clip):
    arch, model_dir, server = served
    video, frames = clip
    ref = hf_video_prompt(model_dir, frames, QUESTION)
    # the processor's count is also the closed form for this clip
    assert ref.video_tokens == expected_video_tokens(
        arch, NUM_FRAMES, SIZE, SIZE, model_info(model_dir)["llava_tokens_per_frame"])

    client = server.client()
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video.data_url()}},
        {"type": "text", "text": QUESTION},
    ]}]
    response = client.chat.completions.with_raw_response.create(
        model=server.model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0)
    assert response.status_code == 200, _ctx(server)
    completion = response.parse()
    usage = completion.usage
    print(f"{arch}: prompt_tokens={usage.prompt_tokens} (video {ref.video_tokens} + text "
          f"{ref.text_tokens}), answer={completion.choices[0].message.content!r}")
    assert usage.prompt_tokens == ref.prompt_tokens, _ctx(server)
    assert usage.prompt_tokens == ref.video_tokens + ref.text_tokens
    assert usage.completion_tokens == MAX_TOKENS
    assert completion.choices[0].message.content.strip()


def test_file_url_and_helper_give_same_count(served, clip):
    arch, model_dir, server = served
    video, frames = clip
    ref = hf_video_prompt(model_dir, frames, QUESTION)
    completion = video_chat(server, video.path.resolve().as_uri(), QUESTION, max_tokens=2)
    assert completion.usage.prompt_tokens == ref.prompt_tokens, _ctx(server)


def test_text_only_chat(served):
    arch, model_dir, server = served
    completion = server.client().chat.completions.create(
        model=server.model_name, max_tokens=4, temperature=0.0,
        messages=[{"role": "user", "content": "Say hello."}])
    assert completion.usage.prompt_tokens == hf_text_prompt_tokens(model_dir, "Say hello.")
