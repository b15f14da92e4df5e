#!/usr/bin/env python
"""7B-shaped LLM prefill with HieraVid's stages, plain PyTorch, no vLLM (for the GPU machine).

    python benchmarks/prefill_gpu.py                       # CUDA: Qwen2-7B shapes, bf16
    python benchmarks/prefill_gpu.py --write               # also the RESULTS.md section
    python benchmarks/prefill_gpu.py --tiny --device cpu   # tiny shapes (checks the script)

The GPU machine has torch and triton but no vLLM, so this measures what the vLLM runs cannot
there: the prefill of one 64-frame LLaVA-Video-7B-sized video prompt through a Qwen2-7B-shaped
decoder (28 layers, d=3584, 28 query / 4 KV heads, FFN 18944, random bf16 weights, SDPA causal
attention, 1-D RoPE) and, side by side in one process,

* ``unpruned``: all N visual tokens in every layer;
* ``evs``: round(b N) visual tokens in every layer (what vLLM's EVS keeps at rate 1 - b; its
  own selection, one cosine pass over the encoder output, is not timed here);
* ``hieravid input_only``: the input stage (Eq. 1-3 merge + frame-level DPP, Eq. 4-10) with the
  Triton kernels (``hieravid_kernels.OPS``), then ``schedule.input_target`` tokens everywhere;
* ``hieravid full``: the input stage (merge, Eq. 1-3), then at the first layer of every later
  stage the frame-level selection (Eq. 4-11) on the residual stream, query = the last prompt
  token, through ``core.pipeline.select_layer_stage_many(..., ops=hieravid_kernels.OPS)`` with
  the segment lengths tracked on the host -- the call the vLLM stage hook makes -- and the
  following layers on the kept rows only;
* ``hieravid full (sync-free)``: the same with ``device_counts=True``: the Eq. 4-5 counts on
  the device, so no selection reads anything back and the host never waits inside the
  prefill (the segment lengths stay on the device between boundaries).

Times are wall-clock medians (host timer, device synchronised) of ``--reps`` runs after one
warm-up. "prefill ms (all in)": the runs as served, nothing synchronised inside (the selection
overlaps the layers still queued up to its one device read); the input-stage and in-LLM
selection columns come from separate runs that synchronise the device around each of them. The FLOPs column is
Eq. 12 for the same token counts (``core.flops``). Layer weights are random: the selections are
real computations on real-sized tensors, not meaningful picks.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import write_section  # noqa: E402

_spec = importlib.util.spec_from_file_location("hv_bench_kernels", os.path.join(HERE, "kernels.py"))
bk = importlib.util.module_from_spec(_spec)      # torch, core, hieravid_kernels, pydantic stand-in
_spec.loader.exec_module(bk)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hieravid_vllm.core.config import HieraVidConfig  # noqa: E402
from hieravid_vllm.core.flops import prefill_flops  # noqa: E402
from hieravid_vllm.core.pipeline import (StageInput, prune_input_stage,  # noqa: E402
                                         select_layer_stage_many)
from hieravid_vllm.core.schedule import build_schedule, round_half_up  # noqa: E402

BEGIN, END = "<!-- prefill-gpu:begin -->", "<!-- prefill-gpu:end -->"
ENV_SPLIT = bk.hk.dpp.ENV_SPLIT
SHAPES = {
    # layers, hidden, heads, kv heads, ffn; video (T, H', W')
    "7b": dict(L=28, d=3584, nh=28, nkv=4, m=18944, video=(64, 13, 13)),
    "tiny": dict(L=4, d=64, nh=4, nkv=2, m=128, video=(8, 3, 4)),
}


class Decoder:
    """Qwen2-shaped decoder stack: pre-norm, fused QKV with bias, GQA SDPA, SwiGLU."""

    def __init__(self, L, d, nh, nkv, m, dev, dtype):
        self.L, self.d, self.nh, self.nkv, self.hd = L, d, nh, nkv, d // nh

        def w(*shape):
            return torch.randn(*shape, device=dev, dtype=dtype) * 0.02
        self.layers = [dict(qkv=w((nh + 2 * nkv) * self.hd, d), qkv_b=w((nh + 2 * nkv) * self.hd),
                            o=w(d, d), gu=w(2 * m, d), down=w(d, m),
                            n1=torch.ones(d, device=dev, dtype=dtype),
                            n2=torch.ones(d, device=dev, dtype=dtype)) for _ in range(L)]
        self.inv_freq = 1.0 / (1e6 ** (torch.arange(0, self.hd, 2, device=dev,
                                                    dtype=torch.float32) / self.hd))

    @staticmethod
    def _norm(x, w, eps=1e-6):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def rope(self, pos):
        f = pos.float()[:, None] * self.inv_freq[None]
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()

    def layer(self, i, h, cos, sin):
        p, n, hd = self.layers[i], h.shape[0], self.hd
        qkv = F.linear(self._norm(h, p["n1"]), p["qkv"], p["qkv_b"])
        q, k, v = qkv.split([self.nh * hd, self.nkv * hd, self.nkv * hd], -1)
        q, k, v = (t.view(n, -1, hd).transpose(0, 1) for t in (q, k, v))
        c, s = cos.to(h.dtype)[None], sin.to(h.dtype)[None]

        def rot(t):
            t1, t2 = t.chunk(2, -1)
            return t * c + torch.cat([-t2, t1], -1) * s
        o = F.scaled_dot_product_attention(rot(q)[None], rot(k)[None], v[None], is_causal=True,
                                           enable_gqa=True)[0]
        h = h + F.linear(o.transpose(0, 1).reshape(n, -1), p["o"])
        g, u = F.linear(self._norm(h, p["n2"]), p["gu"]).chunk(2, -1)
        return h + F.linear(F.silu(g) * u, p["down"])


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_prompt(dec, pre, vis, post, vis_pos, post_pos, seg=None, sched=None, cfg=None, ops=None,
               dev=None, timings=None, device_counts=False, sync_debug=False):
    """Prefill ``[pre, vis, post]``; with ``sched``: full mode's in-LLM stages (drop visual
    rows at the first layer of every stage >= 1). Returns the last row and per-layer counts.
    ``timings``: synchronise around each selection and add its time to ``timings["select"]``
    (None: nothing synchronised, as served). ``device_counts``: the sync-free boundary (Eq. 4-5
    counts on the device, nothing read back; the segment lengths stay on the device between
    boundaries, with a host bound of their maximum). ``sync_debug`` (CUDA): the layer loop
    runs under ``torch.cuda.set_sync_debug_mode("warn")``, so every synchronising call inside
    the LLM forward warns (the caller counts the warnings)."""
    n_pre, n_post = pre.shape[0], post.shape[0]
    h = torch.cat([pre, vis, post])
    pos = torch.cat([torch.arange(n_pre, device=h.device), vis_pos, post_pos])
    cos, sin = dec.rope(pos)
    starts = set(sched.boundaries[1:len(sched.counts)]) if sched is not None else set()
    lengths = bound = None
    if sched is not None:   # tokens per segment on the host, once (the engine: at the encoder)
        lengths = torch.bincount(seg.to("cpu", torch.int64))
        bound = int(lengths.max())
    if sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        h, counts = _layers(dec, h, cos, sin, starts, seg, sched, cfg, ops, dev, timings,
                            device_counts, n_pre, n_post, lengths, bound)
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    return h[-1], counts


def _layers(dec, h, cos, sin, starts, seg, sched, cfg, ops, dev, timings, device_counts,
            n_pre, n_post, lengths, bound):
    """The decoder layers of :func:`run_prompt`, with full mode's stage boundaries."""
    stage, counts = 0, []
    for i in range(dec.L):
        if i in starts:
            stage += 1
            if timings is not None:
                _sync(dev)             # the layers queued so far are not selection time
            t0 = time.perf_counter()
            nv = h.shape[0] - n_pre - n_post
            inp = StageInput(h[n_pre:n_pre + nv], h[-1], seg, sched.counts[stage], cfg,
                             bool(sched.uses_dpp[stage]), lengths.shape[0], lengths,
                             max_length=bound)
            [(keep, lengths)] = select_layer_stage_many([inp], ops=ops,
                                                        device_counts=device_counts)
            bound = min(bound, int(sched.counts[stage]))
            if timings is not None and "calls" in timings:      # --profile: keep the inputs
                timings["calls"].append(inp)
            rows = torch.cat([torch.arange(n_pre, device=h.device), keep + n_pre,
                              torch.arange(n_pre + nv, h.shape[0], device=h.device)])
            h, cos, sin, seg = h[rows], cos[rows], sin[rows], seg[keep]
            if timings is not None:
                _sync(dev)
                timings["select"] += time.perf_counter() - t0
        counts.append(h.shape[0] - n_pre - n_post)
        h = dec.layer(i, h, cos, sin)
    return h, counts


