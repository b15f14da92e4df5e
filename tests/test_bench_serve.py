"""Smoke test of the serving benchmark (benchmarks/serve.py) on the tiny Qwen2.5-VL.

Runs ``serve.main`` for real (three vLLM servers one after another: unpruned, HieraVid at
budget 0.3 in full mode, vLLM's EVS at the same retention), 2 requests per configuration at
concurrency 1 and 2, and checks its JSON against independent token accounting:

* unpruned prompt tokens = the HF processor's count for the same frames and question;
* HieraVid prompt tokens = the HF processor's text tokens + the core schedule's kept count
  for the video grid (for the mode the server actually ran, which the benchmark records);
* EVS prompt tokens = text tokens + vLLM's EVS retention rule (max(one frame, floor(N q)));
* every configuration ran with 0 failures, the KV-cache peak was read, PNG and markdown exist.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from hieravid_vllm.testing.expect import expected_kept
from hieravid_vllm.testing.hf_reference import hf_video_prompt
from hieravid_vllm.testing.models import build_tiny_model

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
BUDGET = 0.3


def _load_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-bench")
    serve = _load_serve()
    report = serve.main([
        "--preset", "tiny", "--configs", f"unpruned,hieravid-full-{BUDGET:g},evs-{BUDGET:g}",
        "--budgets", f"{BUDGET:g}", "--concurrency", "1,2", "--requests", "2",
        "--frames", "16,32", "--scenes", "2,3", "--size", "112x112", "--max-tokens", "8",
        "--request-timeout", "120", "--max-model-len", "4096",
        "--max-num-batched-tokens", "8192", "--no-progress", "--out-dir", str(out)])
    return report, out


def _hf(question: str, frames: int, width: int, height: int):
    model = build_tiny_model("qwen2_5_vl")
    # token accounting depends only on the frame count and size
    return hf_video_prompt(model, np.zeros((frames, height, width, 3), np.uint8), question)


def _prompt_tokens_by_video(cfg: dict) -> dict[int, int]:
    out = {}
    for reqs in cfg["requests"].values():
        for r in reqs:
            assert r["ok"], r
            out[r["video"]] = r["prompt_tokens"]
    return out


def test_outputs_written(bench):
    report, out = bench
    on_disk = json.loads((out / "serve.json").read_text())
    assert [c["name"] for c in on_disk["configs"]] == [c["name"] for c in report["configs"]]
    assert (out / "serve.png").stat().st_size > 1000
    md = (out / "serve.md").read_text()
    for name in ("unpruned", f"hieravid-full-{BUDGET:g}", f"evs-{BUDGET:g}"):
        assert f"| {name}" in md
    assert "TTFT p50" in md


def test_every_config_ran_without_failures(bench):
    report, _ = bench
    names = [c["name"] for c in report["configs"]]
    assert names == ["unpruned", f"hieravid-full-{BUDGET:g}", f"evs-{BUDGET:g}"]
    for c in report["configs"]:
        assert c["status"] == "ok", (c["name"], c.get("error"))
        assert set(c["levels"]) == {"1", "2"}
        for level, s in c["levels"].items():
            assert s["requests"] == 2 and s["ok"] == 2 and s["failures"] == 0, (c["name"], s)
            assert 0 < s["ttft_p50_s"] <= s["latency_p50_s"]
            assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
            assert s["completion_tokens_total"] == 2 * 8  # ignore_eos: fixed length
            assert s["kv_cache_usage_peak"] is not None and 0 <= s["kv_cache_usage_peak"] <= 1
            if c["name"] != "unpruned":
                assert s["ratios"]["prompt_tokens"] < 1


def test_prompt_tokens_match_independent_counts(bench):
    report, _ = bench
    meta = report["meta"]
    videos = {v["index"]: v for v in meta["videos"]}
    by_name = {c["name"]: c for c in report["configs"]}
    unpruned = _prompt_tokens_by_video(by_name["unpruned"])
    hv_cfg = by_name[f"hieravid-full-{BUDGET:g}"]
    hv = _prompt_tokens_by_video(hv_cfg)
    evs = _prompt_tokens_by_video(by_name[f"evs-{BUDGET:g}"])
    assert set(unpruned) == set(hv) == set(evs) and len(unpruned) == 4
    # the mode that ran: full, or input_only with the plugin's fallback warning in the log
    assert hv_cfg["mode_ran"] in ("full", "input_only")
    if hv_cfg["mode_ran"] != "full":
        assert "using mode=" in hv_cfg["mode_evidence"]
    frames_seen = set()
    for idx, n_unpruned in unpruned.items():
        v = videos[idx]
        frames_seen.add(v["num_frames"])
        ref = _hf(meta["question"], v["num_frames"], v["width"], v["height"])
        assert n_unpruned == ref.prompt_tokens
        t = (v["num_frames"] + 1) // 2  # temporal patch 2
        per_frame = (v["height"] // 28) * (v["width"] // 28)
        assert t * per_frame == ref.video_tokens
        kept = expected_kept(t, per_frame, BUDGET, mode=hv_cfg["mode_ran"])
        assert hv[idx] == ref.text_tokens + kept < n_unpruned
        evs_kept = max(per_frame, math.floor(t * per_frame * (1 - (1 - BUDGET))))
        assert evs[idx] == ref.text_tokens + evs_kept < n_unpruned
    assert frames_seen == {16, 32}


def test_decode_throughput_and_tpot_against_a_timeline():
    """Decode tok/s = tokens after each request's first over the time some request was past
    its first token; checked against a sampled timeline (not the interval merge)."""
    serve = _load_serve()
    def R(**kw):
        return serve.RequestResult(prompt_tokens=100, **kw)
    rs = [R(video=0, ok=True, ttft_s=1.0, latency_s=5.0, completion_tokens=9, start_s=0.0,
            end_s=5.0),
          R(video=1, ok=True, ttft_s=1.0, latency_s=2.0, completion_tokens=3, start_s=2.0,
            end_s=4.0),
          R(video=2, ok=True, ttft_s=1.0, latency_s=3.0, completion_tokens=5, start_s=10.0,
            end_s=13.0),
          R(video=3, ok=True, ttft_s=0.5, latency_s=0.5, completion_tokens=1, start_s=0.0,
            end_s=0.5)]
    grid = np.arange(0.0, 14.0, 1e-3) + 5e-4
    busy = np.zeros_like(grid, dtype=bool)
    for r in rs:
        if r.completion_tokens > 1:
            busy |= (grid >= r.start_s + r.ttft_s) & (grid < r.end_s)
    want = (8 + 2 + 4) / (busy.sum() * 1e-3)
    assert math.isclose(serve.decode_tokens_per_s(rs), want, rel_tol=1e-3)
    assert serve.tpot(rs[0]) == 0.5 and serve.tpot(rs[3]) is None
    level = serve.summarize_level(rs, 13.0, {})
    assert math.isclose(level["tpot_p50_s"], 0.5)  # 0.5, 0.5, 0.5
    assert "TPOT p50 (ms)" in serve.markdown_table({"configs": []})


def _closed_loop(serve, durations, concurrency):
    """Simulated closed-loop level: ``concurrency`` slots, each takes the next request as soon
    as its last one ends (as ``run_level``'s thread pool does)."""
    free = [0.0] * concurrency
    rs = []
    for i, d in enumerate(durations):
        k = min(range(concurrency), key=lambda j: free[j])
        start = free[k]
        free[k] = start + d
        rs.append(serve.RequestResult(video=i, ok=True, ttft_s=d / 2, latency_s=d,
                                      prompt_tokens=9, completion_tokens=2, start_s=start,
                                      end_s=start + d))
    return rs


def test_steady_request_rate_against_the_arrivals_and_a_constant_service_time():
    """Steady req/s (completions between the c-th and the (N-c)-th, over that time) against
    a second formulation from the arrivals -- in a closed loop the k-th completion sends the
    (c+k)-th request, so the window runs from the 2c-th arrival to the last one and holds
    N - 2c completions -- and against c / D for every request taking D seconds."""
    serve = _load_serve()
    rng = np.random.default_rng(1)
    for c, n in [(4, 20), (16, 80), (3, 7)]:
        rs = _closed_loop(serve, rng.uniform(0.5, 3.0, n), c)
        starts = sorted(r.start_s for r in rs)
        a, b = starts[2 * c - 1], starts[-1]
        inside = sum(1 for r in rs if a < r.end_s <= b)
        assert inside == n - 2 * c
        assert math.isclose(serve.steady_requests_per_s(rs, c), inside / (b - a))
        assert serve.summarize_level(rs, 99.0, {}, c)["steady_requests_per_s"] == \
            serve.steady_requests_per_s(rs, c)
    # every request D = 2 s, 16 slots, 5 waves: 16 / 2 = 8 req/s (whole level: 80 / 10 s)
    rs = _closed_loop(serve, [2.0] * 80, 16)
    assert math.isclose(serve.steady_requests_per_s(rs, 16), 8.0)
    # slower service in the middle waves only: the steady rate sees it, the level's mean less
    # (waves end at 2, 6, 10, 14, 16 s: 80 / 16 = 5 req/s over the level)
    rs = _closed_loop(serve, [2.0] * 16 + [4.0] * 48 + [2.0] * 16, 16)
    assert math.isclose(serve.steady_requests_per_s(rs, 16), 4.0)
    assert math.isclose(len(rs) / max(r.end_s for r in rs), 5.0)
    # no steady window: N <= 2c, or no concurrency given
    assert serve.steady_requests_per_s(rs[:32], 16) is None
    assert serve.summarize_level(rs, 10.0, {})["steady_requests_per_s"] is None


def test_steady_decode_rate_against_a_brute_force_count():
    """Steady decode tok/s: chunks that arrived while every request had its first token and
    none had ended, over that window -- against a count over the chunk times done here."""
    serve = _load_serve()
    rng = np.random.default_rng(0)
    rs = []
    for i, (start, ttft, n) in enumerate([(0.0, 0.4, 40), (0.1, 0.9, 30), (0.3, 0.5, 50)]):
        gaps = rng.uniform(0.01, 0.05, n - 1)
        times = [ttft] + list(ttft + np.cumsum(gaps))
        r = serve.RequestResult(video=i, ok=True, ttft_s=ttft, latency_s=times[-1] + 0.01,
                                prompt_tokens=100,
                                completion_tokens=n, start_s=start,
                                end_s=start + times[-1] + 0.01)
        r.chunk_times = times
        rs.append(r)
    a = max(r.start_s + r.ttft_s for r in rs)   # the last request's first token: 1.0
    b = min(r.end_s for r in rs)
    assert a == 1.0 and b > a
    count = 0
    for r in rs:
        for t in r.chunk_times:
            if a < r.start_s + t <= b:
                count += 1
    assert count > 0
    assert math.isclose(serve.steady_decode_tokens_per_s(rs), count / (b - a))
    assert serve.summarize_level(rs, 5.0, {})["steady_decode_tokens_per_s"] == \
        serve.steady_decode_tokens_per_s(rs)
    # no window (a request ends before the last one's first token), no chunk times: None
    early = serve.RequestResult(video=9, ok=True, ttft_s=0.1, latency_s=0.2,
                                completion_tokens=2, start_s=0.0, end_s=0.2)
    early.chunk_times = [0.1, 0.15]
    assert serve.steady_decode_tokens_per_s(rs + [early]) is None
    bare = serve.RequestResult(video=8, ok=True, ttft_s=0.1, latency_s=9.0,
                               completion_tokens=2, start_s=0.0, end_s=9.0)
    assert serve.steady_decode_tokens_per_s(rs + [bare]) is None
