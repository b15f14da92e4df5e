#!/usr/bin/env python
"""Host cost of the in-LLM selection on the CPU, per boundary and video (issue #14).

    python benchmarks/selection_host.py [--videos 16] [--hidden 512] [--reps 10]

The serving path's stage boundary (``stages._select_rows``) calls ``select_layer_stage`` once
per video: relevance (Eq. 8), Eq. 4-5 counts, then the per-segment greedy MAP (Eq. 9-10) or,
at a relevance-only boundary, the per-segment top-k. This script times those calls on inputs
shaped like the ``bench`` preset's prefill step (16 videos of about 700 visual tokens in 11
segments at the first boundary, the 0.3 schedule's counts after it), and one alternative the
issue asks about: the DPP boundary's greedy batched across all videos (every video's
segments in one ``greedy_map_batched_many`` call -- on CPU length buckets of all videos'
segments in lockstep --, picks checked equal to the per-video calls).

Rows (ms, median of ``--reps``): per video, the relevance-only stage, the DPP stage and the
Eq. 4-5 counts alone; per boundary (all videos), the per-video greedy calls against the one
call for all; and the whole boundary in one ``select_layer_stage_many`` call with the counts
read back (the default) against the sync-free boundary (``device_counts=True``, what
``HIERAVID_BOUNDARY_COUNTS=device`` runs; picks checked equal first). To compare two checkouts, run it under each (``PYTHONPATH=<checkout>``),
alternating. Needs torch and numpy only (no vLLM); CPU timings, no GPU numbers.

``--replay DIR`` times the engine's own selection inputs instead: the stage dumps a server
or engine writes to ``$HIERAVID_DEBUG_DIR`` (``stages-*.pt``: per video and boundary the
visual hidden states, query, segment ids, target, config), one per distinct video, each
boundary's selection for all videos: one ``select_layer_stage`` call per video, and one
``select_layer_stage_many`` call for all, as ``stages._select_rows`` makes it (the picks of
both are first checked equal to the engine's), and the Eq. 4-5 counts alone. The dumps of
several engine steps replay as one boundary.
For example: ``HIERAVID_DEBUG_DIR=/tmp/d python benchmarks/step_profile.py --configs full
--max-tokens 2 --rounds 1``, then ``--replay /tmp/d``; run under two checkouts to compare.
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
    sys.path.append(ROOT)   # last: a checkout named in PYTHONPATH (or installed) is timed

import torch  # noqa: E402

from hieravid_vllm.core import HieraVidConfig  # noqa: E402
from hieravid_vllm.core.dpp import (GreedyCall, frame_level_select,  # noqa: E402
                                    greedy_map_batched, greedy_map_batched_many)
from hieravid_vllm.core.dpp import StageInput  # noqa: E402
from hieravid_vllm.core.pipeline import select_layer_stage_many  # noqa: E402
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
    """Per video, what ``frame_level_select`` hands the greedy (padded features, lengths,
    counts, relevance weights), captured through its ``greedy=`` hook; and the scale."""
    out = []

    def capture(feats, lengths, ks, weights=None, scale=None, **kw):
        out.append((feats, lengths, ks, weights, scale))
        return greedy_map_batched(feats, lengths, ks, weights=weights, scale=scale, **kw)
    for h, q, seg in videos:
        frame_level_select(h, q, seg, target, cfg, True, M, greedy=capture)
    return [o[:4] for o in out], out[0][4]


def batched_greedy(inputs, sc: float, eps: float) -> list:
    """All videos' greedy calls at once (``greedy_map_batched_many``: on CPU their segments
    in length buckets, in lockstep)."""
    return greedy_map_batched_many([GreedyCall(f, lh, ks, w, sc, eps, fallback_scores=w)
                                    for f, lh, ks, w in inputs])


def run(args) -> str:
    gen = torch.Generator().manual_seed(args.seed)
    cfg = HieraVidConfig()
    M = args.segments
    lines = [f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads; {args.videos} videos, "
             f"C = {args.hidden}, {M} segments each; median of {args.reps} (ms).", "",
             "| boundary | tokens in / kept per video | stage per video | Eq. 4-5 counts "
             "per video | greedy, per-video calls (all videos) | greedy, one batched call "
             "(all videos) | boundary, one call, host counts (all videos) | boundary, one "
             "call, device counts (all videos) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
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
                assert torch.equal(allv[i], sel), f"batched greedy differs for video {i}"
            per_video = "%.1f" % median_ms(lambda: [
                greedy_map_batched(f, lh_, ks, weights=w, scale=sc, eps=cfg.dpp_eps,
                                   fallback_scores=w) for f, lh_, ks, w in inputs], args.reps)
            batched = "%.1f" % median_ms(lambda: batched_greedy(inputs, sc, cfg.dpp_eps),
                                         args.reps)
        # the whole boundary as the stage hook calls it, counts read back (default) or
        # computed on the device (HIERAVID_BOUNDARY_COUNTS=device): same picks, timed
        inputs_b = [StageInput(h_, q_, s_, k, cfg, dpp, M, host_segment_lengths(s_, M))
                    for h_, q_, s_ in vids]
        host_b = select_layer_stage_many(inputs_b)
        dev_b = select_layer_stage_many(inputs_b, device_counts=True)
        for (k1, c1), (k2, c2) in zip(host_b, dev_b):
            assert torch.equal(k1, k2) and torch.equal(c1, c2), "device counts differ"
        t_host = median_ms(lambda: select_layer_stage_many(inputs_b), args.reps)
        t_dev = median_ms(lambda: select_layer_stage_many(inputs_b, device_counts=True),
                          args.reps)
        lines.append(f"| {b} ({'DPP' if dpp else 'relevance'}) | {n} / {k} | {stage:.2f} | "
                     f"{counts:.2f} | {per_video} | {batched} | {t_host:.1f} | {t_dev:.1f} |")
    return "\n".join(lines)


def load_replay(path: str) -> list:
    """One dump per distinct video (``mm_hash``): its list of per-boundary inputs."""
    import glob

    seen, videos = set(), []
    for f in sorted(glob.glob(os.path.join(path, "stages-*.pt"))):
        d = torch.load(f, weights_only=False)
        if d["mm_hash"] not in seen:
            seen.add(d["mm_hash"])
            videos.append(d["boundaries"])
    if not videos:
        raise SystemExit(f"no stages-*.pt dumps in {path} (HIERAVID_DEBUG_DIR of a full-mode run)")
    return videos


def replay(args) -> str:
    from hieravid_vllm.core.dpp import StageInput
    from hieravid_vllm.core.pipeline import select_layer_stage, select_layer_stage_many

    videos = load_replay(args.replay)
    nb = min(len(v) for v in videos)
    lines = [f"Replay of {len(videos)} videos' stage inputs from {args.replay}; machine: "
             f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; ms, median of {args.reps}.", "",
             "| boundary | DPP | tokens in -> kept (all videos) | segments | selection, one "
             "call per video | of which Eq. 4-5 counts | selection, one call for all videos "
             "| per video (one call for all) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for b in range(nb):
        calls = []
        for v in videos:
            d = v[b]
            # the dump's kept positions are the video's (from its first visual token); the
            # rows this boundary saw are the ones the previous boundary kept
            pos = d["pos"].long()
            kept = pos if b == 0 else torch.searchsorted(v[b - 1]["pos"].long(), pos)
            calls.append((d["hidden_visual"], d["query"], d["segment_ids"], d["target"],
                          HieraVidConfig.model_validate(d["config"]), d["use_dpp"],
                          d["num_segments"], kept))
        for h, q, s, t, c, u, m, kept in calls:   # the engine's picks, reproduced
            keep = select_layer_stage(h, q, s, t, c, use_dpp=u, num_segments=m)
            assert torch.equal(keep, kept.to(keep.dtype)), \
                f"boundary {b + 1}: picks differ from the engine's"
        lens = [host_segment_lengths(s, m) for _, _, s, _, _, _, m, _ in calls]
        inputs = [StageInput(h, q, s, t, c, u, m, lengths=lh)
                  for (h, q, s, t, c, u, m, _), lh in zip(calls, lens)]
        for (keep, _), (*_, kept) in zip(select_layer_stage_many(inputs), calls):
            assert torch.equal(keep, kept.to(keep.dtype)), \
                f"boundary {b + 1}: picks of the call for all videos differ from the engine's"
        many = median_ms(lambda: select_layer_stage_many(inputs), args.reps)
        total = median_ms(lambda: [select_layer_stage(h, q, s, t, c, use_dpp=u, num_segments=m)
                                   for h, q, s, t, c, u, m, _ in calls], args.reps)
        counts = median_ms(lambda: [segment_counts(h, s, t, c, num_segments=m, lengths=lh)
                                    for (h, _, s, t, c, _, m, _), lh in zip(calls, lens)],
                           args.reps)
        n_in = sum(c[0].shape[0] for c in calls)
        lines.append(f"| {b + 1} | {'yes' if calls[0][5] else 'no'} | {n_in} -> "
                     f"{sum(int(c[3]) for c in calls)} | {sum(int(c[6]) for c in calls)} | "
                     f"{total:.1f} | {counts:.1f} | {many:.1f} | {many / len(calls):.2f} |")
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
    ap.add_argument("--replay", metavar="DIR", help="time the stage dumps in DIR instead")
    args = ap.parse_args(argv)
    print(replay(args) if args.replay else run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
