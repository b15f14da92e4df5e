"""HieraVid plugin end to end: real vLLM OpenAI servers on tiny local models, real mp4s.

Checks (issue: vLLM plugin, input stage):
* ``usage.prompt_tokens`` = text tokens (HF processor) + the schedule's kept count;
* the tokens the server keeps are the ones the core selects from the same vision features
  (server-side dumps through ``HIERAVID_DEBUG_DIR``), and those features equal the vision
  features transformers computes for the same frames;
* greedy answers: alone == inside a batch of 8 mixed video/text requests; prefix caching on
  (same video, second question, video served from the cache) == prefix caching off with
  chunked prefill in small steps.
Servers start one class at a time (class-scoped fixtures) to bound memory.

These are the input stage's guarantees, so the servers run ``--hieravid-mode input_only``
(all pruning before the LLM): there a video's KV does not depend on the question, so a second
question reuses the video from the prefix cache and prefill may be chunked anywhere. The
default full mode (in-LLM stages) is tested in ``test_stages_engine.py``.
"""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.pipeline import prune_input_stage
from hieravid_vllm.testing.expect import (assert_input_dumps_match_core, expected_kept,
                                          qwen_video_grid)
from hieravid_vllm.testing.hf_reference import hf_video_prompt
from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import answer, chat_messages, video_messages
from hieravid_vllm.testing.video import read_video_frames

pytestmark = pytest.mark.vllm

BUDGET = 0.3
# Two questions sharing a long common part after the video, so that a second question about
# the same video is served with the whole video from the prefix cache (blocks of 32 tokens).
COMMON = ("Please watch the whole clip carefully from the first frame to the last frame and "
          "pay attention to every moving shape, every colour and every change of scene. ")
QUESTIONS = [COMMON + "What happens first?", COMMON + "How many scenes are there?"]
RESULTS: dict = {}


@pytest.fixture(scope="module")
def videos(make_videos):
    return make_videos({"a": dict(num_frames=32, width=112, height=112, seed=1),
                        "b": dict(num_frames=16, width=112, height=140, num_scenes=2, seed=2)})


def _kept(frames: np.ndarray) -> int:
    return expected_kept(*qwen_video_grid(frames), BUDGET)


