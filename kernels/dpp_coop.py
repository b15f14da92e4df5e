"""Multi-program greedy MAP (experimental, opt-in): each segment split over P programs.

The default kernel (:mod:`hieravid_kernels.dpp`) runs a whole segment in one program, so a
segment's O(n k^2) Cholesky-state traffic goes through one SM (~4 ms for the largest segment of
a 64-frame LLaVA-Video-7B stage at budget 0.3, ~75 ms at Qwen2.5-VL sizes; kernels/README.md).
Here program p of a segment owns the candidates [p * SPAN, (p + 1) * SPAN): it keeps their
rows of the state c and their d^2, computes their e_i and publishes its local pick; a per-step
barrier between the P programs of the segment (an atomic counter in global memory, spun on)
lets every program derive the same global pick from the P published values. P programs ->
P SMs' bandwidth and L1 (a program's share of c often stays in L1).

Same arithmetic, stop rule, tie-break (lowest index within ``tie`` of the max) and fallback as
the single-program kernel, so the result is identical; only the Gram path is supported.

Safety: every program of a segment must be resident at once (the host keeps S * P <= number
of SMs). The spin is bounded (``max_spins`` polls): a program that times out raises a flag,
every program then leaves its loop, and the host reruns the single-program kernel -- so a
launch that cannot be co-scheduled costs time, never a hang. Under the interpreter (programs run
one after another) only P = 1 can complete; P > 1 exercises the timeout path.

Status: tested under the interpreter with P = 1 (barriers with one participant), with P = 2-3
running concurrently (tests/kernels/_concurrent.py: one Python thread per program, which checks
the protocol, not the GPU memory model) and the timeout / fallback path; compiles for sm_90
without spills; not yet run on a GPU -- run ``benchmarks/kernels.py --check`` on one first.
"""
import warnings
from typing import Optional, Union

import torch

from ._utils import build, empty, next_pow2, tl

__all__ = ["launch_coop"]


