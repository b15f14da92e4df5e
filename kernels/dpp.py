"""Batched fast greedy MAP of the relevance-weighted DPP (Chen, Zhang, Zhou 2018) in Triton.

Reference: :func:`hieravid_vllm.core.dpp.greedy_map_batched` (and :func:`greedy_map` for one
explicit kernel). Same algorithm, stop rule, fallback and tie-break (the rule is documented
once, in :mod:`hieravid_vllm.core.dpp`):

* kernel of segment s: L~_ij = w_i w_j <h_i, h_j> * scale over its tokens 0..lengths[s]-1;
* d_i^2 = L~_ii; tie = rel_eps * max(max_i L~_ii, 0) (rel_eps default 1e-5, the reference's
  fp32 default: ``core.dpp.default_rel_eps``); stop threshold thr = max(eps, tie);
* step: mx = max of d^2 over the unselected tokens; stop (for good) unless thr <= mx < inf (a
  NaN gain stops too); otherwise j = the lowest index with d_j^2 >= mx - tie (round-off-proof
  tie-break), e_i = (L~_ji - <c_j, c_i>) / sqrt(mx), c_i <- [c_i, e_i], d_i^2 -= e_i^2;
* after a stop the remaining picks are the unselected tokens by fallback score descending
  (default: L~_ii; NaN counts as -inf), ties by lowest index -- never a selected one;
* output (S, max k) int64 within-segment positions in selection order, padded with -1.

Launch layout: **one program per segment, all segments in one launch** (plus one batched Gram
launch before it); the program runs the k_s greedy steps of its segment in a device-side loop,
so there is no host synchronisation and no per-step launch. The Cholesky state lives in fp32
scratch: c (S, k_max, n_max) and d^2 (S, n_max); the candidates are processed in BLOCK_N
chunks (any n), the <c_j, c_i> products in BLOCK_S x BLOCK_N tiles. The pick is streamed over
the chunks (running max, lowest index within the tie); only when a later chunk raises the max
by less than the tie (a near-tie across chunks) is d^2 rescanned from chunk 0. Per step the
program reads row j of the kernel, the j-th column of c and the step x n block of c:
O(n k^2) per segment as in Chen et al. (the published per-segment PyTorch loops launch ~10
small kernels per step instead). Costs and limits: kernels/README.md.

Kernel entries, Gram vs on the fly (``materialize``):

* Gram (default whenever the S n_max^2 fp32 matrices fit ``gram_limit_bytes``): one batched
  ``tl.dot`` launch forms L~_s = diag(w) H H^T diag(w) * scale for every segment (tensor cores
  for bf16/fp16 features with fp32 accumulation -- bf16 products are exact in fp32, so this is as
  accurate as an fp32 GEMM; fp32 features use IEEE fp32 dot). Cost n^2 C FLOPs per segment spread
  over the whole GPU: ~15 GFLOP for a 64-frame LLaVA-Video-7B stage (3594 tokens, hidden 3584),
  a few tens of microseconds. The greedy loop then reads one n-row per step.
* On the fly: each step recomputes row j from the features, n C multiply-adds and n C feature
  reads per step *inside one program*: k n C bytes per segment from memory on one SM (e.g. 585 x
  900 x 3584 x 2 B = 3.8 GB for a 16-frame segment) -- hundreds of times slower than the Gram
  path whenever k > 1. Kept for segments whose Gram matrices would not fit in memory.

Chen et al.'s O(n k^2) state traffic (n k^2 * 2 bytes per segment) runs on one SM per segment;
see kernels/README.md for the expected costs at LLaVA-Video / Qwen2.5-VL sizes.
"""
import math
import os
from typing import Optional, Union

import torch

from ._utils import build, empty, jit_helper, next_pow2, tl, use_triton

__all__ = ["greedy_map_batched", "greedy_map_batched_many", "greedy_map",
           "greedy_map_batched_triton",
           "greedy_map_explicit_triton", "gram_triton"]

