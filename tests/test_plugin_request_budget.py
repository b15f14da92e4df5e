"""Per-request HieraVid budget (``mm_processor_kwargs: {"hieravid_budget": B}``) on a real
vLLM server (tiny Qwen2.5-VL) whose operator allows it
(``--hieravid-allow-request-budget --trust-request-mm-kwargs``, server budget 0.3).

* ``usage.prompt_tokens`` = text tokens (HF processor) + the schedule's kept count at the
  request's budget, for two request budgets and the server's, on one server;
* the tokens the worker kept (``HIERAVID_DEBUG_DIR`` dumps) are the core's selection on the
  same features at that request's budget (the worker pruned at the budget the prompt
  processor counted with);
* the same video at another budget shares no prefix-cache blocks from the video on (vLLM's
  ``vllm:prefix_cache_hits_total``), while a repeat at the same budget does;
* bad values are a 400 naming ``hieravid_budget`` and the server keeps serving.
The refusal on a server that does not allow it is in ``test_plugin_metrics.py`` (its server
is such a server); the start-up check of the flag pair is in ``test_plugin_options.py``.
"""
from __future__ import annotations


import openai
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.pipeline import prune_input_stage
from hieravid_vllm.testing.hf_reference import hf_video_prompt
from hieravid_vllm.testing.expect import TINY_LAYERS as LAYERS
from hieravid_vllm.testing.expect import expected_kept, input_dumps, qwen_video_grid
from hieravid_vllm.testing.server import chat, video_messages
from hieravid_vllm.testing.video import read_video_frames

pytestmark = [pytest.mark.vllm, pytest.mark.vllm033]  # vllm033: also run on vLLM 0.33

SERVER_BUDGET = 0.3
QUESTION = ("Watch the whole clip from the first frame to the last and describe every moving "
            "shape, every colour and every change of scene that you can see in it.")


@pytest.fixture(scope="module")
def videos(make_videos):
    return make_videos({"a": dict(num_frames=16, width=112, height=140, num_scenes=2, seed=3),
                        "b": dict(num_frames=12, width=140, height=112, num_scenes=2, seed=4)})


@pytest.fixture(scope="module")
def server(model, debug_dir, start_server):
    s = start_server(model, "request-budget", [
        "--hieravid-budget", str(SERVER_BUDGET), "--hieravid-mode", "input_only",
        "--hieravid-allow-request-budget", "--trust-request-mm-kwargs"],
        env={"HIERAVID_DEBUG_DIR": str(debug_dir)})
    yield s
    s.stop()


def _chat(server, path, budget=None, **extra):
    """Prompt tokens of one greedy request about ``path`` (at ``budget`` if given)."""
    if budget is not None:
        extra["mm_processor_kwargs"] = {"hieravid_budget": budget}
    return chat(server, video_messages(path, QUESTION), max_tokens=2,
                extra_body=extra or None).usage.prompt_tokens


# -------------------------------------------------------------------------------------------
ORDER = (None, 0.2, 0.5)  # requests of the first test, in this order


def test_prompt_tokens_follow_the_request_budget(server, model, videos):
    frames = read_video_frames(videos["a"])
    hf = hf_video_prompt(model, frames, QUESTION)
    t, per_frame = qwen_video_grid(videos["a"])
    assert hf.video_tokens == t * per_frame
    got = {}
    for budget in ORDER:
        got[budget] = _chat(server, videos["a"], budget)
        want = hf.text_tokens + expected_kept(t, per_frame, budget or SERVER_BUDGET)
        assert got[budget] == want, budget
    assert len(set(got.values())) == len(ORDER)


def test_worker_pruned_at_the_request_budget(server, videos, debug_dir):
    t, per_frame = qwen_video_grid(videos["a"])
    dumps = input_dumps(debug_dir)
    dumps = [d for d in dumps if d["features"].shape[:3] == (t, 140 // 28, 112 // 28)]
    # one encoder run per budget: the three requests did not share an encoder-cache entry
    assert len(dumps) == len(ORDER)
    for d, budget in zip(dumps, ORDER):
        budget = budget or SERVER_BUDGET
        assert d["config"]["budget"] == budget
        ref = prune_input_stage(d["features"], None,
                                HieraVidConfig(budget=budget, mode="input_only"),
                                num_layers=LAYERS)
        assert torch.equal(ref.kept_indices, d["kept_indices"]), budget
        assert d["kept_indices"].numel() == expected_kept(t, per_frame, budget)
    torch.testing.assert_close(dumps[1]["features"], dumps[0]["features"])


def test_other_budget_shares_no_cached_video_blocks(server, model, videos):
    t, per_frame = qwen_video_grid(videos["b"])
    hf = hf_video_prompt(model, read_video_frames(videos["b"]), QUESTION)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    before_video = len(tok(hf.text.split("<|vision_start|>")[0] + "<|vision_start|>",
                           add_special_tokens=False)["input_ids"])
    _chat(server, videos["b"], 0.2)
    h0 = server.metric("vllm:prefix_cache_hits_total")
    _chat(server, videos["b"], 0.5)  # same video and text, other budget
    h1 = server.metric("vllm:prefix_cache_hits_total")
    _chat(server, videos["b"], 0.5)  # same budget again: the video comes from the cache
    h2 = server.metric("vllm:prefix_cache_hits_total")
    assert h1 - h0 <= before_video
    assert h2 - h1 >= before_video + expected_kept(t, per_frame, 0.5)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "abc", "0.2", True, None, [0.2]])
def test_bad_budget_is_400_and_server_keeps_serving(server, model, videos, value):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, videos["a"], mm_processor_kwargs={"hieravid_budget": value})
    assert e.value.status_code == 400
    assert "hieravid_budget" in str(e.value), str(e.value)
    t, per_frame = qwen_video_grid(videos["a"])
    frames = read_video_frames(videos["a"])
    text = hf_video_prompt(model, frames, QUESTION).text_tokens
    assert _chat(server, videos["a"], 0.2) == text + expected_kept(t, per_frame, 0.2)