def count_syncs(fn) -> int:
    """How many synchronising CUDA calls ``fn`` makes while it has
    ``torch.cuda.set_sync_debug_mode("warn")`` on (``run_prompt(..., sync_debug=True)``)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def profile_selection(feats, pre, post, all_pos, post_pos, dec, budgets, ops, dev, S):
    """torch.profiler tables of full mode's in-LLM selections (the select_layer_stage_many calls of
    one prompt, replayed on their recorded inputs): where their time goes."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for b in budgets:
        cfg = HieraVidConfig(budget=b)
        res = prune_input_stage(feats, None, cfg, S["L"], ops=ops)
        t = {"select": 0.0, "calls": []}
        run_prompt(dec, pre, res.features, post, all_pos[res.kept_indices], post_pos,
                   seg=res.segment_ids, sched=res.schedule, cfg=cfg, ops=ops, dev=dev,
                   timings=t)
        same = 0
        for inp in t["calls"]:                      # warm, and kernels vs the torch reference
            got = select_layer_stage_many([inp], ops=ops)[0][0]
            same += int(torch.equal(got, select_layer_stage_many([inp])[0][0]))
        print(f"\nfull mode {b}: {same}/{len(t['calls'])} selections keep the same tokens as "
              "the torch reference (core.pipeline.REFERENCE_OPS)")
        _sync(dev)
        with profile(activities=acts) as prof:
            for inp in t["calls"]:
                select_layer_stage_many([inp], ops=ops)
            _sync(dev)
        import cProfile
        import io
        import pstats
        cp = cProfile.Profile()
        cp.enable()
        for inp in t["calls"]:
            select_layer_stage_many([inp], ops=ops)
        _sync(dev)
        cp.disable()
        buf = io.StringIO()
        pstats.Stats(cp, stream=buf).sort_stats("cumulative").print_stats(28)
        print(f"\n### cProfile, full mode {b}: {len(t['calls'])} selections\n")
        print("\n".join(line for line in buf.getvalue().splitlines()[4:] if line.strip()))
        ka = prof.key_averages()
        for key in (["self_cuda_time_total"] if dev.type == "cuda" else []) + \
                ["self_cpu_time_total"]:
            print(f"\n### profile, full mode {b}: {len(t['calls'])} selections, by {key}\n")
            print(ka.table(sort_by=key, row_limit=14, max_name_column_width=48))


