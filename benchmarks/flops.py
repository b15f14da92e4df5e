#!/usr/bin/env python
"""Prefill FLOPs (Eq. 12) of HieraVid's default schedule beside the paper's Tables 1-3.

    python benchmarks/flops.py --json        # JSON list of rows
    python benchmarks/flops.py --markdown    # table with the paper's numbers
    python benchmarks/flops.py --vs-evs      # full mode against vLLM's EVS at the same budget

Rows: {"model", "frames", "tokens_per_frame", "budget", "tflops", "ratio"} (ratio = FLOPs /
vanilla FLOPs). All three models use the Qwen2-7B LLM (28 layers, d = 3584, m = 18944).
Visual tokens: LLaVA-Video-7B 64 frames x 169, LLaVA-OneVision-7B 32 x 196 (paper). Text
tokens: ``DEFAULT_TEXT_TOKENS`` = 4 (see ``hieravid_vllm.core.flops``: the paper's vanilla
80.2 T / 40.8 T and its baselines' uniform ratios imply almost no text tokens).

Qwen2-VL-7B: the paper (Table 3) gives only vanilla 27.1 T. Solving Eq. 12 for 27.1 T gives
n = 4,422 tokens, i.e. ~4,418 visual tokens with 4 text tokens; we use 16 temporal token
frames (32 sampled frames merged pairwise by Qwen2-VL's temporal patch of 2) x 276 tokens
(a 12 x 23 grid after 2x2 merging, i.e. 336 x 644 px frames, a 16:9 video) = 4,416 visual
tokens, which gives 27.09 T. The same token count reproduces the baselines' 27.0% at 30%.

``--vs-evs``: full mode's prefill FLOPs against vLLM's EVS at the same retention b (EVS keeps
round(b N) visual tokens in every layer), for the 7B shapes above and for the CPU benchmark's
``bench`` model (8 layers, d = 512, m = 1536; the clips of ``benchmarks/serve.py``: 224 x 224,
16-64 frames, 64 tokens per temporal frame pair, ~30 text tokens). Both keep on average b N
visual tokens per layer (the budget is a layer average, ``core/schedule.py``), but Eq. 12 has
a term quadratic in the tokens of a layer, so full mode's front-loaded schedule computes at
least EVS's FLOPs (Jensen), more where attention weighs more (a small d, a long video).

Imports ``hieravid_vllm.core`` only (works without vLLM).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hieravid_vllm.core.config import HieraVidConfig  # noqa: E402
from hieravid_vllm.core.flops import (DEFAULT_TEXT_TOKENS, QWEN2_7B,  # noqa: E402
                                      ModelSpec, hieravid_flops, vanilla_flops)
from hieravid_vllm.core.schedule import round_half_up  # noqa: E402

#: The ``bench`` preset's LLM (``hieravid_vllm.testing.models``), as serve.py runs it.
BENCH_LM = ModelSpec(num_layers=8, hidden_size=512, intermediate_size=1536)
#: (label, spec, temporal frames, tokens per temporal frame, text tokens)
VS_EVS_SHAPES = [
    ("LLaVA-Video-7B", QWEN2_7B, 64, 169, DEFAULT_TEXT_TOKENS),
    ("LLaVA-OneVision-7B", QWEN2_7B, 32, 196, DEFAULT_TEXT_TOKENS),
    ("Qwen2-VL-7B", QWEN2_7B, 16, 276, DEFAULT_TEXT_TOKENS),
] + [(f"bench, {2 * t} frames 224px", BENCH_LM, t, 64, 30) for t in (8, 16, 24, 32)]

MODELS = [
    # name, frames, tokens per frame
    ("LLaVA-Video-7B", 64, 169),
    ("LLaVA-OneVision-7B", 32, 196),
    ("Qwen2-VL-7B", 16, 276),
]
BUDGETS = [1.0, 0.3, 0.2, 0.1]

#: Paper FLOPs columns: (TFLOPs, ratio %) of HieraVid (vanilla at budget 1.0); Tables 1-3.
PAPER = {
    ("LLaVA-Video-7B", 1.0): (80.2, 100.0),
    ("LLaVA-Video-7B", 0.3): (19.6, 24.5),
    ("LLaVA-Video-7B", 0.2): (13.8, 17.2),
    ("LLaVA-Video-7B", 0.1): (6.85, 8.5),
    ("LLaVA-OneVision-7B", 1.0): (40.8, 100.0),
    ("LLaVA-OneVision-7B", 0.3): (10.7, 26.3),
    ("LLaVA-OneVision-7B", 0.2): (7.5, 18.5),
    ("LLaVA-OneVision-7B", 0.1): (3.8, 9.3),
    ("Qwen2-VL-7B", 1.0): (27.1, 100.0),
    ("Qwen2-VL-7B", 0.3): (7.4, 27.2),
}


def rows(num_text: int = DEFAULT_TEXT_TOKENS):
    out = []
    for name, frames, tpf in MODELS:
        n_vis = frames * tpf
        base = vanilla_flops(QWEN2_7B, n_vis, num_text)
        for b in BUDGETS:
            f = hieravid_flops(QWEN2_7B, n_vis, HieraVidConfig(budget=b), num_text,
                               max_merge=(frames - 1) * tpf)
            out.append({"model": name, "frames": frames, "tokens_per_frame": tpf,
                        "budget": b, "tflops": round(f / 1e12, 4),
                        "ratio": round(f / base, 6)})
    return out


def vs_evs_rows(budgets=(0.3, 0.1)):
    out = []
    for label, spec, frames, tpf, text in VS_EVS_SHAPES:
        n_vis = frames * tpf
        base = vanilla_flops(spec, n_vis, text)
        for b in budgets:
            full = hieravid_flops(spec, n_vis, HieraVidConfig(budget=b), text,
                                  max_merge=(frames - 1) * tpf)
            # EVS keeps round(b N) visual tokens in every layer: an unpruned prompt of that size
            evs = vanilla_flops(spec, round_half_up(b * n_vis), text)
            out.append({"shape": label, "visual_tokens": n_vis, "text_tokens": text,
                        "budget": b, "full_ratio": full / base, "evs_ratio": evs / base,
                        "full_over_evs": full / evs})
    return out


def vs_evs_markdown(rs) -> str:
    lines = ["| shape | visual tokens | budget | full mode / unpruned | EVS / unpruned | "
             "full / EVS |", "|---|---:|---:|---:|---:|---:|"]
    for r in rs:
        lines.append(f"| {r['shape']} | {r['visual_tokens']} | {r['budget']:g} | "
                     f"{100 * r['full_ratio']:.1f}% | {100 * r['evs_ratio']:.1f}% | "
                     f"{r['full_over_evs']:.3f} |")
    return "\n".join(lines)


def markdown(rs) -> str:
    lines = ["| model | frames x tokens | budget | TFLOPs | ratio | paper TFLOPs | paper ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rs:
        p = PAPER.get((r["model"], r["budget"]))
        pt, pr = (f"{p[0]:g}", f"{p[1]:.1f}%") if p else ("-", "-")
        lines.append(f"| {r['model']} | {r['frames']} x {r['tokens_per_frame']} | "
                     f"{r['budget']:g} | {r['tflops']:.2f} | {100 * r['ratio']:.1f}% | "
                     f"{pt} | {pr} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print a JSON list of rows")
    g.add_argument("--markdown", action="store_true", help="print a table beside the paper")
    g.add_argument("--vs-evs", action="store_true",
                   help="full mode against EVS at the same budget (markdown)")
    ap.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                    help=f"text tokens per prompt (default {DEFAULT_TEXT_TOKENS})")
    a = ap.parse_args(argv)
    if a.vs_evs:
        print(vs_evs_markdown(vs_evs_rows()))
        return 0
    rs = rows(a.text_tokens)
    if a.json:
        print(json.dumps(rs, indent=1))
    else:
        print(markdown(rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