_GRAM_LIMIT_BYTES = 1 << 30
ENV_SPLIT = "HIERAVID_DPP_SPLIT"


def default_split(device: torch.device) -> Optional[Union[int, str]]:
    """The greedy MAP's launch when the caller gives no ``split`` (Gram path).

    CUDA: ``"auto"``, the multi-program kernel (:mod:`hieravid_kernels.dpp_coop`, every segment
    over as many SMs as the launch can hold at once). On an H200 it picked the same tokens as the
    reference in every case of ``benchmarks/kernels.py --check`` and ran the 64-frame
    LLaVA-Video-7B / Qwen2.5-VL-7B stages 4-12x faster than one program per segment (benchmarks/RESULTS.md,
    kernels section). CPU (the interpreter runs programs one after another, so P > 1 cannot
    complete there): None, one program per segment.

    Env ``HIERAVID_DPP_SPLIT`` overrides: ``auto``, ``off`` (one program per segment, e.g. when
    the GPU is shared through MPS and not every SM is ours: the multi-program launch would spin
    until its bound and then rerun) or a program count P >= 1.
    """
    raw = os.environ.get(ENV_SPLIT, "").strip().lower()
    if raw in ("", "default"):
        return "auto" if device.type == "cuda" else None
    if raw == "auto":
        return "auto"
    if raw in ("off", "single", "none"):
        return None
    try:
        p = int(raw)
    except ValueError:
        p = 0
    if p < 1:
        raise ValueError(f"{ENV_SPLIT} must be 'auto', 'off' or a program count >= 1, "
                         f"got {raw!r}")
    return p