def bench(shape: str, budgets, reps: int, dev, dtype, seed: int = 0, split_off: bool = False,
          profile: bool = False):
    S = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    T, Hh, Ww = S["video"]
    N = T * Hh * Ww
    dec = Decoder(S["L"], S["d"], S["nh"], S["nkv"], S["m"], dev, dtype)
    feats = bk.video_features(T, Hh, Ww, S["d"], dev, gen).to(dtype)
    pre = (torch.randn(14, S["d"], generator=gen) * 0.5).to(dev, dtype)
    post = (torch.randn(30, S["d"], generator=gen) * 0.5).to(dev, dtype)
    n_text = pre.shape[0] + post.shape[0]
    ops = bk.hk.OPS
    all_pos = torch.arange(N, device=dev) + pre.shape[0]
    post_pos = torch.arange(post.shape[0], device=dev) + pre.shape[0] + N   # unpruned numbering
    torch.manual_seed(seed)
    flat = feats.reshape(N, -1)

    def timed(fn, parts=False):
        out = {"select": 0.0, "input": 0.0, "timed": parts}
        _sync(dev)
        t0 = time.perf_counter()
        counts = fn(out)
        _sync(dev)
        out["total"] = time.perf_counter() - t0
        out["counts"] = counts
        return out

    def median_of(fn, parts=False):
        """Medians of the runs as served (``total``) and, with ``parts``, of as many separate
        runs that synchronise the device around the input stage and each selection."""
        fn({"select": 0.0, "input": 0.0, "timed": parts})   # warm-up (compiles, allocator)
        runs = [timed(fn) for _ in range(reps)]
        timed_runs = [timed(fn, True) for _ in range(reps)] if parts else runs
        return {"total": statistics.median(r["total"] for r in runs)} \
            | {k: statistics.median(r[k] for r in timed_runs) for k in ("select", "input")} \
            | {"counts": runs[-1]["counts"]}

    rows = [("unpruned", "-", median_of(
        lambda t: run_prompt(dec, pre, flat, post, all_pos, post_pos)[1]))]
    for b in budgets:
        n_evs = round_half_up(b * N)
        # EVS keeps whole tokens in their original order; which ones does not change the time
        evs_idx = torch.linspace(0, N - 1, n_evs, device=dev).round().long()
        rows.append((f"evs {b}", "-", median_of(
            lambda t: run_prompt(dec, pre, flat[evs_idx], post, all_pos[evs_idx], post_pos)[1])))
        for mode in ("input_only", "full"):
            cfg = HieraVidConfig(budget=b, mode=mode)

            def hv(t, cfg=cfg, mode=mode, device_counts=False, sync_debug=False):
                t0 = time.perf_counter()
                res = prune_input_stage(feats, post[-1] if mode == "input_only" else None, cfg,
                                        S["L"], ops=ops)
                if t["timed"]:
                    _sync(dev)
                    t["input"] += time.perf_counter() - t0
                sched = res.schedule if mode == "full" else None
                return run_prompt(dec, pre, res.features.to(dtype), post,
                                  all_pos[res.kept_indices], post_pos, seg=res.segment_ids, sched=sched,
                                  cfg=cfg, ops=ops, dev=dev,
                                  timings=t if t["timed"] else None,
                                  device_counts=device_counts, sync_debug=sync_debug)[1]
            sched = build_schedule(cfg, N, S["L"], max_merge=(T - 1) * Hh * Ww)
            rows.append((f"hieravid {b} {mode}", sched, median_of(hv, parts=True)))
            if mode == "full":   # the sync-free boundary: no device read inside the prefill
                rows.append((f"hieravid {b} full (sync-free)", sched, median_of(
                    lambda t, hv=hv: hv(t, device_counts=True), parts=True)))
                if dev.type == "cuda":   # synchronising calls inside the LLM forward, counted
                    for (name, _s, r), dc in zip(rows[-2:], (False, True)):
                        r["syncs"] = count_syncs(lambda: hv(
                            {"select": 0.0, "input": 0.0, "timed": False},
                            device_counts=dc, sync_debug=True))
            if split_off:   # the greedy MAP with one program per segment (the old default)
                with mock.patch.dict(os.environ, {ENV_SPLIT: "off"}):
                    rows.append((f"hieravid {b} {mode} (DPP split off)", sched,
                                 median_of(hv, parts=True)))
    if profile:
        profile_selection(feats, pre, post, all_pos, post_pos, dec, budgets, ops, dev, S)
    base = rows[0][2]["total"]
    base_flops = prefill_flops([N + n_text] * S["L"], S["d"], S["m"])
    out = []
    for name, sched, r in rows:
        fl = prefill_flops([c + n_text for c in r["counts"]], S["d"], S["m"])
        if sched != "-":                 # the per-layer counts the run had = the schedule's
            want = sched.tokens_per_layer() if "full" in name else [sched.input_target] * S["L"]
            assert r["counts"] == want, (name, r["counts"], want)
        out.append(dict(config=name, syncs=r.get("syncs"), tokens_layer0=r["counts"][0],
                        tokens_last=r["counts"][-1], ms=r["total"] * 1e3,
                        input_ms=r["input"] * 1e3, select_ms=r["select"] * 1e3,
                        ratio=r["total"] / base, flops=fl / base_flops))
    return out, N


