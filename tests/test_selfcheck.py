"""The operator acceptance check (``python -m hieravid_vllm.selfcheck``), end to end on the
tiny Qwen2.5-VL, and its proof that it can fail.

* as an operator runs it: exit 0, every check row PASS, the GPU-only ones SKIP with their
  reason (CPU: one attention backend, no second GPU), the timing rows INFO;
* broken on purpose: the server serves a copy of the model whose last LLM layer (the first
  layer of the last stage, after every selection) is scaled by 2, the reference loads the
  original. The selections given the server's own states still equal the core's (row (b)
  PASS); the logits given the server's selections do not (row (a) FAIL), and the exit code
  is 1.

Plus the pure helpers: the dump-to-``keep`` conversion and the greedy comparison.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from hieravid_vllm import selfcheck

#: wall-clock limit of one selfcheck run (a loaded 2-core machine starts a server in ~2 min)
TIMEOUT = 1200


def _run(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "hieravid_vllm.selfcheck", *args,
                        "--keep-dumps", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env)
    out = p.stdout + p.stderr
    print(out[out.find("HieraVid selfcheck:"):])  # the table (pytest -rP / on failure)
    return p.returncode, out


def _rows(out: str) -> dict:
    """{row name start: status} of the printed table (first line of every row)."""
    rows = {}
    table = out.split("=" * 100)[1]
    for line in table.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(PASS|FAIL|SKIP|INFO)\b", line)
        if m:
            rows[m.group(1).strip()] = m.group(2)
    return rows


def _status(rows: dict, start: str) -> str:
    hits = [v for k, v in rows.items() if k.startswith(start)]
    assert len(hits) == 1, (start, rows)
    return hits[0]


# -------------------------------------------------------------------------------------------
def test_stage_keep_from_dump():
    stages = [torch.tensor([3, 5, 8, 13, 21]), torch.tensor([5, 13, 21]), torch.tensor([13])]
    keep = selfcheck.stage_keep_from_dump(stages)
    assert [k.tolist() for k in keep] == [[1, 3, 4], [1]]
    assert torch.equal(stages[0][keep[0]][keep[1]], stages[2])


def test_same_greedy_exact_and_near_tie():
    a = {"prompt_tokens": 9, "ids": [1, 2, 3], "tops": [{1: -0.1}, {2: -0.5, 7: -0.6},
                                                        {3: -0.2}]}
    assert selfcheck.same_greedy(a, dict(a), 0.0) == (True, "")
    b = dict(a, ids=[1, 7, 4])
    assert selfcheck.same_greedy(a, b, 0.0)[0] is False          # float32: exact
    ok, note = selfcheck.same_greedy(a, b, 0.25)                  # half: near-tie accepted
    assert ok and "near-tie at token 1" in note
    assert selfcheck.same_greedy(a, dict(a, ids=[5, 2, 3]), 0.25)[0] is False  # not in top-2
    assert selfcheck.same_greedy(a, dict(a, prompt_tokens=8), 0.25)[0] is False


# -------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_selfcheck_passes_on_tiny_model(model, tmp_path):
    rc, out = _run(["--model", str(model)], tmp_path)
    assert rc == 0, out[-6000:]
    rows = _rows(out)
    for name in ("runner and attention backend in use",
                 "hieravid: selections == core on the server's own states (b)",
                 "hieravid: first-token logprobs vs reference, given the server's",
                 "greedy: alone == mixed batch of 16",
                 "greedy: alone == again with the prefix cache warm",
                 "greedy: alone == under forced preemption",
                 "KV blocks per video request vs the schedule"):
        assert _status(rows, name) == "PASS", (name, out[-6000:])
    assert _status(rows, "second attention backend") == "SKIP"
    assert _status(rows, "TP 2 vs TP 1") == "SKIP"
    assert _status(rows, "TTFT (client)") == "INFO"
    assert _status(rows, "prefill time (engine)") == "INFO"
    assert "CPUModelRunner" in out and "CPU_ATTN" in out and "mode full" in out
    assert "RESULT: PASS" in out


@pytest.mark.vllm
def test_selfcheck_fails_when_the_server_computes_wrong_logits(tmp_path):
    from safetensors.torch import load_file, save_file

    from hieravid_vllm.testing.models import build_tiny_model

    original = build_tiny_model("qwen2_5_vl")
    broken = build_tiny_model("qwen2_5_vl", out_dir=tmp_path / "broken")
    weights = broken / "model.safetensors"
    state = load_file(weights)
    key = "model.layers.3.mlp.down_proj.weight"  # last layer: after every selection
    state[key] = state[key] * 2.0  # 1.05 gave 0.003 nats: too close to 2e-3
    save_file(state, weights, metadata={"format": "pt"})

    rc, out = _run(["--model", str(broken), "--reference-model", str(original),
                    "--only", "logits"], tmp_path)
    assert rc == 1, out[-6000:]
    rows = _rows(out)
    assert _status(rows, "hieravid: selections == core on the server's own states (b)") == \
        "PASS", out[-6000:]
    assert _status(rows, "hieravid: first-token logprobs vs reference, given the server's") \
        == "FAIL", out[-6000:]
    assert len(rows) == 2, rows  # --only logits: nothing else ran
    assert "RESULT: FAIL" in out
