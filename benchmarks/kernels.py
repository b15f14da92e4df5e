#!/usr/bin/env python
"""Reference (pure PyTorch, ``hieravid_vllm.core``) vs Triton kernels (``hieravid_kernels``).

    python benchmarks/kernels.py                 # all cases, markdown tables on stdout
    python benchmarks/kernels.py --quick         # budget 0.3 only, fewer repetitions
    python benchmarks/kernels.py --write         # also replace the kernels section of
                                                 # benchmarks/RESULTS.md (other sections kept)
    python benchmarks/kernels.py --tiny-interpret   # tiny sizes, kernels under the Triton
                                                    # interpreter on CPU (checks this script)
    python benchmarks/kernels.py --check         # correctness battery, kernel vs reference on
                                                 # the device (GPU: the compiled kernels)
    python benchmarks/kernels.py --sweep         # greedy-kernel launch configurations (GPU)

Cases (hidden size 3584, bf16 features):

* similarity map (Eq. 1) and static-token merging (Eq. 3) on LLaVA-Video-7B (64 frames x 13 x 13)
  and Qwen2.5-VL-7B-sized (32 temporal x 16 x 28) videos, beside "read once": the time to read
  the features once (``F.sum(dtype=float32)``) and a copy (read + write); and the whole input
  stage as the serving path runs it (``prune_input_stage(..., ops=hk.OPS)``, full mode: the
  similarity map, Top-K, segmentation and merging);
* frame-level DPP (batched greedy MAP over all segments, Gram matrices included) for the full
  schedule's DPP stages (stage 3 / stage 4 of the default 4-stage schedule: n tokens in, k kept)
  and the input_only stage, at budgets 0.3 / 0.2 / 0.1, segments of 4-16 frames; beside the
  straightforward per-segment PyTorch greedy loop (how public implementations do it: a Python loop
  over segments, kernel matrix per segment, a handful of small ops per greedy step).

On a CUDA device every kernel row is also checked against the reference (``match``). Without
CUDA the reference and the loop baseline are timed and the kernels are skipped (the Triton
interpreter is for correctness tests, not timing). Needs torch (and triton for the kernels),
never vLLM; runs from a bare checkout (``hieravid_kernels`` is loaded from ``kernels/`` when it is
not installed; a missing pydantic is replaced by a minimal stand-in for the config class).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import platform
import re
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "--tiny-interpret" in sys.argv:          # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

BEGIN, END = "<!-- kernels:begin -->", "<!-- kernels:end -->"


# ------------------------------------------------------------------------------------------
# imports from a bare checkout
# ------------------------------------------------------------------------------------------
def _pydantic_standin() -> None:
    """Just enough of pydantic for ``hieravid_vllm.core.config`` to define HieraVidConfig
    (defaults and keyword overrides, no validation)."""
    m = types.ModuleType("pydantic")

    class BaseModel:
        def __init__(self, **kw):
            for k, v in kw.items():
                setattr(self, k, v)

        @classmethod
        def model_validate(cls, obj):
            return cls(**dict(obj))

        @classmethod
        def model_validate_json(cls, text):
            import json
            return cls(**json.loads(text))

    def Field(default=None, **_):
        return default

    def _deco(*_a, **_k):
        return lambda f: f

    m.BaseModel = BaseModel
    m.ConfigDict = dict
    m.Field = Field
    m.field_validator = _deco
    m.model_validator = _deco
    m.ValidationError = ValueError
    sys.modules["pydantic"] = m


def _import_kernels():
    try:
        import hieravid_kernels
        return hieravid_kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "hieravid_kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["hieravid_kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


try:
    import pydantic  # noqa: F401
except ImportError:
    print("note: pydantic missing, using a minimal stand-in for HieraVidConfig")
    _pydantic_standin()

from hieravid_vllm.core import dpp as core_dpp  # noqa: E402
from hieravid_vllm.core import segment as core_seg  # noqa: E402
from hieravid_vllm.core.config import HieraVidConfig  # noqa: E402
from hieravid_vllm.core.pipeline import prune_input_stage  # noqa: E402
from hieravid_vllm.core.schedule import build_schedule, segment_counts  # noqa: E402

hk = _import_kernels()

MODELS = {
    # name: (temporal frames, H', W'), hidden
    "LLaVA-Video-7B": ((64, 13, 13), 3584),
    "Qwen2.5-VL-7B": ((32, 16, 28), 3584),
}


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores)"


def timeit(fn, dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Mean milliseconds per call."""
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e3 / reps


