"""The demo (``python -m hieravid_vllm.demo``): option handling, the schedule it derives, and
one real run (both servers) checked against numbers computed independently of the demo."""
from __future__ import annotations

import json
import math
import re
import textwrap

import pytest

from hieravid_vllm import demo
from hieravid_vllm.core.config import HieraVidConfig
from hieravid_vllm.core.schedule import build_schedule


def test_server_configs_start_with_unpruned():
    names = [c.name for c in demo.SERVER_CONFIGS]
    assert names[0] == "unpruned" and len(set(names)) == len(names)
    assert demo.hieravid_config(demo.SERVER_CONFIGS[0].extra_args) is None
    assert all(demo.hieravid_config(c.extra_args) is not None for c in demo.SERVER_CONFIGS[1:])


def test_video_url_forms(tmp_path):
    allowed = []
    f = tmp_path / "a.mp4"
    f.write_bytes(b"x")
    assert demo._video_url(str(f), allowed) == f.resolve().as_uri()
    assert allowed == [tmp_path.resolve()]
    for url in ("https://example.com/v.mp4", "data:video/mp4;base64,AAAA"):
        assert demo._video_url(url, []) == url
    with pytest.raises(SystemExit):
        demo._video_url(str(tmp_path / "missing.mp4"), [])


def test_unknown_config_is_rejected():
    with pytest.raises(SystemExit):
        demo.main(["--only", "no-such-config", "--frames", "4", "--size", "64"])


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--warmup", "-1"],
                                  ["--max-tokens", "1"]])
def test_bad_counts_are_rejected(argv):
    with pytest.raises(SystemExit):
        demo.main(argv)


def test_gpu_memory_share_needs_cuda():
    from hieravid_vllm.testing.server import _cuda_available

    if _cuda_available():
        pytest.skip("CUDA present: the flag is valid here")
    with pytest.raises(SystemExit, match="kv-cache-memory-bytes"):
        demo.main(["--gpu-memory-utilization", "0.3"])


def test_hieravid_config_from_server_flags():
    assert demo.hieravid_config([]) is None
    assert demo.hieravid_config(["--max-model-len", "4096"]) is None
    cfg = demo.hieravid_config(["--hieravid-budget", "0.2", "--hieravid-mode", "input_only",
                                "--enforce-eager"])
    assert (cfg.budget, cfg.mode) == (0.2, "input_only")
    cfg = demo.hieravid_config(["--hieravid-config", '{"budget": 0.3, "num_stages": 2}'])
    assert (cfg.budget, cfg.num_stages) == (0.3, 2)


def test_clip_grid_matches_the_closed_form_token_count():
    from hieravid_vllm.testing.hf_reference import expected_video_tokens

    for frames, size in ((64, 224), (16, 112), (7, 336)):
        t, per_frame = demo.clip_grid("qwen2_5_vl", frames, size, size)
        assert t * per_frame == expected_video_tokens("qwen2_5_vl", frames, size, size)
    assert demo.clip_grid("qwen2_vl", 8, 100, 100) == (None, None)  # resized: unknown here
    assert demo.clip_grid("llava_onevision", 8, 224, 224, 64) == (None, 64)


def test_num_llm_layers_reads_both_config_layouts(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(
        {"text_config": {"num_hidden_layers": 28}, "vision_config": {"depth": 32}}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"num_hidden_layers": 36}))
    assert demo.num_llm_layers(tmp_path / "a") == 28
    assert demo.num_llm_layers(tmp_path / "b") == 36
    assert demo.num_llm_layers(tmp_path / "missing") is None


def test_schedule_for_caps_merging_by_the_grid():
    cfg = HieraVidConfig(budget=0.1)
    # 2 temporal positions x 100 tokens: at most 100 tokens can merge into the other frame
    capped = demo.schedule_for(cfg, 200, 8, frames=2)
    assert capped.counts[0] == 100
    assert demo.schedule_for(cfg, 200, 8).counts[0] < 100


def test_metrics_parsing():
    text = textwrap.dedent("""\
        # HELP vllm:kv_cache_usage_perc KV-cache usage
        vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
        vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 1.5
        vllm:request_prefill_time_seconds_sum{engine="1",model_name="m"} 0.5
        vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="512"} 1.0
        hieravid_visual_tokens_before_total 2048.0
        """)
    got = demo.parse_metrics(text, ("vllm:kv_cache_usage_perc",
                                    "vllm:request_prefill_time_seconds_sum",
                                    "hieravid_visual_tokens_before_total", "absent"))
    assert got == {"vllm:kv_cache_usage_perc": 0.25,
                   "vllm:request_prefill_time_seconds_sum": 2.0,
                   "hieravid_visual_tokens_before_total": 2048.0}
    labels = demo.cache_config_labels(text)
    assert labels["num_gpu_blocks"] == "512" and labels["block_size"] == "128"


def _text_config(model_dir) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg.get("text_config") or cfg