# -------------------------------------------------------------------------------------------
class TestQwen25Pruned:
    @pytest.fixture(scope="class")
    def server(self, model, debug_dir, start_server):
        s = start_server(model, "qwen25-pruned",
                   ["--hieravid-budget", str(BUDGET), "--hieravid-mode", "input_only",
                    "--max-num-seqs", "16"],
                   env={"HIERAVID_DEBUG_DIR": str(debug_dir)})
        yield s
        s.stop()

    def test_prompt_tokens_are_text_plus_kept(self, server, model, videos):
        for key in ("a", "b"):
            frames = read_video_frames(videos[key])
            hf = hf_video_prompt(model, frames, QUESTIONS[0])
            t, per_frame = qwen_video_grid(frames)
            assert hf.video_tokens == t * per_frame
            kept = _kept(frames)
            assert kept < hf.video_tokens
            _, prompt_tokens = answer(server, video_messages(videos[key], QUESTIONS[0]))
            assert prompt_tokens == hf.text_tokens + kept

    def test_kept_tokens_are_the_core_selection_on_hf_features(self, server, model, videos,
                                                               debug_dir):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        # video "a" was served by the test above (vLLM's encoder cache serves repeats)
        answer(server, video_messages(videos["a"], QUESTIONS[0]))
        dumps = assert_input_dumps_match_core(debug_dir, 2)
        # independent features: transformers' vision tower on the same decoded frames
        proc = AutoProcessor.from_pretrained(model)
        frames = read_video_frames(videos["a"])
        enc = proc.video_processor(videos=[frames], return_tensors="pt")
        hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model,
                                                                      dtype=torch.float32)
        with torch.no_grad():
            feats = hf_model.model.get_video_features(enc["pixel_values_videos"],
                                                      enc["video_grid_thw"])
        feats = feats[0] if isinstance(feats, (tuple, list)) else getattr(
            feats, "pooler_output", feats)
        if isinstance(feats, (tuple, list)):
            feats = torch.cat(list(feats))
        t, h, w = enc["video_grid_thw"][0].tolist()
        feats = feats.reshape(t, h // 2, w // 2, -1)
        served = [d for d in dumps if d["features"].shape == feats.shape]
        assert served, [tuple(d["features"].shape) for d in dumps]
        served = served[-1]["features"]
        torch.testing.assert_close(served, feats.float(), rtol=1e-3, atol=1e-4)
        ref = prune_input_stage(feats.float(), None,
                                HieraVidConfig(budget=BUDGET, mode="input_only"), num_layers=4)
        assert torch.equal(ref.kept_indices, [d for d in dumps if d["features"].shape ==
                                              feats.shape][-1]["kept_indices"])

    def test_greedy_alone_equals_mixed_batch(self, server, videos):
        alone = {}
        jobs = []
        for i in range(8):
            if i % 2 == 0:
                key, q = ("a", "b")[i // 2 % 2], QUESTIONS[i // 4]
                jobs.append(("video", key, q))
            else:
                jobs.append(("text", None, f"Tell me a short story number {i}."))

        def run(job):
            kind, key, q = job
            msgs = video_messages(videos[key], q) if kind == "video" else chat_messages(q)
            return answer(server, msgs)

        for job in jobs:
            alone[job] = run(job)
        with cf.ThreadPoolExecutor(8) as ex:
            batched = list(ex.map(run, jobs))
        for job, got in zip(jobs, batched):
            assert got == alone[job], job
        RESULTS["qwen25_alone"] = {job: alone[job] for job in jobs if job[0] == "video"}

    def test_prefix_cached_second_question(self, server, videos):
        # first question warms the prefix cache, the second reuses the video's blocks
        first = answer(server, video_messages(videos["a"], QUESTIONS[0]))
        hits0 = server.metric("vllm:prefix_cache_hits_total")
        second = answer(server, video_messages(videos["a"], QUESTIONS[1]))
        hits = server.metric("vllm:prefix_cache_hits_total") - hits0
        # the whole video (and the text before it) came from the cache
        assert hits >= _kept(read_video_frames(videos["a"])) + 10
        RESULTS["qwen25_prefix"] = {"first": first, "second": second}

    def test_metrics_exported(self, server):
        before = server.metric("hieravid_visual_tokens_before_total")
        after = server.metric("hieravid_visual_tokens_after_total")
        assert 0 < after < before


class TestQwen25NoPrefixCacheChunked:
    """Same requests with prefix caching off and chunked prefill in 48-token steps."""

    @pytest.fixture(scope="class")
    def server(self, model, start_server):
        s = start_server(model, "qwen25-chunked",
                   ["--hieravid-budget", str(BUDGET), "--hieravid-mode", "input_only",
                    "--no-enable-prefix-caching",
                    "--enable-chunked-prefill", "--max-num-seqs", "4",
                    "--max-num-batched-tokens", "48"])  # the last flag wins in argparse
        yield s
        s.stop()

    def test_same_answers(self, server, videos):
        assert "qwen25_alone" in RESULTS and "qwen25_prefix" in RESULTS, \
            "run with TestQwen25Pruned first"
        for (kind, key, q), want in RESULTS["qwen25_alone"].items():
            assert answer(server, video_messages(videos[key], q)) == want
        for which, q in (("first", QUESTIONS[0]), ("second", QUESTIONS[1])):
            assert answer(server, video_messages(videos["a"], q)) == \
                RESULTS["qwen25_prefix"][which]


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_other_architectures(arch, videos, tmp_path_factory, start_server):
    model = build_tiny_model(arch)
    debug_dir = tmp_path_factory.mktemp(f"hv-debug-{arch}")
    frames = read_video_frames(videos["b"])
    hf = hf_video_prompt(model, frames, QUESTIONS[0])
    server = start_server(model, f"{arch}-pruned",
                          ["--hieravid-budget", str(BUDGET), "--hieravid-mode", "input_only"],
                          env={"HIERAVID_DEBUG_DIR": str(debug_dir)})
    try:
        text, prompt_tokens = answer(server, video_messages(videos["b"], QUESTIONS[0]))
    finally:
        server.stop()
    dumps = assert_input_dumps_match_core(debug_dir, 1)
    T, H, W, _ = dumps[-1]["features"].shape
    extra = 1 if arch == "llava_onevision" else 0  # LLaVA-OV's newline token is never pruned
    assert hf.video_tokens == T * H * W + extra
    kept = expected_kept(T, H * W, BUDGET)
    assert prompt_tokens == hf.text_tokens + kept + extra
    assert isinstance(text, str)