def render(rows, N, shape, dev, reps, budgets, split_off=False) -> str:
    S = SHAPES[shape]
    lines = [f"Device: **{bk.device_name(dev)}**; torch {torch.__version__}; "
             f"`python benchmarks/prefill_gpu.py --budgets {','.join(map(str, budgets))} "
             f"--reps {reps}" + (" --tiny" if shape == "tiny" else "")
             + (" --split-off" if split_off else "") + "`.", "",
             f"One {S['video'][0]}x{S['video'][1]}x{S['video'][2]} video (N={N} visual "
             f"tokens) + 44 text tokens, decoder L={S['L']} d={S['d']} FFN {S['m']} "
             f"({S['nh']}/{S['nkv']} heads), median of {reps} after a warm-up; all rows from "
             "one process.", "",
             "| config | visual tokens layer 0 / last | prefill ms (all in) | input stage ms "
             "| in-LLM selection ms | time vs unpruned | Eq. 12 FLOPs vs unpruned "
             "| time vs EVS same budget |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    evs = {r["config"].split()[1]: r["ms"] for r in rows if r["config"].startswith("evs")}
    for r in rows:
        parts = r["config"].split()
        vs = f"{r['ms'] / evs[parts[1]]:.2f}x" if len(parts) > 1 and parts[1] in evs else "-"
        lines.append(f"| {r['config']} | {r['tokens_layer0']} / {r['tokens_last']} "
                     f"| {r['ms']:.1f} | {r['input_ms']:.1f} | {r['select_ms']:.1f} "
                     f"| {r['ratio']:.3f} | {r['flops']:.3f} | {vs} |")
    syncs = [f"{r['config']}: {r['syncs']}" for r in rows if r.get("syncs") is not None]
    if syncs:
        lines += ["", "Synchronising CUDA calls inside the LLM forward (one prefill under "
                  "`torch.cuda.set_sync_debug_mode(\"warn\")`): " + "; ".join(syncs) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budgets", default="0.3,0.1")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--write", action="store_true", help="replace the RESULTS.md section")
    ap.add_argument("--profile", action="store_true",
                    help="also torch.profiler tables of full mode's in-LLM selections")
    ap.add_argument("--split-off", action="store_true",
                    help="also the HieraVid rows with HIERAVID_DPP_SPLIT=off (one program per "
                         "segment in the greedy MAP)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    shape = "tiny" if args.tiny else "7b"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    budgets = [float(x) for x in args.budgets.split(",")]
    torch.set_grad_enabled(False)
    rows, N = bench(shape, budgets, args.reps, dev, dtype, split_off=args.split_off,
                    profile=args.profile)
    text = render(rows, N, shape, dev, args.reps, budgets, args.split_off)
    print(text)
    if args.write:
        write_section(Path(args.results), BEGIN, END,
                      "7B-shaped prefill on the GPU (`benchmarks/prefill_gpu.py`)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
