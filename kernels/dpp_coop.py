"""Multi-program greedy MAP (the CUDA default, see dpp.default_split): each segment split over
P programs.

The default kernel (:mod:`hieravid_kernels.dpp`) runs a whole segment in one program, so a
segment's O(n k^2) Cholesky-state traffic goes through one SM (~4 ms for the largest segment of
a 64-frame LLaVA-Video-7B stage at budget 0.3, ~75 ms at Qwen2.5-VL sizes; kernels/README.md).
Here program p of a segment owns the candidates [p * SPAN, (p + 1) * SPAN): it keeps their
rows of the state c and their d^2, computes their e_i and publishes its local pick; a per-step
barrier between the P programs of the segment (an atomic counter in global memory, spun on)
lets every program derive the same global pick from the P published values. P programs ->
P SMs' bandwidth and L1 (a program's share of c often stays in L1).

Same arithmetic, stop rule, tie-break (lowest index within ``tie`` of the max) and fallback as
the single-program kernel -- the same device functions of :mod:`hieravid_kernels.dpp` (chunk
update, streaming pick, band rescan, fallback) -- so the result is identical; only the Gram path
is supported. What is its own: the range split, the per-step exchange (:func:`_sync`, a
barrier) and the cross-program pick (:func:`_global_pick`).

Safety: every program of a segment must be resident at once (the host keeps S * P <= number
of SMs). The spin is bounded (``max_spins`` polls): a program that times out raises a flag,
every program then leaves its loop, and the host reruns the single-program kernel -- so a
launch that cannot be co-scheduled costs time, never a hang. Under the interpreter (programs run
one after another) only P = 1 can complete; P > 1 exercises the timeout path.

Status: tested under the interpreter with P = 1 (barriers with one participant), with P = 2-3
running concurrently (tests/kernels/_concurrent.py: one Python thread per program, which checks
the protocol, not the GPU memory model) and the timeout / fallback path; compiles for sm_90
without spills; on an H200 (2026-11-26) ``benchmarks/kernels.py --check`` passed and the
benchmark's selections equal the reference's sets, 4-12x faster than one program per segment
(benchmarks/RESULTS.md).
"""
import warnings
from typing import Optional, Union

import torch

from ._utils import build, empty, jit_helper, next_pow2, tl
from .dpp import _fill_rest, _first_in_band, _pick_chunk, _pick_range, _store_gains, _update_chunk

__all__ = ["launch_coop"]


@jit_helper
def _sync(SVP, SIP, BAR, ERR, target, max_spins, err, value, index):
    """Publish (value, index) in this program's slots SVP / SIP, then the segment's barrier:
    arrive (release) and spin (acquire) until ``target`` arrivals or the error flag; after
    ``max_spins`` polls raise the flag (every program then leaves its loop and the host reruns
    the single-program kernel). Returns err | flag."""
    tl.store(SVP, value)
    tl.store(SIP, index)
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release")
    cnt = tl.atomic_add(BAR, 0, sem="acquire")
    errv = tl.load(ERR, volatile=True)
    spins = err * 0
    while (cnt < target) & (errv == 0) & (spins < max_spins):
        cnt = tl.atomic_add(BAR, 0, sem="acquire")
        errv = tl.load(ERR, volatile=True)
        spins += 1
    if (cnt < target) & (errv == 0):
        tl.atomic_xchg(ERR, 1)
        errv = errv + 1
    tl.debug_barrier()
    return err | errv