def _gram_kernel(H, W, G, LENGTHS, n_max, C, scale,
                 s_hs, s_hn, s_ws,
                 HAS_W: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """G[s, i, j] = scale * w_i * w_j * <H[s, i], H[s, j]> for i, j < lengths[s] (fp32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2).to(tl.int64)
    n = tl.load(LENGTHS + seg).to(tl.int32)
    nn = tl.maximum(n, 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < n
    mn = rn < n
    hb = H + seg * s_hs                      # 64-bit base; 32-bit offsets in the segment
    # rows past the segment wrap around (loads stay in bounds; their outputs are masked)
    a_ptr = hb + (rm % nn)[:, None] * s_hn + rk[None, :]
    b_ptr = hb + (rn % nn)[None, :] * s_hn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            a = tl.load(a_ptr, mask=(k0 + rk)[None, :] < C, other=0.0)
            b = tl.load(b_ptr, mask=(k0 + rk)[:, None] < C, other=0.0)
        if IEEE:  # fp32 features, or the interpreter (its bf16 dot multiplies raw bits)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    acc = acc * scale
    if HAS_W:
        wm = tl.load(W + seg * s_ws + rm, mask=mm, other=0.0)
        wn = tl.load(W + seg * s_ws + rn, mask=mn, other=0.0)
        acc = acc * wm[:, None] * wn[None, :]
    gp = G + seg * n_max * n_max + rm[:, None].to(tl.int64) * n_max + rn[None, :]
    tl.store(gp, acc, mask=mm[:, None] & mn[None, :])


# ------------------------------------------------------------------------------------------
# device functions shared by the greedy kernels (this one and dpp_coop's multi-program one)
# ------------------------------------------------------------------------------------------
# Invariant of the d^2 state: -inf marks a selected token and nothing else; a gain that becomes
# NaN or -inf is stored as -FLT_MAX (never picked, still available to the fallback), and a NaN
# gain among the candidates of a step stops the greedy (as torch.max's NaN does in the core
# reference) -- reported to the pick as +inf, which the loop condition thr <= mx < inf rejects.
@jit_helper
def _pick_chunk(dv, idx, tie, best, bidx, rescan):
    """Streaming pick over candidate chunks: running max ``best`` and the lowest index ``bidx``
    with d^2 >= best - tie over the chunks seen so far. ``rescan`` is set when a later chunk
    raised the max by less than the tie (an earlier chunk may hold a lower index in the band:
    the caller rescans with :func:`_first_in_band`)."""
    cm = tl.max(dv, axis=0)
    ci = tl.min(tl.where(dv >= cm - tie, idx, 2147483647), axis=0)
    higher = cm > best
    rescan = tl.where(higher, best >= cm - tie, rescan)
    bidx = tl.where(higher, ci, bidx)
    best = tl.where(higher, cm, best)
    return best, bidx, rescan


@jit_helper
def _first_in_band(D, lo, hi, thresh, offs, BLOCK_N: tl.constexpr, CG: tl.constexpr):
    """Lowest index i in [lo, hi) with D[i] >= thresh (2147483647 when there is none).
    ``CG``: load through L2 only (another program of the segment wrote D)."""
    j = lo * 0 + 2147483647
    r0 = lo
    while (j == 2147483647) & (r0 < hi):
        ridx = r0 + offs
        if CG:
            rv = tl.load(D + ridx, mask=ridx < hi, other=float("-inf"), cache_modifier=".cg")
        else:
            rv = tl.load(D + ridx, mask=ridx < hi, other=float("-inf"))
        j = tl.min(tl.where(rv >= thresh, ridx, 2147483647), axis=0)
        r0 += BLOCK_N
    return j


@jit_helper
def _pick_range(D, lo, hi, tie, offs, BLOCK_N: tl.constexpr):
    """Pick over the d^2 in D[lo:hi]: (max, lowest index within the tie of it)."""
    best = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    bidx = lo * 0
    rescan = best != best                  # False
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + offs
        dv = tl.load(D + idx, mask=idx < hi, other=float("-inf"))
        best, bidx, rescan = _pick_chunk(dv, idx, tie, best, bidx, rescan)
    if rescan:
        bidx = _first_in_band(D, lo, hi, best - tie, offs, BLOCK_N, False)
    return best, bidx


@jit_helper
def _store_gains(D, idx, m, d2, cand):
    """Store the gains ``d2`` of a chunk at D + idx where ``m`` (``cand``: the unselected
    tokens of the segment; the others get -inf) under the state invariant. Returns the gains
    as the pick sees them (-inf outside ``cand``) and whether a candidate's is NaN."""
    nan = tl.max((cand & (d2 != d2)).to(tl.int32), axis=0)
    d2 = tl.where(d2 > float("-inf"), d2, -3.4028234663852886e38)
    d2 = tl.where(cand, d2, float("-inf"))
    tl.store(D + idx, d2, mask=m)
    return d2, nan


@jit_helper
def _update_chunk(CB, DRD, DWR, row, idx, m, j, dj, step, n_max, soffs,
                  BLOCK_S: tl.constexpr, CG: tl.constexpr):
    """One greedy step on a chunk of candidates ``idx`` (``m``: inside the segment / range):
    e_i = (L~_ji - <c_j, c_i>) / d_j written as row ``step`` of c (at CB), d_i^2 -= e_i^2 read
    from DRD and written to DWR with j taken. ``CG``: column j of c comes from L2 (another
    program of the segment may have written it). Returns (gains for the pick, NaN flag)."""
    acc = tl.zeros_like(row)
    for s0 in range(0, step, BLOCK_S):
        sidx = s0 + soffs
        sm = sidx < step
        if CG:
            cj = tl.load(CB + sidx * n_max + j, mask=sm, other=0.0, cache_modifier=".cg")
        else:
            cj = tl.load(CB + sidx * n_max + j, mask=sm, other=0.0)
        ct = tl.load(CB + sidx[:, None] * n_max + idx[None, :],
                     mask=sm[:, None] & m[None, :], other=0.0)
        acc += tl.sum(cj[:, None] * ct, axis=0)
    e = (row - acc) / dj
    tl.store(CB + step * n_max + idx, e, mask=m)
    old = tl.load(DRD + idx, mask=m, other=float("-inf"))
    cand = m & (old > float("-inf")) & (idx != j)
    return _store_gains(DWR, idx, m, old - e * e, cand)


@jit_helper
def _fallback_next(D, FBP, n, offs, BLOCK_N: tl.constexpr, CG: tl.constexpr):
    """Next fallback pick: among the unselected tokens (D != -inf) the highest fallback score,
    NaN counting as -inf, ties lowest index. There is always one (fewer than n are taken)."""
    fbest = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    fidx = n * 0 + 2147483647
    for n0 in range(0, n, BLOCK_N):
        idx = n0 + offs
        m = idx < n
        if CG:
            d2 = tl.load(D + idx, mask=m, other=float("-inf"), cache_modifier=".cg")
            sc = tl.load(FBP + idx, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        else:
            d2 = tl.load(D + idx, mask=m, other=float("-inf"))
            sc = tl.load(FBP + idx, mask=m, other=0.0).to(tl.float32)
        avail = m & (d2 != float("-inf"))
        sv = tl.where(avail & (sc == sc), sc, float("-inf"))
        cm = tl.max(sv, axis=0)
        ci = tl.min(tl.where(avail & (sv == cm), idx, 2147483647), axis=0)
        upd = (ci < 2147483647) & ((cm > fbest) | (fidx == 2147483647))
        fidx = tl.where(upd, ci, fidx)
        fbest = tl.where(upd, cm, fbest)
    return fidx


@jit_helper
def _fill_rest(SELP, D, FBP, n, step, k, k_max, offs, soffs,
               BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, CG: tl.constexpr):
    """After the greedy stopped at ``step``: picks step..k-1 in fallback order, then -1 up to
    k_max (SELP: the segment's output row)."""
    while step < k:
        fidx = _fallback_next(D, FBP, n, offs, BLOCK_N, CG)
        tl.store(SELP + step, fidx.to(tl.int64))
        tl.store(D + fidx, float("-inf"), mask=fidx < n)
        tl.debug_barrier()
        step += 1
    for s0 in range(k, k_max, BLOCK_S):
        sidx = s0 + soffs
        tl.store(SELP + sidx, tl.full([BLOCK_S], -1, tl.int64), mask=sidx < k_max)


def _greedy_kernel(G, H, W, FB, LENGTHS, KS, SEL, CBUF, D2, FBBUF, RUN_IF,
                   n_max, k_max, C, scale, eps, rel_eps,
                   s_hs, s_hn, s_ws, s_fs,
                   FROM_GRAM: tl.constexpr, HAS_W: tl.constexpr, HAS_FB: tl.constexpr,
                   CONDITIONAL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program = one segment: the whole greedy MAP of that segment (see module doc).
    ``CONDITIONAL``: the multi-program kernel's fallback, decided on the device -- every
    program returns at once unless the int32 flag ``RUN_IF`` is set (the multi-program launch
    could not run all its programs at once), so the host never reads the flag."""
    if CONDITIONAL:
        if tl.load(RUN_IF) == 0:
            return
    seg = tl.program_id(0).to(tl.int64)
    n = tl.load(LENGTHS + seg).to(tl.int32)
    k = tl.load(KS + seg).to(tl.int32)
    offs = tl.arange(0, BLOCK_N)
    soffs = tl.arange(0, BLOCK_S)
    coffs = tl.arange(0, BLOCK_C)
    cbase = CBUF + seg * k_max * n_max          # c[s, i] at cbase + s * n_max + i
    dbase = D2 + seg * n_max
    gbase = G + seg * n_max * n_max
    hbase = H + seg * s_hs
    if HAS_FB:
        fbase = FB + seg * s_fs
    else:
        fbase = FBBUF + seg * n_max
    neg_inf = float("-inf")

    # ---- init: d^2 = diag, tie tolerance and stop threshold, first pick -------------------
    dmax = tl.max(tl.zeros([BLOCK_N], tl.float32), axis=0)      # max(diag) clamped at 0
    nan = n * 0
    for n0 in range(0, n, BLOCK_N):
        idx = n0 + offs
        m = idx < n
        if FROM_GRAM:
            diag = tl.load(gbase + idx.to(tl.int64) * (n_max + 1), mask=m, other=0.0)
        else:
            ss = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + coffs
                ht = tl.load(hbase + idx[:, None].to(tl.int64) * s_hn + cc[None, :],
                             mask=m[:, None] & (cc < C)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(ht * ht, axis=1)
            diag = ss * scale
            if HAS_W:
                wv = tl.load(W + seg * s_ws + idx, mask=m, other=0.0)
                diag = diag * wv * wv
        if not HAS_FB:
            tl.store(fbase + idx, diag, mask=m)
        dv, nan_c = _store_gains(dbase, idx, m, diag, m)
        nan = nan | nan_c
        dmax = tl.maximum(dmax, tl.max(dv, axis=0))
    tie = dmax * rel_eps                   # picks within `tie` of the max count as ties
    thr = tl.maximum(tie, eps)             # stop once max d^2 < thr
    # first pick: the lowest index with d^2 >= max - tie (same streaming rule as every step)
    best, bidx = _pick_range(dbase, n * 0, n, tie, offs, BLOCK_N)
    tl.debug_barrier()

    # ---- greedy steps ----------------------------------------------------------------------
    step = n * 0
    mx = tl.where(nan != 0, float("inf"), best)
    j = bidx
    while (step < k) & (mx >= thr) & (mx < float("inf")):
        tl.store(SEL + seg * k_max + step, j.to(tl.int64))
        dj = tl.sqrt(mx)
        if HAS_W:
            wj = tl.load(W + seg * s_ws + j)
        best = tl.max(tl.full([BLOCK_N], neg_inf, tl.float32), axis=0)
        bidx = n * 0
        rescan = best != best
        nan = n * 0
        for n0 in range(0, n, BLOCK_N):
            idx = n0 + offs
            m = idx < n
            if FROM_GRAM:
                row = tl.load(gbase + j.to(tl.int64) * n_max + idx, mask=m, other=0.0)
            else:
                dot = tl.zeros([BLOCK_N], dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + coffs
                    cmask = cc < C
                    hj = tl.load(hbase + j.to(tl.int64) * s_hn + cc, mask=cmask,
                                 other=0.0).to(tl.float32)
                    ht = tl.load(hbase + idx[:, None].to(tl.int64) * s_hn + cc[None, :],
                                 mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                    dot += tl.sum(ht * hj[None, :], axis=1)
                row = dot * scale
                if HAS_W:
                    wv = tl.load(W + seg * s_ws + idx, mask=m, other=0.0)
                    row = row * wv * wj
            dv, nan_c = _update_chunk(cbase, dbase, dbase, row, idx, m, j, dj, step, n_max,
                                      soffs, BLOCK_S, False)
            nan = nan | nan_c
            best, bidx, rescan = _pick_chunk(dv, idx, tie, best, bidx, rescan)
        tl.debug_barrier()
        if rescan:
            bidx = _first_in_band(dbase, n * 0, n, best - tie, offs, BLOCK_N, False)
        mx = tl.where(nan != 0, float("inf"), best)
        j = bidx
        step += 1

    # ---- fallback (unselected tokens by score descending, ties lowest index), padding -------
    _fill_rest(SEL + seg * k_max, dbase, fbase, n, step, k, k_max, offs, soffs,
               BLOCK_N, BLOCK_S, False)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------
def _kw(dev: torch.device, num_warps: int) -> dict:
    return {} if dev.type == "cpu" else {"num_warps": num_warps}


def gram_triton(features: torch.Tensor, lengths: torch.Tensor,
                weights: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                block: Optional[int] = None) -> torch.Tensor:
    """Per-segment relevance-weighted Gram matrices (S, n_max, n_max) fp32 (one launch).
    Entries outside a segment's lengths[s] x lengths[s] block are left unwritten."""
    S, n_max, C = features.shape
    dev = features.device
    H = features.contiguous()
    sc = (1.0 / C) if scale is None else float(scale)
    G = empty((S, n_max, n_max), torch.float32, dev)
    if S == 0 or n_max == 0:
        return G
    gpu = dev.type != "cpu"
    if block is None:
        block = (128 if n_max >= 512 else 64) if gpu else max(16, min(64, next_pow2(n_max)))
    block_k = 64 if gpu else max(16, min(64, next_pow2(C)))
    has_w = weights is not None
    W = weights.to(dev, torch.float32).contiguous() if has_w else G
    grid = ((n_max + block - 1) // block, (n_max + block - 1) // block, S)
    build(_gram_kernel, dev)[grid](
        H, W, G, lengths, n_max, C, sc,
        H.stride(0), H.stride(1), W.stride(0) if has_w else 0,
        HAS_W=has_w, IEEE=(H.dtype == torch.float32 or dev.type == "cpu"),
        EVEN_K=(C % block_k == 0),
        BLOCK_M=block, BLOCK_N=block,
        BLOCK_K=block_k, **_kw(dev, 8 if block >= 128 else 4))
    return G


def _launch_greedy(G, H, W, FB, lengths, ks, k_max, n_max, C, scale, eps, rel_eps,
                   from_gram, block_n, block_s, block_c, num_warps, out=None, run_if=None):
    """One program per segment. ``out``: the (S, k_max) output to write (default: a new
    one); ``run_if``: an int32 device flag, the launch does nothing unless it is set."""
    S = lengths.shape[0]
    dev = lengths.device
    sel = empty((S, k_max), torch.int64, dev) if out is None else out
    cbuf = empty((S, k_max, n_max), torch.float32, dev)
    d2 = empty((S, n_max), torch.float32, dev)
    has_fb = FB is not None
    fbbuf = d2 if has_fb else empty((S, n_max), torch.float32, dev)
    gpu = dev.type != "cpu"
    if block_n is None:   # on the fly: smaller candidate chunks (the H tile is BLOCK_N x BLOCK_C)
        block_n = max(16, min((256 if from_gram else 128) if gpu else 64, next_pow2(n_max)))
    if block_s is None:
        block_s = 32 if gpu else 16
    if block_c is None:
        block_c = max(16, min(32 if gpu else 64, next_pow2(C))) if C else 16
    dummy = d2
    build(_greedy_kernel, dev)[(S,)](
        G if from_gram else dummy, H if not from_gram else dummy,
        W if W is not None else dummy, FB if has_fb else dummy,
        lengths, ks, sel, cbuf, d2, fbbuf, run_if if run_if is not None else lengths,
        n_max, k_max, C, float(scale), float(eps), float(rel_eps),
        H.stride(0) if H is not None else 0, H.stride(1) if H is not None else 0,
        W.stride(0) if W is not None else 0, FB.stride(0) if has_fb else 0,
        FROM_GRAM=from_gram, HAS_W=W is not None, HAS_FB=has_fb,
        CONDITIONAL=run_if is not None,
        BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_C=block_c, **_kw(dev, num_warps))
    return sel


def _rel_eps(rel_eps: Optional[float]) -> float:
    """The core reference's default for an fp32 state (the kernels' state is fp32)."""
    from hieravid_vllm.core.dpp import default_rel_eps
    return default_rel_eps(torch.float32) if rel_eps is None else float(rel_eps)


def greedy_map_batched_triton(features: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor,
                              weights: Optional[torch.Tensor] = None,
                              scale: Optional[float] = None, eps: float = 1e-10,
                              rel_eps: Optional[float] = None,
                              fallback_scores: Optional[torch.Tensor] = None,
                              materialize: Optional[bool] = None,
                              k_max: Optional[int] = None, check: bool = True,
                              gram_limit_bytes: int = _GRAM_LIMIT_BYTES,
                              block_n: Optional[int] = None, block_s: Optional[int] = None,
                              block_c: Optional[int] = None,
                              num_warps: int = 8,
                              split: Optional[Union[int, str]] = "default",
                              max_spins: Optional[int] = None,
                              read_flag: bool = True) -> torch.Tensor:
    """Triton path of :func:`greedy_map_batched` (any device: CPU runs the interpreter).

    ``k_max`` (= max(ks), optional) and ``check=False`` avoid the host synchronisations (the
    output width and the validation of ``ks``); ``materialize`` None: Gram when the S n_max^2
    fp32 matrices fit ``gram_limit_bytes``. ``split`` (Gram path only): split every segment
    over that many programs (``"auto"``: as many as the SMs allow) with a per-step barrier
    between them (:mod:`hieravid_kernels.dpp_coop`); falls back to one program per segment when
    they cannot all run at once (this check reads a flag back: one sync, and a warning;
    ``read_flag=False``: no read, the single-program fallback is launched behind it and runs
    only if the device flag says so -- what the serving path's stages use, so that the greedy
    never waits for the device). ``None``: one program per segment; ``"default"``:
    :func:`default_split` (``"auto"`` on CUDA). Host ``lengths`` / ``ks`` are copied to the
    device without a stream sync."""
    if features.dim() != 3:
        raise ValueError(f"features must be (S, n_max, C), got {tuple(features.shape)}")
    S, n_max, C = features.shape
    dev = features.device
    # checked where the counts live: host counts (core.frame_level_select passes them) need
    # no read-back, device counts one each
    if check and (bool((ks < 0).any()) or bool((ks > lengths.to(ks.device)).any())):
        raise ValueError("every k_s must be in [0, lengths[s]]")
    if k_max is None:
        k_max = int(ks.max()) if S else 0
    k_max = int(k_max)
    lengths = lengths.to(dev, torch.int64, non_blocking=True).contiguous()
    ks = ks.to(dev, torch.int64, non_blocking=True).contiguous()
    if k_max == 0 or S == 0:
        return torch.full((S, k_max), -1, dtype=torch.int64, device=dev)
    sc = (1.0 / C) if scale is None else float(scale)
    if materialize is None:
        materialize = S * n_max * n_max * 4 <= gram_limit_bytes
    W = weights.to(dev, torch.float32).contiguous() if weights is not None else None
    FB = (fallback_scores.to(dev, torch.float32).contiguous()
          if fallback_scores is not None else None)
    H = features.contiguous()
    if isinstance(split, str) and split == "default":
        split = default_split(dev)
    if materialize:
        G = gram_triton(H, lengths, W, sc)
        if split is not None:
            from .dpp_coop import launch_coop
            res = launch_coop(G, FB, lengths, ks, k_max, n_max, eps, _rel_eps(rel_eps), split,
                              block_n=block_n, block_s=block_s, max_spins=max_spins,
                              read_flag=read_flag)
            if res is not None and read_flag:
                return res
            if res is not None:        # the fallback, decided on the device by the flag
                sel, err = res
                return _launch_greedy(G, None, None, FB, lengths, ks, k_max, n_max, C, sc,
                                      eps, _rel_eps(rel_eps), True, block_n, block_s, block_c,
                                      num_warps, out=sel, run_if=err)
        return _launch_greedy(G, None, None, FB, lengths, ks, k_max, n_max, C, sc, eps,
                              _rel_eps(rel_eps), True, block_n, block_s, block_c, num_warps)
    return _launch_greedy(None, H, W, FB, lengths, ks, k_max, n_max, C, sc, eps,
                          _rel_eps(rel_eps), False, block_n, block_s, block_c, num_warps)


def greedy_map_explicit_triton(L: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor,
                               eps: float = 1e-10, rel_eps: Optional[float] = None,
                               fallback_scores: Optional[torch.Tensor] = None,
                               k_max: Optional[int] = None, block_n: Optional[int] = None,
                               block_s: Optional[int] = None,
                               num_warps: int = 8) -> torch.Tensor:
    """Greedy MAP on explicit kernels ``L`` (S, n_max, n_max) (each PSD on its lengths[s]
    block), one program per kernel; returns (S, max k) padded -1."""
    S, n_max, _ = L.shape
    dev = L.device
    lengths = lengths.to(dev, torch.int64).contiguous()
    ks = ks.to(dev, torch.int64).contiguous()
    if k_max is None:
        k_max = int(ks.max()) if S else 0
    if k_max == 0 or S == 0:
        return torch.full((S, int(k_max)), -1, dtype=torch.int64, device=dev)
    G = L.to(torch.float32).contiguous()
    FB = (fallback_scores.to(dev, torch.float32).contiguous()
          if fallback_scores is not None else None)
    return _launch_greedy(G, None, None, FB, lengths, ks, int(k_max), n_max, 0, 1.0, eps,
                          _rel_eps(rel_eps), True, block_n, block_s, None, num_warps)


# ------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------
def greedy_map_batched(features: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor,
                       weights: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       eps: float = 1e-10, rel_eps: Optional[float] = None,
                       fallback_scores: Optional[torch.Tensor] = None,
                       materialize: Optional[bool] = None, *, backend: str = "auto",
                       **triton_kwargs) -> torch.LongTensor:
    """Batched greedy MAP (same signature and result as the core reference): Triton on CUDA
    tensors (fp16/bf16/fp32 features), the reference elsewhere (and for float64 features,
    whose reference state is float64). Returns (S, max k) int64 padded with -1."""
    if features.dtype != torch.float64 and use_triton(backend, features):
        return greedy_map_batched_triton(features, lengths, ks, weights, scale, eps, rel_eps,
                                         fallback_scores, materialize, **triton_kwargs)
    from hieravid_vllm.core.dpp import greedy_map_batched as ref
    return ref(features, lengths, ks, weights, scale, eps, rel_eps, fallback_scores,
               materialize)


def greedy_map_batched_many(calls, *, backend: str = "auto", **triton_kwargs) -> list:
    """:func:`greedy_map_batched` on several calls (``core.dpp.GreedyCall`` each, one stage
    boundary's videos) -> their results, in order. Calls on CUDA tensors (fp16/bf16/fp32):
    one Triton launch each (a launch holding every video's segments would size its Gram
    scratch by the longest segment of all, S n_max^2: not measured on a GPU, so not done).
    The rest: the reference's :func:`hieravid_vllm.core.dpp.greedy_map_batched_many` in one
    call (on CPU: every video's segments in length buckets, in lockstep)."""
    from hieravid_vllm.core.dpp import greedy_map_batched_many as ref

    out = [None] * len(calls)
    rest = []
    for i, c in enumerate(calls):
        if c.features.dtype != torch.float64 and use_triton(backend, c.features):
            kw = dict(triton_kwargs)
            if c.k_max is not None:   # device ks (the sync-free boundary): no read-back
                kw.update(k_max=c.k_max, check=False)
            out[i] = greedy_map_batched_triton(c.features, c.lengths, c.ks, c.weights, c.scale,
                                               c.eps, c.rel_eps, c.fallback_scores,
                                               c.materialize, **kw)
        else:
            rest.append(i)
    for i, sel in zip(rest, ref([calls[i] for i in rest]) if rest else []):
        out[i] = sel
    return out


def greedy_map(L: torch.Tensor, k: int, eps: float = 1e-10, rel_eps: Optional[float] = None,
               fallback_scores: Optional[torch.Tensor] = None, *,
               backend: str = "auto") -> torch.LongTensor:
    """Greedy MAP on one explicit PSD kernel ``L`` (n, n) -> (k,) indices in selection order
    (same contract as :func:`hieravid_vllm.core.dpp.greedy_map`)."""
    if L.dtype != torch.float64 and use_triton(backend, L):
        from hieravid_vllm.core.dpp import check_greedy_args
        n, k = check_greedy_args(L, k)
        dev = L.device
        fb = None if fallback_scores is None else fallback_scores.reshape(1, n)
        sel = greedy_map_explicit_triton(
            L.unsqueeze(0), torch.tensor([n], device=dev), torch.tensor([k], device=dev),
            eps, rel_eps, fb, k_max=k)
        return sel[0]
    from hieravid_vllm.core.dpp import greedy_map as ref
    return ref(L, k, eps, rel_eps, fallback_scores)
