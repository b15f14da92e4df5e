"""In-LLM stages (full mode, the default) on a real vLLM OpenAI server, tiny models.

Oracle: :class:`hieravid_vllm.reference.HieraVidReference` (transformers, float32, the same
stage pruning written independently of the vLLM path).

* first-token logprobs of the server equal the reference's log-softmax, and the tokens kept at
  every stage (server dumps through ``HIERAVID_DEBUG_DIR``) equal the reference's, at budgets
  0.3 (server budget) and 0.1 (per-request budget on the same server), for all three
  architectures (0.3);
* greedy answers: alone == inside a mixed batch of 8 (videos and text) == asked again with the
  prefix cache warm == on a server with a KV cache so small that requests are preempted and
  recomputed; text-only requests in the batch are unaffected;
* a prompt whose video and question can never be prefilled in one step is a 400 naming
  ``--max-num-batched-tokens``, and the server keeps serving.
"""
from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import (answer, chat, chat_messages, kv_cache_bytes,
                                          video_messages)
from hieravid_vllm.testing.stage_check import FPS, QUESTION, TOP, check_against_reference
from hieravid_vllm.testing.video import write_scene_video

pytestmark = [pytest.mark.vllm, pytest.mark.vllm033]  # vllm033: also run on vLLM 0.33

BUDGET = 0.3
RESULTS: dict = {}


@pytest.fixture(scope="module")
def videos(make_videos):
    return make_videos({"a": dict(num_frames=24, width=112, height=112, seed=5),
                        "b": dict(num_frames=16, width=140, height=112, num_scenes=2, seed=6)})