@pytest.mark.vllm
def test_demo_runs_end_to_end(capsys, tmp_path):
    """Both servers for real (tiny model, 16 frames of 224x224: 512 video tokens, several KV
    blocks), checked against the HF processor, the core schedule and the KV sizes."""
    from hieravid_vllm.testing.models import build_tiny_model

    frames, size, max_tokens = 16, 224, 256  # long enough to read /metrics while decoding
    rc = demo.main(["--preset", "tiny", "--frames", str(frames), "--size", str(size),
                    "--requests", "2", "--warmup", "1", "--max-tokens", str(max_tokens),
                    "--json", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    results = json.loads(out[out.index("\n[") + 1:])
    assert [r["config"] for r in results] == [c.name for c in demo.SERVER_CONFIGS]
    unpruned, hv = results
    for r in results:
        assert r["ok"], r
        assert len(r["requests"]) == 2 and len(r["warmup"]) == 1
        assert [q["clip"] for q in r["warmup"] + r["requests"]] == [0, 1, 2]
        for q in r["requests"]:
            assert q["ok"] and q["completion_tokens"] == max_tokens and q["answer"].strip()
            assert q["ttft_s"] > 0 and q["prefill_s"] > 0
    # the printed transformers reference equals what vLLM reported unpruned
    ref_line = next(line for line in out.splitlines() if line.startswith("reference"))
    assert f"makes {unpruned['prompt_tokens']} prompt tokens" in ref_line

    # the schedule on the clip's grid, computed here: Qwen2.5-VL, 2-frame temporal patches of
    # (224/28)^2 tokens; the model's own LLM depth
    model = build_tiny_model("qwen2_5_vl", preset="tiny")
    text_cfg = _text_config(model)
    layers = int(text_cfg["num_hidden_layers"])
    t, per_frame = frames // 2, (size // 28) ** 2
    n = t * per_frame
    sched = build_schedule(HieraVidConfig(budget=0.3), n, layers, max_merge=(t - 1) * per_frame)
    assert hv["visual_tokens"] == unpruned["visual_tokens"] == n
    assert hv["stage_counts"] == list(sched.counts)
    assert hv["layers_per_stage"] == list(sched.layers_per_stage)
    assert hv["tokens_per_layer"] == sched.tokens_per_layer()
    assert unpruned["tokens_per_layer"] == [n] * layers
    assert abs(hv["layer_mean_share"] - 0.3) <= 1 / n
    assert unpruned["layer_mean_share"] == 1.0
    for q in hv["requests"] + hv["warmup"]:  # what the server itself counted
        assert (q["visual_tokens"], q["visual_tokens_kept"]) == (n, sched.counts[0])
    # printed: every stage row with both counts, the layer average, checks all OK
    first = 0
    for i, lp in enumerate(sched.layers_per_stage):
        span = f"layer {first}" if lp == 1 else f"layers {first}-{first + lp - 1}"
        row = next(line for line in out.splitlines()
                   if line.strip().startswith(f"stage {i + 1} ({span})"))
        assert re.search(rf"\b{n} \(100%\).*\b{sched.counts[i]} \(", row), row
        first += lp
    avg = next(line for line in out.splitlines() if "layer average" in line)
    assert f"{sum(sched.tokens_per_layer()) / layers:.1f}" in avg
    assert "check:" in out and "MISMATCH" not in out and "=== Summary" in out

    # HieraVid prompt = unpruned prompt - video tokens + stage-1 count, request by request
    for a, b in zip(unpruned["requests"], hv["requests"]):
        assert b["prompt_tokens"] == a["prompt_tokens"] - n + sched.counts[0]

    # KV held after prefill, against the model's KV size per token and layer: unpruned holds
    # at least its prompt in every layer; HieraVid at least text + kept tokens per stage, at
    # most that plus the tokens decoded so far, rounded up to whole blocks in every stage
    heads = int(text_cfg["num_attention_heads"])
    kv_heads = int(text_cfg.get("num_key_value_heads") or heads)
    head_dim = int(text_cfg.get("head_dim") or int(text_cfg["hidden_size"]) // heads)
    per_layer = 2 * kv_heads * head_dim * 4  # K and V of one token in one layer, float32
    block = hv["block_size"]
    pairs = [(a, b) for a, b in zip(unpruned["requests"], hv["requests"])
             if a["kv_bytes"] is not None and b["kv_bytes"] is not None]
    assert pairs, "no request's KV cache was read while it decoded"
    for a, b in pairs:
        text_tokens = a["prompt_tokens"] - n
        assert a["kv_bytes"] >= a["prompt_tokens"] * per_layer * layers
        low = sum((text_tokens + c) * per_layer * lp
                  for c, lp in zip(sched.counts, sched.layers_per_stage))
        high = sum(math.ceil((text_tokens + c + max_tokens) / block) * block * per_layer * lp
                   for c, lp in zip(sched.counts, sched.layers_per_stage))
        assert low <= b["kv_bytes"] <= high, (b["kv_bytes"], low, high)
        assert b["kv_bytes"] < a["kv_bytes"]
    assert hv["kv_bytes"] < unpruned["kv_bytes"]
    for key in ("ttft_s", "prefill_s", "kv_cache_bytes", "num_gpu_blocks"):
        assert unpruned[key] and hv[key], key