@jit_helper
def _global_pick(SVS, SIS, D, P, SPAN, n, tie, poffs, pmask, offs, BLOCK_N: tl.constexpr):
    """The segment's pick from the P published local picks (slot set SVS / SIS): the global
    max, and the local pick of the first program whose max is within the tie of it; when that
    max is not the global one (a near-tie across programs), the lowest index of that program's
    range within the tie of the global max (read from D). Returns (max, index)."""
    vals = tl.load(SVS + poffs, mask=pmask, other=float("-inf"), cache_modifier=".cg")
    mx = tl.max(vals, axis=0)
    pstar = tl.min(tl.where(pmask & (vals >= mx - tie), poffs, 2147483647), axis=0)
    pstar = tl.minimum(pstar, P - 1)
    vstar = tl.max(tl.where(poffs == pstar, vals, float("-inf")), axis=0)
    j = tl.load(SIS + pstar, cache_modifier=".cg")
    if vstar != mx:
        lo = pstar * SPAN
        j = _first_in_band(D, lo, tl.minimum(n, lo + SPAN), mx - tie, offs, BLOCK_N, True)
    return mx, j


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
    sv = SLOTV + seg * 2 * P               # published values / indices, two slot sets (parity)
    si = SLOTI + seg * 2 * P
    bar = BAR + seg
    zero_i = p * 0
    err = zero_i

    # ---- init: own diagonal, global max(diag) through the slots --------------------------
    dmax_l = tl.max(tl.zeros([BLOCK_N], tl.float32), axis=0)
    nan = zero_i
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + offs
        m = idx < hi
        diag = tl.load(gbase + idx.to(tl.int64) * (n_max + 1), mask=m, other=0.0)
        dv, nan_c = _store_gains(dbase, idx, m, diag, m)
        nan = nan | nan_c
        dmax_l = tl.maximum(dmax_l, tl.max(dv, axis=0))
    err = _sync(sv + p, si + p, bar, ERR, P, max_spins, err, dmax_l, zero_i)
    dv_all = tl.load(sv + poffs, mask=pmask, other=0.0, cache_modifier=".cg")
    dmax = tl.max(dv_all, axis=0)
    tie = dmax * rel_eps
    thr = tl.maximum(tie, eps)

    # ---- first pick: local, published, global ----------------------------------------------
    best, bidx = _pick_range(dbase, lo, hi, tie, offs, BLOCK_N)
    best = tl.where(nan != 0, float("inf"), best)
    err = _sync(sv + P + p, si + P + p, bar, ERR, 2 * P, max_spins, err, best, bidx)
    mx, j = _global_pick(sv + P, si + P, dbase, P, SPAN, n, tie, poffs, pmask, offs, BLOCK_N)

    # ---- greedy steps (barrier round 2 + step, slot set step % 2) -------------------------
    step = zero_i
    while (step < k) & (mx >= thr) & (mx < float("inf")) & (err == 0):
        tl.store(SEL + seg * k_max + step, j.to(tl.int64), mask=p == 0)
        dj = tl.sqrt(mx)
        drd = dbase + (step % 2) * n_max
        dwr = dbase + ((step + 1) % 2) * n_max
        best = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        bidx = zero_i
        rescan = best != best
        nan = zero_i
        for n0 in range(lo, hi, BLOCK_N):
            idx = n0 + offs
            m = idx < hi
            row = tl.load(gbase + j.to(tl.int64) * n_max + idx, mask=m, other=0.0)
            # column j of c: written by j's owner in earlier steps (through L2)
            dv, nan_c = _update_chunk(cbase, drd, dwr, row, idx, m, j, dj, step, n_max, soffs,
                                      BLOCK_S, True)
            nan = nan | nan_c
            best, bidx, rescan = _pick_chunk(dv, idx, tie, best, bidx, rescan)
        tl.debug_barrier()
        if rescan:
            bidx = _first_in_band(dwr, lo, hi, best - tie, offs, BLOCK_N, False)
        best = tl.where(nan != 0, float("inf"), best)
        par = step % 2
        err = _sync(sv + par * P + p, si + par * P + p, bar, ERR, (step + 3) * P, max_spins,
                    err, best, bidx)
        mx, j = _global_pick(sv + par * P, si + par * P, dwr, P, SPAN, n, tie, poffs, pmask,
                             offs, BLOCK_N)
        step += 1

    # ---- fallback and padding: program 0 of the segment, on the last d^2 written -----------
    if p == 0:
        _fill_rest(SEL + seg * k_max, dbase + (step % 2) * n_max, fbase, n, step, k, k_max,
                   offs, soffs, BLOCK_N, BLOCK_S, True)


def launch_coop(G: torch.Tensor, FB: Optional[torch.Tensor], lengths: torch.Tensor,
                ks: torch.Tensor, k_max: int, n_max: int, eps: float, rel_eps: float,
                split: Union[int, str], block_n: Optional[int] = None,
                block_s: Optional[int] = None, num_warps: int = 4,
                max_spins: Optional[int] = None, read_flag: bool = True):
    """Launch the multi-program greedy on Gram matrices ``G``. Returns (S, k_max) selections,
    or None when the programs could not all run at once (the caller falls back): known on
    the host before the launch (more segments than SMs), or from the kernel's error flag,
    read back (one sync). ``read_flag=False``: the flag is not read; returns (selections,
    flag) -- an int32 device tensor, nonzero when the selections are invalid and the caller
    must fall back (on the device) -- or None in the first case."""
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
    if not read_flag:
        return sel, err
    if int(err.item()):
        warnings.warn(f"greedy MAP: the {P} programs per segment could not all run at once; "
                      "falling back to one program per segment", RuntimeWarning)
        return None
    return sel