def fmt(ms) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def video_features(T, Hh, Ww, C, dev, gen) -> torch.Tensor:
    """Temporally correlated features: a slowly drifting scene with a few cuts."""
    F = torch.empty(T, Hh, Ww, C, dtype=torch.float32)
    cur = torch.randn(Hh, Ww, C, generator=gen)
    for t in range(T):
        if t and t % 11 == 0:
            cur = torch.randn(Hh, Ww, C, generator=gen)          # scene cut
        move = torch.rand(Hh, Ww, 1, generator=gen) < 0.4          # moving tokens change more
        cur = cur + torch.randn(Hh, Ww, C, generator=gen) * torch.where(move, 0.8, 0.15)
        F[t] = cur
    return F.to(dev, torch.bfloat16)


def frame_lengths(T: int, gen, lo: int = 4, hi: int = 16):
    """Random segment lengths in [lo, hi] frames summing to T."""
    out, left = [], T
    while left > 0:
        if left <= hi:
            out.append(left)
            break
        x = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        if left - x < lo:
            x = left - lo
        out.append(x)
        left -= x
    return out


# ------------------------------------------------------------------------------------------
# the per-segment PyTorch loop baseline (public implementations: CDPruner-style fast MAP)
# ------------------------------------------------------------------------------------------
def dpp_loop_one(L: torch.Tensor, k: int):
    n = L.shape[0]
    cis = torch.zeros(k, n, dtype=torch.float32, device=L.device)
    di2s = torch.diagonal(L).clone()
    sel = []
    for i in range(k):
        j = torch.argmax(di2s)
        sel.append(j)
        if i == 0:
            eis = L[j] / torch.sqrt(di2s[j])
        else:
            eis = (L[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s = di2s - eis * eis
        di2s[j] = -float("inf")
    return torch.stack(sel) if sel else torch.empty(0, dtype=torch.long, device=L.device)


def dpp_loop(seg_feats, seg_r, ks_list):
    out = []
    for H, r, k in zip(seg_feats, seg_r, ks_list):
        Hf = H.float()
        L = r[:, None] * (Hf @ Hf.T / H.shape[-1]) * r[None, :]
        out.append(dpp_loop_one(L, k))
    return out


# ------------------------------------------------------------------------------------------
# benchmarks
# ------------------------------------------------------------------------------------------
def bench_segment_level(dev, reps, run_kernels, gen, budgets):
    rows = []
    for name, ((T, Hh, Ww), C) in MODELS.items():
        F = video_features(T, Hh, Ww, C, dev, gen)
        N = T * Hh * Ww
        gb = F.numel() * F.element_size() / 1e9
        shape = f"{T}x{Hh}x{Ww}x{C} bf16 ({gb * 1e3:.0f} MB)"
        read = timeit(lambda: F.sum(dtype=torch.float32), dev, reps)
        copy = timeit(lambda: F.clone(), dev, reps)
        ref_S = core_seg.similarity_map(F)
        r_ms = timeit(lambda: core_seg.similarity_map(F), dev, reps)
        k_ms, match = None, "-"
        if run_kernels:
            k_ms = timeit(lambda: hk.similarity_map(F, backend="triton"), dev, reps)
            got = hk.similarity_map(F, backend="triton")
            err = float((got - ref_S).abs().max())
            match = "yes" if err <= 1e-5 else f"max err {err:.1e}"
        rows.append(("similarity map", name, shape, r_ms, k_ms, read, copy, match))
        for b in budgets[:1]:
            sched = build_schedule(HieraVidConfig(budget=b), N, 28,
                                   max_merge=(T - 1) * Hh * Ww)
            K = sched.merge_count
            static = core_seg.static_topk(ref_S, K)
            fseg = core_seg.frame_segments(F, HieraVidConfig(budget=b), S=ref_S, K_seg=K,
                                           static_mask=static)
            r_ms = timeit(lambda: core_seg.merge_static_tokens(F, static, fseg), dev, reps)
            k_ms, match = None, "-"
            if run_kernels:
                run = lambda: hk.merge_static_tokens(F, static, fseg, num_kept=N - K,  # noqa
                                                     backend="triton")
                k_ms = timeit(run, dev, reps)
                got, want = run(), core_seg.merge_static_tokens(F, static, fseg)
                same_idx = all(torch.equal(getattr(got, a), getattr(want, a)) for a in
                               ("flat_indices", "thw", "segment_ids", "run_length",
                                "source_to_kept"))
                ferr = float((got.features.float() - want.features.float()).abs().max())
                match = "yes" if same_idx and ferr <= 2e-2 else (
                    f"indices {'ok' if same_idx else 'DIFFER'}, max feature err {ferr:.1e}")
            rows.append((f"static merging (b={b}, K={K})", name, shape, r_ms, k_ms, read, copy,
                         match))
            # the whole input stage as the vLLM workers run it (prune_video: ops=hk.OPS)
            cfg = HieraVidConfig(budget=b)
            r_ms = timeit(lambda: prune_input_stage(F, None, cfg, 28), dev, reps)
            k_ms, match = None, "-"
            if run_kernels:
                kops = hk.OPS if dev.type == "cuda" else _forced_triton_ops()
                run = lambda: prune_input_stage(F, None, cfg, 28, ops=kops)  # noqa: E731
                k_ms = timeit(run, dev, reps)
                got, want = run(), prune_input_stage(F, None, cfg, 28)
                match = "yes" if (torch.equal(got.kept_indices, want.kept_indices) and
                                  torch.equal(got.segment_ids, want.segment_ids)) else "DIFFER"
            rows.append((f"input stage, full mode (b={b}, ops)", name, shape, r_ms, k_ms, read,
                         copy, match))
    return rows


def _forced_triton_ops():
    """hk.OPS with backend="triton" (CPU tensors: the interpreter, for --tiny-interpret)."""
    import functools
    return types.SimpleNamespace(**{
        op: functools.partial(getattr(hk, op), backend="triton")
        for op in ("similarity_map", "merge_static_tokens", "frame_level_select")})


def dpp_cases(budgets, gen, dev):
    cases = []
    for name, ((T, Hh, Ww), C) in MODELS.items():
        N = T * Hh * Ww
        flen = frame_lengths(T, gen)
        for b in budgets:
            full = build_schedule(HieraVidConfig(budget=b), N, 28, max_merge=(T - 1) * Hh * Ww)
            inp = build_schedule(HieraVidConfig(budget=b, mode="input_only"), N, 28,
                                 max_merge=(T - 1) * Hh * Ww)
            stages = [(f"stage {i + 1}", full.counts[i - 1], full.counts[i])
                      for i in range(1, len(full.counts)) if full.uses_dpp[i]]
            stages.append(("input_only", N - inp.merge_count, inp.input_target))
            for stage, n, k in stages:
                if name != "LLaVA-Video-7B" and b != budgets[0]:
                    continue
                cases.append((name, b, stage, n, k, flen, C))
    return cases


def make_dpp_inputs(n, C, flen, dev, gen):
    T = sum(flen)
    per_frame = [n // T + (1 if t < n % T else 0) for t in range(T)]
    seg_of_frame = torch.repeat_interleave(torch.arange(len(flen)), torch.tensor(flen))
    seg = torch.repeat_interleave(seg_of_frame, torch.tensor(per_frame))
    M = len(flen)
    centers = torch.randn(M, C, generator=gen)
    hidden = (centers[seg] + 1.5 * torch.randn(n, C, generator=gen)).to(dev, torch.bfloat16)
    query = torch.randn(C, generator=gen).to(dev)
    return hidden, query, seg.to(dev)


def bench_dpp(dev, reps, run_kernels, gen, budgets, loop_reps):
    rows = []
    cfg = HieraVidConfig()
    for name, b, stage, n, k, flen, C in dpp_cases(budgets, gen, dev):
        hidden, query, seg = make_dpp_inputs(n, C, flen, dev, gen)
        r = core_dpp.relevance(hidden, query)
        ks = segment_counts(hidden, seg, k, cfg).to(dev)
        index, lengths = core_dpp.segment_layout(seg)
        safe = index.clamp_min(0)
        valid = index >= 0
        feats = hidden[safe]
        r_pad = torch.where(valid, r[safe], torch.zeros_like(r[safe]))
        sc = 1.0 / C
        kw = dict(weights=r_pad, scale=sc, fallback_scores=r_pad)
        M, n_max = index.shape
        k_max = int(ks.max())
        work = sum(int(a) * int(c) ** 2 for a, c in zip(lengths, ks))
        desc = (f"n={n}->k={k}, {M} segs ({min(flen)}-{max(flen)} frames), n_max={n_max}, "
                f"k_max={k_max}")
        ref_ms = timeit(lambda: core_dpp.greedy_map_batched(feats, lengths, ks, **kw), dev,
                        reps, warmup=1 if dev.type == "cuda" else 0)
        seg_feats = [feats[m, : int(lengths[m])] for m in range(M)]
        seg_r = [r_pad[m, : int(lengths[m])] for m in range(M)]
        ks_list = [int(x) for x in ks]
        loop_ms = timeit(lambda: dpp_loop(seg_feats, seg_r, ks_list), dev, loop_reps,
                         warmup=1 if dev.type == "cuda" else 0)
        k_ms, ks_ms, match = None, None, "-"
        if run_kernels:
            want = core_dpp.greedy_map_batched(feats, lengths, ks, **kw)

            def verdict(got):
                if torch.equal(got, want):
                    return "yes"
                same = sum(len(set(got[m, :ks_list[m]].tolist())
                               & set(want[m, :ks_list[m]].tolist())) for m in range(M))
                return f"order differs, sets share {same}/{k}"
            run = lambda: hk.greedy_map_batched(feats, lengths, ks, backend="triton",  # noqa
                                                split=None, **kw)
            k_ms = timeit(run, dev, reps)
            match = verdict(run())
            # the CUDA default: each segment split over several programs (kernels/dpp_coop.py)
            runs = lambda: hk.greedy_map_batched(feats, lengths, ks, backend="triton",  # noqa
                                                 split="auto", **kw)
            try:
                ks_ms = timeit(runs, dev, reps)
                match += f"; split: {verdict(runs())}"
            except Exception as e:  # report, keep benchmarking
                match += f"; split: {type(e).__name__}"
        rows.append((name, f"{b}", stage, desc, work, ref_ms, loop_ms, k_ms, ks_ms, k_max,
                     match))
    return rows


# ------------------------------------------------------------------------------------------
# correctness battery on the device (the interpreter tests' cases, run compiled on a GPU)
# ------------------------------------------------------------------------------------------
def check_suite(dev, gen) -> int:
    """Kernel vs reference on fresh random inputs on ``dev``; prints one line per case and
    returns the number of failures (outputs poisoned before every launch)."""
    fails = 0

    def report(name, ok, info=""):
        nonlocal fails
        fails += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {name} {info}")

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    big = dev.type == "cuda"          # the interpreter (CPU) gets the small cases only

    def small(shape):
        return big or math.prod(shape) <= 100_000

    for shape, dt in [((2, 1, 1, 1), f32), ((5, 3, 7, 37), f32), ((9, 4, 5, 70), bf16),
                      ((4, 2, 3, 130), f16), ((17, 13, 13, 3584), bf16),
                      ((9, 16, 28, 1000), f32)]:
        if not small(shape):
            continue
        F = rnd(*shape, dtype=dt)
        with hk.poisoned_outputs():
            got = hk.similarity_map(F, backend="triton")
        want = core_seg.similarity_map(F)
        err = float((got - want).abs().max()) if got.numel() else 0.0
        report(f"similarity {shape} {dt}", bool(err <= 1e-5 and not got.isnan().any()),
               f"max err {err:.1e}")
    for shape, dt, p in [((5, 3, 7, 37), f32, 0.5), ((9, 4, 5, 70), bf16, 0.7),
                         ((6, 1, 3, 5), f32, 1.0), ((6, 2, 3, 9), f16, 0.0),
                         ((1, 2, 2, 3), f16, 0.5), ((33, 13, 13, 3584), bf16, 0.5),
                         ((8, 40, 60, 256), bf16, 0.6)]:
        if not small(shape):
            continue
        T, Hh, Ww, C = shape
        F = rnd(*shape, dtype=dt)
        static = (torch.rand(max(T - 1, 0), Hh, Ww, generator=gen) < p).to(dev)
        fseg = torch.cumsum((torch.rand(T, generator=gen) < 0.4).long(), 0).to(dev)
        with hk.poisoned_outputs():
            got = hk.merge_static_tokens(F, static, fseg, backend="triton")
        want = core_seg.merge_static_tokens(F, static, fseg)
        same = all(torch.equal(getattr(got, a), getattr(want, a)) for a in
                   ("flat_indices", "thw", "segment_ids", "run_length", "source_to_kept"))
        single = want.run_length == 1
        exact = torch.equal(got.features[single], want.features[single])
        ferr = float((got.features.float() - want.features.float()).abs().max()) \
            if want.features.numel() else 0.0
        # merged rows: the reference's index_add_ order is not fixed on CUDA (1 ulp)
        report(f"merge {shape} {dt} p={p}", same and exact and ferr <= 2e-2,
               f"indices {'equal' if same else 'DIFFER'}, unmerged rows "
               f"{'bit-exact' if exact else 'DIFFER'}, max err {ferr:.1e}")
    for S, n_max, C, dt, block_n, mode in [
            (3, 20, 24, f32, None, "plain"), (5, 37, 19, bf16, 16, "plain"),
            (4, 45, 64, f16, 16, "plain"), (6, 3, 5, f32, None, "plain"),
            (3, 24, 40, bf16, 16, "dup"), (2, 40, 48, f32, 16, "near_tie"),
            (4, 18, 12, f32, None, "zero_fb"), (8, 300, 3584, bf16, None, "plain"),
            (5, 700, 3584, bf16, None, "plain")]:
        if not small((S, n_max, C)):
            continue
        lengths = torch.randint(1, n_max + 1, (S,), generator=gen)
        lengths[0] = n_max
        if S > 2:
            lengths[2] = 1
        ks = (torch.rand(S, generator=gen) * (lengths + 1)).long().clamp(max=lengths)
        ks[0] = lengths[0]
        if S > 1:
            ks[1] = 0
        H = torch.randn(S, n_max, C, generator=gen)
        fb = None
        if mode == "dup":
            H[:, 1::2] = H[:, 0::2]
        if mode == "near_tie":
            H[:, n_max // 2:] = H[:, : n_max // 2] * (1 + 1e-6)
        if mode == "zero_fb":
            H[1] = 0.0
            fb = torch.rand(S, n_max, generator=gen).to(dev)
        w = (torch.rand(S, n_max, generator=gen) * 0.5 + 0.5)
        if mode == "near_tie":
            w[:, n_max // 2:] = w[:, : n_max // 2]
        H, w, lengths, ks = H.to(dev, dt), w.to(dev), lengths.to(dev), ks.to(dev)
        for mat in (True, False):
            if C > 1000 and not mat:
                continue
            with hk.poisoned_outputs():
                got = hk.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                            materialize=mat, backend="triton", block_n=block_n,
                                            split=None)
            want = core_dpp.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                               materialize=mat)
            report(f"greedy S={S} n_max={n_max} C={C} {dt} {mode} "
                   f"{'gram' if mat else 'on-the-fly'}", torch.equal(got, want))
            if mat and (big or n_max <= 24):
                # multi-program kernel (the CUDA default); on CPU only one program per segment can
                # run (the interpreter runs programs one after another)
                split = "auto" if big else 1
                with hk.poisoned_outputs():
                    got = hk.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                                backend="triton", split=split, block_n=block_n)
                report(f"greedy S={S} n_max={n_max} C={C} {dt} {mode} split={split}",
                       torch.equal(got, want))
    L = rnd(23, 6)
    L = L @ L.T / 6
    for k in (0, 5, 23):
        with hk.poisoned_outputs():
            got = hk.greedy_map(L, k, backend="triton")
        report(f"greedy_map explicit n=23 rank 6 k={k}",
               torch.equal(got, core_dpp.greedy_map(L, k)))
    # non-finite gains and fallback scores (the GPU's NaN semantics of max / min differ from
    # the interpreter's numpy: the kernels must not depend on them)
    v = torch.rand(40, generator=gen) + 0.5
    base = torch.outer(v, v) + torch.eye(40) * 0.05
    fb_mixed = torch.rand(40, generator=gen)
    fb_mixed[::3] = float("nan")
    fb_mixed[1::5] = float("-inf")
    fb_mixed[7] = float("inf")
    for case, (i, j, val) in {"nan diag": (2, 2, "nan"), "-inf diag": (4, 4, "-inf"),
                              "+inf diag": (5, 5, "inf"), "nan row": (0, 1, "nan")}.items():
        L = base.clone()
        L[i, j] = L[j, i] = float(val)
        L = L.to(dev)
        for fb in (None, fb_mixed.to(dev)):
            for k in (3, 40):
                with hk.poisoned_outputs():
                    got = hk.greedy_map(L, k, fallback_scores=fb, backend="triton")
                want = core_dpp.greedy_map(L, k, fallback_scores=fb)
                report(f"greedy_map {case} fallback={'mixed' if fb is not None else 'diag'} "
                       f"k={k}", torch.equal(got, want) and got.unique().numel() == k)
    print(f"{fails} failure(s)")
    return fails


def sweep_dpp(dev, gen, budgets) -> None:
    """Greedy-kernel launch configurations on the budget-0.3 LLaVA-Video-7B cases."""
    cfgs = [dict(block_n=bn, block_s=bs, num_warps=nw)
            for bn in (128, 256, 512) for bs in (16, 32, 64) for nw in (4, 8, 16)]
    for name, b, stage, n, k, flen, C in dpp_cases(budgets[:1], gen, dev):
        if name != "LLaVA-Video-7B":
            continue
        hidden, query, seg = make_dpp_inputs(n, C, flen, dev, gen)
        r = core_dpp.relevance(hidden, query)
        ks = segment_counts(hidden, seg, k, HieraVidConfig()).to(dev)
        index, lengths = core_dpp.segment_layout(seg)
        feats = hidden[index.clamp_min(0)]
        rr = r[index.clamp_min(0)]
        r_pad = torch.where(index >= 0, rr, torch.zeros_like(rr))
        res = []
        for cfg in cfgs:
            try:
                ms = timeit(lambda: hk.greedy_map_batched_triton(
                    feats, lengths, ks, weights=r_pad, scale=1.0 / C, fallback_scores=r_pad,
                    split=None, **cfg), dev, 5)
            except Exception as e:  # e.g. out of resources
                print(f"  {cfg}: {type(e).__name__}")
                continue
            res.append((ms, cfg))
        for bn in (32, 64, 128):
            try:
                ms = timeit(lambda: hk.greedy_map_batched_triton(
                    feats, lengths, ks, weights=r_pad, scale=1.0 / C, fallback_scores=r_pad,
                    split="auto", block_n=bn), dev, 5)
                res.append((ms, {"split": "auto", "block_n": bn}))
            except Exception as e:
                print(f"  split block_n={bn}: {type(e).__name__}")
        res.sort(key=lambda x: x[0])
        print(f"{name} b={b} {stage}: best " +
              ", ".join(f"{fmt(ms)} ms {cfg}" for ms, cfg in res[:3]))


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def render(dev, seg_rows, dpp_rows, run_kernels, note) -> str:
    lines = [f"Device: **{device_name(dev)}**; torch {torch.__version__}, triton "
             f"{getattr(sys.modules.get('triton'), '__version__', 'n/a')}; "
             f"{datetime.date.today().isoformat()}; `python benchmarks/kernels.py`"
             f"{' --quick' if note.get('quick') else ''}.", ""]
    if dev.type == "cpu" and hasattr(os, "getloadavg"):
        lines += [f"Host load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} cores (a shared machine: CPU times are noisy, one "
                  "repetition per DPP case).", ""]
    if not run_kernels:
        lines += ["**CPU run: reference and loop baseline only; Triton kernels not timed** "
                  "(no CUDA device; the interpreter is for correctness tests). GPU figures "
                  "are owed: `bash benchmarks/gpu_kernels_run.sh` on an H100/H200.", ""]
    lines += ["### Segment level (ms per call)", "",
              "| op | model | features | reference | kernel | read once | copy "
              "| kernel / read once | match |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for op, name, shape, r_ms, k_ms, read, copy, match in seg_rows:
        ratio = f"{k_ms / read:.2f}x" if k_ms is not None and read else "-"
        lines.append(f"| {op} | {name} | {shape} | {fmt(r_ms)} | {fmt(k_ms)} | {fmt(read)} "
                     f"| {fmt(copy)} | {ratio} | {match} |")
    lines += ["", "Targets: similarity map and merging kernels within 2x of reading the features "
              "once. The input-stage row is the serving path end to end (`prune_video` calls "
              "`prune_input_stage(..., ops=hk.OPS)`; reference = default `ops`), Top-K and "
              "segmentation included.", "",
              "### Frame-level DPP, all segments (ms per call)", "",
              "| model | budget | stage | tokens / segments | sum n k^2 | reference "
              "| per-segment loop | kernel, 1 program / segment | us / step | loop / kernel "
              "| kernel, split (CUDA default) | loop / split | match |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (name, b, stage, desc, work, ref_ms, loop_ms, k_ms, ks_ms, k_max,
         match) in dpp_rows:
        sp = "-"
        if k_ms:
            sp = f"{loop_ms / k_ms:.1f}x" if loop_ms < 10 * k_ms else f"{loop_ms / k_ms:.0f}x"
        us = f"{k_ms * 1e3 / k_max:.2f}" if k_ms and k_max else "-"
        ssp = f"{loop_ms / ks_ms:.0f}x" if ks_ms else "-"
        lines.append(f"| {name} | {b} | {stage} | {desc} | {work / 1e6:.0f}M | {fmt(ref_ms)} "
                     f"| {fmt(loop_ms)} | {fmt(k_ms)} | {us} | {sp} | {fmt(ks_ms)} | {ssp} "
                     f"| {match} |")
    lines += ["", "Targets: LLaVA-Video-7B at budget 0.3 (stage 3 and input_only rows) under "
              "1 ms and >= 10x faster than the per-segment loop. Kernel = Gram launch + greedy "
              "launch + dispatch overhead, one program per segment or (split, the dispatch's "
              "default on CUDA since 2026-11-26) each segment over several programs; reference = "
              "`hieravid_vllm.core.dpp.greedy_map_batched` (CUDA: batched over segments, one "
              "set of ops per step; CPU: its default `per_segment`, one trimmed segment at a "
              "time); loop = Python loop over segments, CDPruner-style fast MAP per "
              "segment; split = the multi-program kernel (`split=\"auto\"`: each "
              "segment over several SMs, per-step barrier). Segments: random 4-16 frames, tokens spread evenly over frames, "
              "bf16 hidden states (segment centre + noise), relevance from a random query."]
    return "\n".join(lines)


def write_results(section: str, path: str) -> None:
    block = f"{BEGIN}\n## Kernels (`benchmarks/kernels.py`)\n\n{section}\n{END}\n"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?",
                      lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="budget 0.3 only, fewer repetitions")
    ap.add_argument("--write", action="store_true",
                    help="replace the kernels section of benchmarks/RESULTS.md")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-interpret", action="store_true",
                    help="tiny sizes, kernels under the interpreter on CPU (tests this script)")
    ap.add_argument("--check", action="store_true",
                    help="only the correctness battery (kernel vs reference) on the device")
    ap.add_argument("--sweep", action="store_true",
                    help="only a sweep of greedy-kernel launch configurations (GPU)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    run_kernels = dev.type == "cuda" and hk.HAS_TRITON
    if args.tiny_interpret:
        MODELS.clear()
        MODELS.update({"tiny-a": ((9, 3, 5), 48), "tiny-b": ((6, 2, 7), 32)})
        dev = torch.device("cpu")
        run_kernels = hk.interpreter_ready()
        args.quick = True
        args.write = False
    torch.set_grad_enabled(False)
    if args.check:
        if not (run_kernels or (dev.type == "cpu" and hk.interpreter_ready())):
            print("--check needs a CUDA device (or --tiny-interpret on CPU)", file=sys.stderr)
            return 2
        return 1 if check_suite(dev, gen) else 0
    if args.sweep:
        sweep_dpp(dev, gen, [0.3])
        return 0
    if not run_kernels:
        print("note: no CUDA device (or no triton): timing the references only; the Triton "
              "kernels are skipped", file=sys.stderr)
    budgets = [0.3] if args.quick else [0.3, 0.2, 0.1]
    gpu = dev.type == "cuda"
    reps = (20 if args.quick else 50) if gpu else (2 if args.quick else 3)
    loop_reps = 2 if gpu else 1
    seg_rows = bench_segment_level(dev, reps, run_kernels, gen, budgets)
    dpp_rows = bench_dpp(dev, reps if gpu else 1, run_kernels, gen, budgets, loop_reps)
    section = render(dev, seg_rows, dpp_rows, run_kernels, {"quick": args.quick})
    print(section)
    if args.write:
        write_results(section, args.results)
        print(f"\nwrote {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
