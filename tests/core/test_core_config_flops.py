"""Config validation and the FLOPs benchmark (Eq. 12) against the paper's tables."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.flops import layer_flops

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("field,value,words", [
    ("budget", 0.0, "greater than 0"),
    ("budget", 1.5, "less than or equal to 1"),
    ("lam", 1.2, "less than or equal to 1"),
    ("beta", -0.1, "greater than or equal to 0"),
    ("r_var", -1, "greater than or equal to 0"),
    ("stage_decay", 0.0, "greater than 0"),
    ("merge_ratio", 1.0, "less than 1"),
    ("num_stages", 0, "greater than or equal to 1"),
    ("dpp_from_stage", 1, "greater than or equal to 2"),
    ("relevance_source", "first", "'last' or 'mean'"),
    ("relevance_sign", 0, "1 or -1"),
    ("segmentation", "kmeans", "'merge_ratio', 'none' or 'avg_pool'"),
    ("mode", "both", "'full' or 'input_only'"),
    ("stage_layers", [1, 7, 14, 21], "start with layer 0"),
    ("stage_layers", [0, 7, 7, 21], "strictly increasing"),
])
def test_invalid_values_name_field_and_range(field, value, words):
    with pytest.raises(ValidationError) as ei:
        HieraVidConfig(**{field: value})
    msg = str(ei.value)
    assert field in msg and words in msg


def test_config_misc():
    with pytest.raises(ValidationError, match="stage_layers"):
        HieraVidConfig(stage_layers=[0, 7, 14])           # wrong length for 4 stages
    with pytest.raises(ValidationError, match="extra"):
        HieraVidConfig(bugdet=0.3)
    c = HieraVidConfig()
    with pytest.raises(ValidationError):
        c.budget = 0.5                                    # frozen
    assert c.stage_boundaries(28) == [0, 7, 14, 21]
    assert c.stage_boundaries(32) == [0, 8, 16, 24]
    assert c.layers_per_stage(30) == [7, 8, 7, 8]
    with pytest.raises(ValueError, match="stage_layers"):
        HieraVidConfig(stage_layers=[0, 7, 14, 30]).stage_boundaries(28)
    j = HieraVidConfig.from_json('{"budget": 0.2, "relevance_sign": -1, "stage_layers": [0, 2, 9, 20]}')
    assert j.budget == 0.2 and j.relevance_sign == -1 and j.stage_boundaries(28) == [0, 2, 9, 20]
    assert HieraVidConfig.model_validate_json(j.model_dump_json()) == j
    assert HieraVidConfig.coerce(None) == HieraVidConfig()
    assert HieraVidConfig.coerce({"budget": 0.1}).budget == 0.1
    with pytest.raises(ValidationError, match="budget"):
        HieraVidConfig.from_json('{"budget": 2}')


def test_layer_flops_formula():
    # Eq. 12 by hand for n = 10, d = 4, m = 8: 4*10*16 + 2*100*4 + 2*10*4*8 = 640+800+640
    assert layer_flops(10, 4, 8) == 2080


def test_flops_benchmark_reproduces_paper():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flops.py"), "--json"],
                         capture_output=True, text=True, check=True, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = json.loads(out.stdout)
    assert {(r["model"], r["budget"]) for r in rows} >= {
        (m, b) for m in ("LLaVA-Video-7B", "LLaVA-OneVision-7B", "Qwen2-VL-7B")
        for b in (1.0, 0.3, 0.2, 0.1)}
    by = {(r["model"], r["budget"]): r for r in rows}
    for r in rows:
        assert set(r) == {"model", "frames", "tokens_per_frame", "budget", "tflops", "ratio"}
    v, o = by[("LLaVA-Video-7B", 1.0)], by[("LLaVA-OneVision-7B", 1.0)]
    assert (v["frames"], v["tokens_per_frame"]) == (64, 169)
    assert (o["frames"], o["tokens_per_frame"]) == (32, 196)
    assert abs(v["tflops"] / 80.2 - 1) < 0.01
    assert abs(o["tflops"] / 40.8 - 1) < 0.01
    assert abs(by[("Qwen2-VL-7B", 1.0)]["tflops"] / 27.1 - 1) < 0.01
    assert abs(by[("LLaVA-Video-7B", 0.3)]["ratio"] - 0.245) < 0.01
    assert abs(by[("LLaVA-OneVision-7B", 0.3)]["ratio"] - 0.263) < 0.01
    # more early, fewer late: above a uniform 30% (~23.8% / 25.9%)
    assert by[("LLaVA-Video-7B", 0.3)]["ratio"] > 0.2387
    md = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flops.py"), "--markdown"],
                        capture_output=True, text=True, check=True, cwd=str(ROOT)).stdout
    assert "| LLaVA-Video-7B | 64 x 169 | 0.3 |" in md and "24.5%" in md


def test_flops_vs_evs_is_eq12_by_hand_and_never_below_evs():
    """``flops.py --vs-evs``: EVS (round(b N) visual tokens in every layer) by Eq. 12 written
    out here; full mode keeps the same layer-average visual count (the budget), so with the
    n^2 term of Eq. 12 it is never below EVS (Jensen), and above it on long videos."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import flops as fb
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from hieravid_vllm.core.schedule import build_schedule

    rows = fb.vs_evs_rows()
    assert len(rows) == 2 * len(fb.VS_EVS_SHAPES)
    for r, (label, spec, frames, tpf, text) in zip(rows[::2], fb.VS_EVS_SHAPES):
        assert r["shape"] == label
    for r in rows:
        spec, frames, tpf, text = next((s, f, t, x) for lab, s, f, t, x in fb.VS_EVS_SHAPES
                                       if lab == r["shape"])
        n, L, d, m = frames * tpf, spec.num_layers, spec.hidden_size, spec.intermediate_size
        keep = int(r["budget"] * n + 0.5)

        def by_hand(tokens):
            return sum(4 * t * d * d + 2 * t * t * d + 2 * t * d * m for t in tokens)

        vanilla = by_hand([n + text] * L)
        assert abs(r["evs_ratio"] - by_hand([keep + text] * L) / vanilla) < 1e-12
        sched = build_schedule(HieraVidConfig(budget=r["budget"]), n, L,
                               max_merge=(frames - 1) * tpf)
        per_layer = sched.tokens_per_layer()
        assert abs(sum(per_layer) / L - r["budget"] * n) <= 0.02 * n  # same layer average
        assert abs(r["full_ratio"] - by_hand([t + text for t in per_layer]) / vanilla) < 1e-12
        assert r["full_over_evs"] >= 1 - 2e-3, r  # rounding of the counts only
    worst = max(rows, key=lambda r: r["full_over_evs"])
    assert worst["full_over_evs"] > 1.02 and worst["budget"] == 0.3
    md = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flops.py"), "--vs-evs"],
                        capture_output=True, text=True, check=True, cwd=str(ROOT)).stdout
    assert "| LLaVA-Video-7B | 10816 | 0.3 | 24.4% | 23.9% | 1.024 |" in md


def test_core_never_imports_vllm():
    code = ("import sys, hieravid_vllm.core, hieravid_vllm.core.pipeline; "
            "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))
    for p in (ROOT / "hieravid_vllm" / "core").glob("*.py"):
        txt = p.read_text()
        assert "import vllm" not in txt and "from vllm" not in txt, p