def _greedy_coop_kernel(G, FB, LENGTHS, KS, SEL, CBUF, D2, SLOTV, SLOTI, BAR, ERR,
                        n_max, k_max, eps, rel_eps, max_spins, P, SPAN,
                        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    seg = (pid // P).to(tl.int64)
    p = pid % P
    n = tl.load(LENGTHS + seg).to(tl.int32)
    k = tl.load(KS + seg).to(tl.int32)
    lo = p * SPAN
    hi = tl.minimum(n, lo + SPAN)
    offs = tl.arange(0, BLOCK_N)
    soffs = tl.arange(0, BLOCK_S)
    poffs = tl.arange(0, BLOCK_P)
    pmask = poffs < P
    cbase = CBUF + seg * k_max * n_max
    # d^2 double-buffered by step parity: step t reads buffer t % 2 and writes (t + 1) % 2, so a
    # program already in step t + 1 never overwrites what a slower one rescans after barrier t
    dbase = D2 + seg * 2 * n_max
    gbase = G + seg * n_max * n_max
    fbase = FB + seg * n_max               # fallback scores (the host passes diag(G) by default)
    sv = SLOTV + seg * 2 * P
    si = SLOTI + seg * 2 * P
    bar = BAR + seg
    neg_inf = float("-inf")
    zero_i = p * 0
    rnd = zero_i
    err = zero_i

    # ---- init: own diagonal, global max(diag) through the slots --------------------------
    dmax_l = tl.max(tl.zeros([BLOCK_N], tl.float32), axis=0)
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + offs
        m = idx < hi
        diag = tl.load(gbase + idx.to(tl.int64) * (n_max + 1), mask=m, other=0.0)
        tl.store(dbase + idx, diag, mask=m)
        dmax_l = tl.maximum(dmax_l, tl.max(tl.where(m, diag, 0.0), axis=0))
    par = rnd % 2
    tl.store(sv + par * P + p, dmax_l)
    rnd += 1
    # -- barrier (same code at the three places) --
    tl.debug_barrier()
    tl.atomic_add(bar, 1, sem="release")
    cnt = tl.atomic_add(bar, 0, sem="acquire")
    errv = tl.load(ERR, volatile=True)
    spins = zero_i
    while (cnt < rnd * P) & (errv == 0) & (spins < max_spins):
        cnt = tl.atomic_add(bar, 0, sem="acquire")
        errv = tl.load(ERR, volatile=True)
        spins += 1
    if (cnt < rnd * P) & (errv == 0):
        tl.atomic_xchg(ERR, 1)
        errv = errv + 1
    err = err | errv
    tl.debug_barrier()
    # --
    dv_all = tl.load(sv + par * P + poffs, mask=pmask, other=0.0, cache_modifier=".cg")
    dmax = tl.max(dv_all, axis=0)
    tie = dmax * rel_eps
    thr = tl.maximum(tie, eps)

    # ---- first pick ----------------------------------------------------------------------
    best = tl.max(tl.full([BLOCK_N], neg_inf, tl.float32), axis=0)
    bidx = zero_i
    rescan = best != best
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + offs
        dv = tl.load(dbase + idx, mask=idx < hi, other=neg_inf)
        cm = tl.max(dv, axis=0)
        ci = tl.min(tl.where(dv >= cm - tie, idx, 2147483647), axis=0)
        higher = cm > best
        amb = best >= cm - tie
        rescan = tl.where(higher, amb, rescan)
        bidx = tl.where(higher, ci, bidx)
        best = tl.where(higher, cm, best)
    if rescan:
        bidx = zero_i + 2147483647
        r0 = lo
        while (bidx == 2147483647) & (r0 < hi):
            ridx = r0 + offs
            rv = tl.load(dbase + ridx, mask=ridx < hi, other=neg_inf)
            bidx = tl.min(tl.where(rv >= best - tie, ridx, 2147483647), axis=0)
            r0 += BLOCK_N
    par = rnd % 2
    tl.store(sv + par * P + p, best)
    tl.store(si + par * P + p, bidx)
    rnd += 1
    # -- barrier --
    tl.debug_barrier()
    tl.atomic_add(bar, 1, sem="release")
    cnt = tl.atomic_add(bar, 0, sem="acquire")
    errv = tl.load(ERR, volatile=True)
    spins = zero_i
    while (cnt < rnd * P) & (errv == 0) & (spins < max_spins):
        cnt = tl.atomic_add(bar, 0, sem="acquire")
        errv = tl.load(ERR, volatile=True)
        spins += 1
    if (cnt < rnd * P) & (errv == 0):
        tl.atomic_xchg(ERR, 1)
        errv = errv + 1
    err = err | errv
    tl.debug_barrier()
    # -- global pick: first program whose max is within the tie of the global max --
    vals = tl.load(sv + par * P + poffs, mask=pmask, other=neg_inf, cache_modifier=".cg")
    mx = tl.max(vals, axis=0)
    pstar = tl.min(tl.where(pmask & (vals >= mx - tie), poffs, 2147483647), axis=0)
    pstar = tl.minimum(pstar, P - 1)
    vstar = tl.max(tl.where(poffs == pstar, vals, neg_inf), axis=0)
    j = tl.load(si + par * P + pstar, cache_modifier=".cg")
    if vstar != mx:      # near-tie across programs: lowest index of pstar's range within the tie
        j = zero_i + 2147483647
        r0 = pstar * SPAN
        rhi = tl.minimum(n, r0 + SPAN)
        while (j == 2147483647) & (r0 < rhi):
            ridx = r0 + offs
            rv = tl.load(dbase + ridx, mask=ridx < rhi, other=neg_inf, cache_modifier=".cg")
            j = tl.min(tl.where(rv >= mx - tie, ridx, 2147483647), axis=0)
            r0 += BLOCK_N

    # ---- greedy steps ----------------------------------------------------------------------
    step = zero_i
    while (step < k) & (mx >= thr) & (err == 0):
        tl.store(SEL + seg * k_max + step, j.to(tl.int64), mask=p == 0)
        dj = tl.sqrt(mx)
        drd = dbase + (step % 2) * n_max
        dwr = dbase + ((step + 1) % 2) * n_max
        best = tl.max(tl.full([BLOCK_N], neg_inf, tl.float32), axis=0)
        bidx = zero_i
        rescan = best != best
        for n0 in range(lo, hi, BLOCK_N):
            idx = n0 + offs
            m = idx < hi
            row = tl.load(gbase + j.to(tl.int64) * n_max + idx, mask=m, other=0.0)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s0 in range(0, step, BLOCK_S):
                sidx = s0 + soffs
                sm = sidx < step
                # column j of c: written by j's owner in earlier steps (bypass L1)
                cj = tl.load(cbase + sidx * n_max + j, mask=sm, other=0.0, cache_modifier=".cg")
                ct = tl.load(cbase + sidx[:, None] * n_max + idx[None, :],
                             mask=sm[:, None] & m[None, :], other=0.0)
                acc += tl.sum(cj[:, None] * ct, axis=0)
            e = (row - acc) / dj
            tl.store(cbase + step * n_max + idx, e, mask=m)
            d2 = tl.load(drd + idx, mask=m, other=neg_inf)
            d2 = d2 - e * e
            d2 = tl.where(idx == j, neg_inf, d2)
            tl.store(dwr + idx, d2, mask=m)
            dv = tl.where(m, d2, neg_inf)
            cm = tl.max(dv, axis=0)
            ci = tl.min(tl.where(dv >= cm - tie, idx, 2147483647), axis=0)
            higher = cm > best
            amb = best >= cm - tie
            rescan = tl.where(higher, amb, rescan)
            bidx = tl.where(higher, ci, bidx)
            best = tl.where(higher, cm, best)
        tl.debug_barrier()
        if rescan:
            bidx = zero_i + 2147483647
            r0 = lo
            while (bidx == 2147483647) & (r0 < hi):
                ridx = r0 + offs
                rv = tl.load(dwr + ridx, mask=ridx < hi, other=neg_inf)
                bidx = tl.min(tl.where(rv >= best - tie, ridx, 2147483647), axis=0)
                r0 += BLOCK_N
        par = rnd % 2
        tl.store(sv + par * P + p, best)
        tl.store(si + par * P + p, bidx)
        rnd += 1
        # -- barrier --
        tl.debug_barrier()
        tl.atomic_add(bar, 1, sem="release")
        cnt = tl.atomic_add(bar, 0, sem="acquire")
        errv = tl.load(ERR, volatile=True)
        spins = zero_i
        while (cnt < rnd * P) & (errv == 0) & (spins < max_spins):
            cnt = tl.atomic_add(bar, 0, sem="acquire")
            errv = tl.load(ERR, volatile=True)
            spins += 1
        if (cnt < rnd * P) & (errv == 0):
            tl.atomic_xchg(ERR, 1)
            errv = errv + 1
        err = err | errv
        tl.debug_barrier()
        # -- global pick --
        vals = tl.load(sv + par * P + poffs, mask=pmask, other=neg_inf, cache_modifier=".cg")
        mx = tl.max(vals, axis=0)
        pstar = tl.min(tl.where(pmask & (vals >= mx - tie), poffs, 2147483647), axis=0)
        pstar = tl.minimum(pstar, P - 1)
        vstar = tl.max(tl.where(poffs == pstar, vals, neg_inf), axis=0)
        j = tl.load(si + par * P + pstar, cache_modifier=".cg")
        if vstar != mx:
            j = zero_i + 2147483647
            r0 = pstar * SPAN
            rhi = tl.minimum(n, r0 + SPAN)
            while (j == 2147483647) & (r0 < rhi):
                ridx = r0 + offs
                rv = tl.load(dwr + ridx, mask=ridx < rhi, other=neg_inf, cache_modifier=".cg")
                j = tl.min(tl.where(rv >= mx - tie, ridx, 2147483647), axis=0)
                r0 += BLOCK_N
        step += 1

    # ---- fallback and padding: program 0 of the segment --------------------------------------
    if p == 0:
        dfin = dbase + (step % 2) * n_max          # the last d^2 written
        while step < k:
            fbest = tl.max(tl.full([BLOCK_N], neg_inf, tl.float32), axis=0)
            fidx = zero_i + 2147483647
            for n0 in range(0, n, BLOCK_N):
                idx = n0 + offs
                m = idx < n
                d2 = tl.load(dfin + idx, mask=m, other=neg_inf, cache_modifier=".cg")
                avail = m & (d2 != neg_inf)
                sc = tl.load(fbase + idx, mask=m, other=0.0, cache_modifier=".cg")
                sv_ = tl.where(avail, sc, neg_inf)
                cm = tl.max(sv_, axis=0)
                ci = tl.min(tl.where(avail & (sv_ == cm), idx, 2147483647), axis=0)
                upd = (ci < 2147483647) & ((cm > fbest) | (fidx == 2147483647))
                fidx = tl.where(upd, ci, fidx)
                fbest = tl.where(upd, cm, fbest)
            tl.store(SEL + seg * k_max + step, fidx.to(tl.int64))
            tl.store(dfin + fidx, neg_inf, mask=fidx < n)
            tl.debug_barrier()
            step += 1
        for s0 in range(k, k_max, BLOCK_S):
            sidx = s0 + soffs
            tl.store(SEL + seg * k_max + sidx, tl.full([BLOCK_S], -1, tl.int64),
                     mask=sidx < k_max)


def launch_coop(G: torch.Tensor, FB: Optional[torch.Tensor], lengths: torch.Tensor,
                ks: torch.Tensor, k_max: int, n_max: int, eps: float, rel_eps: float,
                split: Union[int, str], block_n: Optional[int] = None,
                block_s: Optional[int] = None, num_warps: int = 4,
                max_spins: Optional[int] = None) -> Optional[torch.Tensor]:
    """Launch the multi-program greedy on Gram matrices ``G``. Returns (S, k_max) selections,
    or None when the programs could not all run at once (the caller falls back)."""
    S = lengths.shape[0]
    dev = G.device
    gpu = dev.type != "cpu"
    if block_n is None:
        block_n = 64 if gpu else 16
    if block_s is None:
        block_s = 32 if gpu else 16
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if gpu else 1
    chunks = (n_max + block_n - 1) // block_n
    if split == "auto":
        P = max(1, min(chunks, sms // max(S, 1)))
    else:
        P = max(1, int(split))
    if gpu and S * P > sms:
        P = max(1, sms // max(S, 1))
        if S * P > sms:
            return None               # more segments than SMs: not co-schedulable
    span = ((chunks + P - 1) // P) * block_n
    if max_spins is None:
        max_spins = (1 << 22) if gpu else 64
    sel = empty((S, k_max), torch.int64, dev)
    cbuf = empty((S, k_max, n_max), torch.float32, dev)
    d2 = empty((S, 2, n_max), torch.float32, dev)
    if FB is None:      # default fallback order: the kernel diagonal
        FB = torch.diagonal(G, 0, 1, 2).contiguous()
    slotv = empty((S, 2, P), torch.float32, dev)
    sloti = empty((S, 2, P), torch.int32, dev)
    bar = torch.zeros(S, dtype=torch.int32, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    kw = {} if not gpu else {"num_warps": num_warps}
    build(_greedy_coop_kernel, dev)[(S * P,)](
        G, FB, lengths, ks, sel, cbuf, d2, slotv, sloti, bar, err,
        n_max, k_max, float(eps), float(rel_eps), int(max_spins), P, span,
        BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_P=max(2, next_pow2(P)), **kw)
    if int(err.item()):
        warnings.warn(f"greedy MAP: the {P} programs per segment could not all run at once; "
                      "falling back to one program per segment", RuntimeWarning)
        return None
    return sel