# -------------------------------------------------------------------------------------------
class TestQwen25Stages:
    @pytest.fixture(scope="class")
    def server(self, model, debug_dir, start_server):
        s = start_server(model, "qwen25-stages",
                         ["--hieravid-budget", str(BUDGET), "--hieravid-allow-request-budget",
                          "--trust-request-mm-kwargs", "--max-num-seqs", "16",
                          "--max-logprobs", str(TOP)],
                         env={"HIERAVID_DEBUG_DIR": str(debug_dir)},
                         max_num_batched_tokens=1024)
        yield s
        s.stop()

    def test_logits_and_stages_match_reference(self, server, videos, debug_dir):
        check_against_reference(server, "qwen2_5_vl", videos["a"], BUDGET, debug_dir)

    def test_low_budget_matches_reference(self, server, videos, debug_dir):
        check_against_reference(server, "qwen2_5_vl", videos["b"], 0.1, debug_dir,
                                 extra_body={"mm_processor_kwargs": {"hieravid_budget": 0.1}})

    def test_greedy_alone_batch_prefix_cache(self, server, videos):
        jobs = []
        for i in range(8):
            if i % 2 == 0:
                jobs.append(("video", "ab"[i // 2 % 2], QUESTION if i < 4 else "Describe it."))
            else:
                jobs.append(("text", None, f"Tell me a short story number {i}."))

        def run(job):
            kind, key, q = job
            msgs = video_messages(videos[key], q) if kind == "video" else chat_messages(q)
            return answer(server, msgs, max_tokens=12)

        alone = {job: run(job) for job in jobs}
        with cf.ThreadPoolExecutor(8) as ex:
            batched = list(ex.map(run, jobs))
        for job, got in zip(jobs, batched):
            assert got == alone[job], job
        # asked again: the text before the video may come from the prefix cache, the video
        # part (question-dependent in later stages) is recomputed -- same answers
        hits0 = server.metric("vllm:prefix_cache_hits_total")
        again = [run(job) for job in jobs if job[0] == "video"]
        assert again == [alone[job] for job in jobs if job[0] == "video"]
        assert server.metric("vllm:prefix_cache_hits_total") >= hits0
        RESULTS["alone"] = alone

    def test_prompt_too_long_for_one_step_is_400(self, server, videos, tmp_path):
        # ~1600 prompt tokens: within --max-model-len 4096, over --max-num-batched-tokens 1024
        long = write_scene_video(tmp_path / "long.mp4", num_frames=96, width=224, height=224,
                                 fps=FPS, seed=9).path
        with pytest.raises(openai.BadRequestError) as e:
            chat(server, video_messages(long, QUESTION), max_tokens=2)
        assert "--max-num-batched-tokens" in str(e.value)
        assert answer(server, video_messages(videos["b"], QUESTION), 2)[0] is not None


class TestQwen25DeviceCounts:
    """``HIERAVID_BOUNDARY_COUNTS=device``: the sync-free boundary (Eq. 4-5 counts on the
    device, the segment lengths kept there between boundaries) in the real engine, on CPU
    tensors: the same logits and kept tokens as the reference, and the same answers alone
    and with both videos in one step (a boundary selecting for two videos at once)."""

    @pytest.fixture(scope="class")
    def server(self, model, tmp_path_factory, start_server):
        d = tmp_path_factory.mktemp("debug-device-counts")
        s = start_server(model, "qwen25-device-counts",
                         ["--hieravid-budget", str(BUDGET), "--max-num-seqs", "8",
                          "--max-logprobs", str(TOP)],
                         env={"HIERAVID_DEBUG_DIR": str(d),
                              "HIERAVID_BOUNDARY_COUNTS": "device"},
                         max_num_batched_tokens=1024)
        s.debug_dir = d
        yield s
        s.stop()

    def test_logits_stages_and_batch(self, server, videos):
        check_against_reference(server, "qwen2_5_vl", videos["a"], BUDGET, server.debug_dir)
        jobs = [("a", QUESTION), ("b", QUESTION), ("a", "Describe it."), ("b", "Describe it.")]

        def run(job):
            return answer(server, video_messages(videos[job[0]], job[1]), max_tokens=12)

        alone = {job: run(job) for job in jobs}
        with cf.ThreadPoolExecutor(4) as ex:
            assert list(ex.map(run, jobs)) == [alone[j] for j in jobs]
        # the worker took the sync-free path (logged at its first boundary)
        assert "compute their Eq. 4-5 counts on the device" in server.log_path.read_text(
            errors="replace")


class TestQwen25Preemption:
    """A KV cache of a few blocks: room for 512 tokens of the model's KV spec (1 MiB for the
    tiny model: 64 blocks of 32 tokens per 1-layer stage group; one request grows to ~50 of
    them over 200 decoded tokens): concurrent video requests are preempted and recomputed."""

    @pytest.fixture(scope="class")
    def server(self, model, start_server):
        s = start_server(model, "qwen25-preempt",
                         ["--hieravid-budget", str(BUDGET), "--max-num-seqs", "8",
                          "--block-size", "32"],
                         kv_cache_memory_bytes=kv_cache_bytes(model, 512), max_model_len=448,
                         max_num_batched_tokens=512)
        yield s
        s.stop()

    def test_preempted_requests_answer_as_alone(self, server, videos):
        jobs = [("video", "a", QUESTION), ("video", "b", QUESTION), ("video", "a", "Describe it."),
                ("video", "b", "Describe it."), ("text", None, "Tell me a short story.")]

        def run(job):
            kind, key, q = job
            msgs = video_messages(videos[key], q) if kind == "video" else chat_messages(q)
            r = chat(server, msgs, max_tokens=200, extra_body={"ignore_eos": True})
            return r.choices[0].message.content, r.usage.prompt_tokens

        alone = {job: run(job) for job in jobs}
        p0 = server.metric("vllm:num_preemptions_total")
        # the API server decodes each clip in turn: on a loaded machine the requests can reach
        # the engine one after another and never need the KV cache at once, so the batch is
        # sent again (at most 3 times) until vLLM has preempted; every answer is compared
        for batch in range(3):
            with cf.ThreadPoolExecutor(8) as ex:
                got = list(ex.map(run, jobs + jobs))
            for job, g in zip(jobs + jobs, got):
                assert g == alone[job], (batch, job)
            if server.metric("vllm:num_preemptions_total") > p0:
                break
        assert server.metric("vllm:num_preemptions_total") > p0, \
            "no preemption happened in 3 batches"
        # the first answers agree with the server with a large KV cache (first class)
        for job, (text, tokens) in alone.items():
            if job in RESULTS.get("alone", {}):
                want_text, want_tokens = RESULTS["alone"][job]
                assert tokens == want_tokens


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_other_architectures_match_reference(arch, videos, tmp_path_factory, start_server):
    debug_dir = tmp_path_factory.mktemp(f"hv-stages-{arch}")
    server = start_server(build_tiny_model(arch), f"{arch}-stages",
                          ["--hieravid-budget", str(BUDGET), "--max-logprobs", str(TOP)],
                          env={"HIERAVID_DEBUG_DIR": str(debug_dir)})
    try:
        # LLaVA-OV: vLLM's and transformers' vision towers differ by float noise, which can
        # flip near-tied greedy-DPP picks (checked to be near-ties, see the helper)
        check_against_reference(server, arch, videos["b"], BUDGET, debug_dir,
                                 strict=arch != "llava_onevision")
    finally:
        server.stop()
