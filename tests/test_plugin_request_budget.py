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
from hieravid_vllm.core.schedule import build_schedule
from hieravid_vllm.testing.hf_reference import hf_video_prompt
from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import VLLMServer
from hieravid_vllm.testing.video import read_video_frames, video_data_url, write_scene_video

pytestmark = pytest.mark.vllm

FPS = 8.0
SERVER_BUDGET = 0.3
LAYERS = 4  # the tiny model's LLM layers
QUESTION = ("Watch the whole clip from the first frame to the last and describe every moving "
            "shape, every colour and every change of scene that you can see in it.")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("qwen2_5_vl")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    a = write_scene_video(d / "a.mp4", num_frames=16, width=112, height=140, fps=FPS,
                          num_scenes=2, seed=3)
    b = write_scene_video(d / "b.mp4", num_frames=12, width=140, height=112, fps=FPS,
                          num_scenes=2, seed=4)
    return {"a": a.path, "b": b.path}


@pytest.fixture(scope="module")
def debug_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hv-debug")


@pytest.fixture(scope="module")
def server(model, debug_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "request-budget.log"
    s = VLLMServer(model, video_fps=FPS, log_path=log, max_model_len=4096,
                   env={"HIERAVID_DEBUG_DIR": str(debug_dir)},
                   extra_args=["--hieravid-budget", str(SERVER_BUDGET),
                               "--hieravid-mode", "input_only",
                               "--hieravid-allow-request-budget",
                               "--trust-request-mm-kwargs"]).start()
    yield s
    s.stop()


def _chat(server, path, budget=None, **extra):
    if budget is not None:
        extra["mm_processor_kwargs"] = {"hieravid_budget": budget}
    r = server.client().chat.completions.create(
        model=server.model_name, max_tokens=2, temperature=0.0, extra_body=extra or None,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_data_url(path)}},
            {"type": "text", "text": QUESTION}]}])
    return r.usage.prompt_tokens


def _grid(path):
    f = read_video_frames(path)
    return (f.shape[0] + 1) // 2, (f.shape[1] // 28) * (f.shape[2] // 28)


def _kept(budget, t, per_frame):
    cfg = HieraVidConfig(budget=budget, mode="input_only")
    return build_schedule(cfg, t * per_frame, LAYERS, max_merge=(t - 1) * per_frame).input_target


def _prefix_hits(server) -> float:
    text = server.metrics_text()
    return sum(float(l.split()[-1]) for l in text.splitlines()
               if l.startswith("vllm:prefix_cache_hits_total"))


# -------------------------------------------------------------------------------------------
ORDER = (None, 0.2, 0.5)  # requests of the first test, in this order


def test_prompt_tokens_follow_the_request_budget(server, model, videos):
    frames = read_video_frames(videos["a"])
    hf = hf_video_prompt(model, frames, QUESTION)
    t, per_frame = _grid(videos["a"])
    assert hf.video_tokens == t * per_frame
    got = {}
    for budget in ORDER:
        got[budget] = _chat(server, videos["a"], budget)
        assert got[budget] == hf.text_tokens + _kept(budget or SERVER_BUDGET, t, per_frame), \
            budget
    assert len(set(got.values())) == len(ORDER)


def test_worker_pruned_at_the_request_budget(server, videos, debug_dir):
    t, per_frame = _grid(videos["a"])
    dumps = [torch.load(p) for p in sorted(debug_dir.glob("*.pt"))]
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
        assert d["kept_indices"].numel() == _kept(budget, t, per_frame)
    torch.testing.assert_close(dumps[1]["features"], dumps[0]["features"])


def test_other_budget_shares_no_cached_video_blocks(server, model, videos):
    t, per_frame = _grid(videos["b"])
    hf = hf_video_prompt(model, read_video_frames(videos["b"]), QUESTION)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    before_video = len(tok(hf.text.split("<|vision_start|>")[0] + "<|vision_start|>",
                           add_special_tokens=False)["input_ids"])
    _chat(server, videos["b"], 0.2)
    h0 = _prefix_hits(server)
    _chat(server, videos["b"], 0.5)  # same video and text, other budget
    h1 = _prefix_hits(server)
    _chat(server, videos["b"], 0.5)  # same budget again: the video comes from the cache
    h2 = _prefix_hits(server)
    assert h1 - h0 <= before_video
    assert h2 - h1 >= before_video + _kept(0.5, t, per_frame)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "abc", "0.2", True, None, [0.2]])
def test_bad_budget_is_400_and_server_keeps_serving(server, videos, value):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server, videos["a"], mm_processor_kwargs={"hieravid_budget": value})
    assert e.value.status_code == 400
    assert "hieravid_budget" in str(e.value), str(e.value)
    t, per_frame = _grid(videos["a"])
    frames = read_video_frames(videos["a"])
    text = hf_video_prompt(build_tiny_model("qwen2_5_vl"), frames, QUESTION).text_tokens
    assert _chat(server, videos["a"], 0.2) == text + _kept(0.2, t, per_frame)
