#!/usr/bin/env python
"""Host cost of the in-LLM selection on the CPU, per boundary and video (issue #14).

    python benchmarks/selection_host.py [--videos 16] [--hidden 512] [--reps 10]

The serving path's stage boundary (``stages._select_rows``) calls ``select_layer_stage`` once
per video: relevance (Eq. 8), Eq. 4-5 counts, then the per-segment greedy MAP (Eq. 9-10) or,
at a relevance-only boundary, the per-segment top-k. This script times those calls on inputs
shaped like the ``bench`` preset's prefill step (16 videos of about 700 visual tokens in 11
segments at the first boundary, the 0.3 schedule's counts after it), and one alternative the
issue asks about: the DPP boundary's greedy batched across all videos (every video's
segments in one ``greedy_map_batched`` call, picks checked equal to the per-video calls).

Rows (ms, median of ``--reps``): per video, the relevance-only stage, the DPP stage and the
Eq. 4-5 counts alone; per boundary (all videos), the per-video greedy calls against the one
batched call. To compare two checkouts, run it under each (``PYTHONPATH=<checkout>``),
alternating. Needs torch and numpy only (no vLLM); CPU timings, no GPU numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)   # after PYTHONPATH: a checkout named there is the one timed

import torch  # noqa: E402

from hieravid_vllm.core import HieraVidConfig  # noqa: E402
from hieravid_vllm.core.dpp import (frame_level_select, greedy_map_batched,  # noqa: E402
                                    kernel_features, relevance, segment_layout)
from hieravid_vllm.core.schedule import host_segment_lengths, segment_counts  # noqa: E402

#: (boundary, visual tokens in, kept, DPP) per video: the 0.3 schedule of the bench preset's
#: prefill step (rows per video of layers 0/2/4/6 in step_profile's --layers table, /16)
BOUNDARIES = ((1, 700, 471, False), (2, 471, 322, True), (3, 322, 218, True))


def make_videos(num: int, n: int, segments: int, C: int, gen: torch.Generator):
    """``num`` videos of ``n`` tokens in ``segments`` temporal segments: tokens around their
    segment's centre (scores and kernels spread as in a video), a query each."""
    out = []
    for _ in range(num):
        cuts = torch.sort(torch.randperm(n - 1, generator=gen)[:segments - 1] + 1).values
        seg = torch.zeros(n, dtype=torch.int64)
        seg[cuts] = 1
        seg = torch.cumsum(seg, 0)
        centers = torch.randn(segments, C, generator=gen)
        h = centers[seg] + 0.7 * torch.randn(n, C, generator=gen)
        out.append((h, torch.randn(C, generator=gen), seg))
    return out


def median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def greedy_inputs(videos, target: int, cfg: HieraVidConfig, M: int):
    """Per video, what ``frame_level_select`` hands the greedy: padded features, lengths,
    counts, relevance weights."""
    out = []
    for h, q, seg in videos:
        lh = host_segment_lengths(seg, M)
        index, _ = segment_layout(seg, M, lengths=lh)
        r = relevance(h, q, cfg.relevance_sign, cfg.relevance_source)
        ks = segment_counts(h, seg, target, cfg, num_segments=M, lengths=lh)
        valid, safe = index >= 0, index.clamp_min(0)
        V, sc = kernel_features(h, cfg.dpp_kernel)
        out.append((V[safe], lh, ks, torch.where(valid, r[safe], torch.zeros(()))))
    return out, sc


def batched_greedy(inputs, sc: float, eps: float) -> torch.Tensor:
    n_max = max(f.shape[1] for f, *_ in inputs)
    pad = torch.nn.functional.pad
    F = torch.cat([pad(f, (0, 0, 0, n_max - f.shape[1])) for f, *_ in inputs])
    W = torch.cat([pad(w, (0, n_max - w.shape[1])) for *_, w in inputs])
    return greedy_map_batched(F, torch.cat([lh for _, lh, _, _ in inputs]),
                              torch.cat([k for _, _, k, _ in inputs]), weights=W, scale=sc,
                              eps=eps, fallback_scores=W)


def run(args) -> str:
    gen = torch.Generator().manual_seed(args.seed)
    cfg = HieraVidConfig()
    M = args.segments
    lines = [f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads; {args.videos} videos, "
             f"C = {args.hidden}, {M} segments each; median of {args.reps} (ms).", "",
             "| boundary | tokens in / kept per video | stage per video | Eq. 4-5 counts "
             "per video | greedy, per-video calls (all videos) | greedy, one batched call "
             "(all videos) |",
             "|---|---|---:|---:|---:|---:|"]
    for b, n, k, dpp in BOUNDARIES:
        n, k = max(M + 1, n * args.scale // 100), max(1, k * args.scale // 100)
        vids = make_videos(args.videos, n, M, args.hidden, gen)
        h, q, seg = vids[0]
        stage = median_ms(lambda: [frame_level_select(h, q, s, k, cfg, dpp, M)
                                   for h, q, s in vids], args.reps) / len(vids)
        lh = host_segment_lengths(seg, M)
        counts = median_ms(lambda: segment_counts(h, seg, k, cfg, num_segments=M, lengths=lh),
                           args.reps)
        per_video = batched = "-"
        if dpp:
            inputs, sc = greedy_inputs(vids, k, cfg, M)
            one = [greedy_map_batched(f, lh_, ks, weights=w, scale=sc, eps=cfg.dpp_eps,
                                      fallback_scores=w) for f, lh_, ks, w in inputs]
            allv = batched_greedy(inputs, sc, cfg.dpp_eps)
            for i, sel in enumerate(one):   # same picks, segment by segment
                got = allv[i * M:(i + 1) * M, :sel.shape[1]]
                assert torch.equal(got, sel), f"batched greedy differs for video {i}"
                assert bool((allv[i * M:(i + 1) * M, sel.shape[1]:] == -1).all())
            per_video = "%.1f" % median_ms(lambda: [
                greedy_map_batched(f, lh_, ks, weights=w, scale=sc, eps=cfg.dpp_eps,
                                   fallback_scores=w) for f, lh_, ks, w in inputs], args.reps)
            batched = "%.1f" % median_ms(lambda: batched_greedy(inputs, sc, cfg.dpp_eps),
                                         args.reps)
        lines.append(f"| {b} ({'DPP' if dpp else 'relevance'}) | {n} / {k} | {stage:.2f} | "
                     f"{counts:.2f} | {per_video} | {batched} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--segments", type=int, default=11)
    ap.add_argument("--scale", type=int, default=100, help="tokens per video, in %% of the "
                    "bench preset's (the tests run small)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    print(run(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
