"""Segment level (Sec. 3.1.1): similarity map, Top-K, segmentation, static-token merging.

Reference implementations (the Triton kernels are tested against these):

* :func:`similarity_map` (Eq. 1)          F (T, H', W', C) -> S (T-1, H', W') fp32
* :func:`static_topk`                      S, K -> bool mask (T-1, H', W')
* :func:`merge_static_tokens` (Eq. 3)      F, static mask -> :class:`MergeResult`

All are vectorised over tokens and frames (no Python loop over positions or frames).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .config import HieraVidConfig

__all__ = [
    "similarity_map",
    "static_topk",
    "overlap_ratio",
    "segments_from_overlap",
    "segments_avg_pool",
    "frame_segments",
    "MergeResult",
    "check_merge_args",
    "merge_static_tokens",
]

_EPS = 1e-12


def similarity_map(F: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Eq. 1: S_t(i, j) = cos(F_t(i, j), F_{t-1}(i, j)) for t = 1..T-1.

    ``F`` (T, H', W', C) in any float dtype; computed in fp32. Returns (T-1, H', W') fp32
    (row t-1 holds S_t). A zero vector has similarity 0 with everything (the denominator is
    clamped to ``eps``), never NaN.
    """
    if F.dim() != 4:
        raise ValueError(f"F must be (T, H', W', C), got shape {tuple(F.shape)}")
    x = F.to(torch.float32)
    if x.shape[0] < 2:
        return x.new_zeros((0,) + tuple(x.shape[1:3]))
    norms = torch.linalg.vector_norm(x, dim=-1)
    num = (x[1:] * x[:-1]).sum(-1)
    den = (norms[1:] * norms[:-1]).clamp_min(eps)
    return num / den


def static_topk(S: torch.Tensor, K: int) -> torch.Tensor:
    """Top-K of the similarity map over the whole video (Sec. 3.1.1) as a bool mask.

    Deterministic tie-break: by value descending, then by flat (t, i, j) index ascending
    (a stable sort of -S); NaN counts as -inf. ``K`` is clamped to [0, S.numel()].
    """
    flat = torch.nan_to_num(S.reshape(-1).to(torch.float32), nan=float("-inf"))
    K = max(0, min(int(K), flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=S.device)
    if K > 0:
        order = torch.sort(-flat, stable=True).indices
        mask[order[:K]] = True
    return mask.reshape(S.shape)


def overlap_ratio(static_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: O_t = share of frame t's positions in the Top-K, t = 1..T-1 -> (T-1,) fp32."""
    return static_mask.reshape(static_mask.shape[0], -1).to(torch.float32).mean(-1)


def segments_from_overlap(O: torch.Tensor, beta: float) -> torch.Tensor:
    """Segment id per frame (T,): frame 0 starts segment 0, a new one starts where O_t < beta."""
    boundary = (O < beta).to(torch.int64)
    return torch.cat([boundary.new_zeros(1), torch.cumsum(boundary, 0)])


def segments_avg_pool(F: torch.Tensor, threshold: float, eps: float = _EPS) -> torch.Tensor:
    """Table 5 ablation: boundary where cos(mean-pooled frame t, frame t-1) < threshold."""
    g = F.to(torch.float32).reshape(F.shape[0], -1, F.shape[-1]).mean(1)
    n = torch.linalg.vector_norm(g, dim=-1)
    cos = (g[1:] * g[:-1]).sum(-1) / (n[1:] * n[:-1]).clamp_min(eps)
    boundary = (cos < threshold).to(torch.int64)
    return torch.cat([boundary.new_zeros(1), torch.cumsum(boundary, 0)])


def frame_segments(F: torch.Tensor, config: HieraVidConfig, S: Optional[torch.Tensor] = None,
                   K_seg: Optional[int] = None,
                   static_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Segment id per frame (T,) according to ``config.segmentation``.

    merge_ratio (paper, Eq. 1-2): boundaries where O_t < beta for the Top-``K_seg`` of S
    (``static_mask``, if given, is that Top-K already computed). With K_seg = 0 nothing is in
    the Top-K (O_t undefined): one segment. none: one segment. avg_pool:
    :func:`segments_avg_pool`.
    """
    T = F.shape[0]
    dev = F.device
    if config.segmentation == "none" or T <= 1:
        return torch.zeros(T, dtype=torch.int64, device=dev)
    if config.segmentation == "avg_pool":
        return segments_avg_pool(F, config.avg_pool_threshold)
    if S is None and static_mask is None:
        S = similarity_map(F)
    if not K_seg:
        return torch.zeros(T, dtype=torch.int64, device=dev)
    if static_mask is None:
        static_mask = static_topk(S, K_seg)
    return segments_from_overlap(overlap_ratio(static_mask), config.beta)


@dataclass(frozen=True)
class MergeResult:
    """Output of :func:`merge_static_tokens` (n = N - K kept tokens, raster order).

    features: (n, C) merged features (input dtype; means accumulated in fp32).
    flat_indices: (n,) int64 flat index t * H' * W' + i * W' + j of each kept token (the
        first token t0 of its run), ascending.
    thw: (n, 3) int64 (t, i, j) of the same tokens (for M-RoPE positions).
    segment_ids: (n,) int64 segment of each kept token (the segment of its frame t0),
        renumbered 0..M-1 in temporal order skipping segments left without tokens.
    run_length: (n,) int64 number of original tokens averaged into each kept token.
    source_to_kept: (N,) int64 for every original token, the kept token it was merged into.
    """

    features: torch.Tensor
    flat_indices: torch.Tensor
    thw: torch.Tensor
    segment_ids: torch.Tensor
    run_length: torch.Tensor
    source_to_kept: torch.Tensor

    @property
    def num_segments(self) -> int:
        return int(self.segment_ids.max()) + 1 if self.segment_ids.numel() else 0


def check_merge_args(F: torch.Tensor, static_mask: torch.Tensor) -> Tuple[int, int, int, int]:
    """Validate the shapes of :func:`merge_static_tokens`' inputs -> (T, H', W', C)."""
    if F.dim() != 4:
        raise ValueError(f"F must be (T, H', W', C), got shape {tuple(F.shape)}")
    T, Hh, Ww, C = F.shape
    if static_mask.shape != (max(T - 1, 0), Hh, Ww):
        raise ValueError(f"static_mask must be {(max(T - 1, 0), Hh, Ww)}, got "
                         f"{tuple(static_mask.shape)}")
    return T, Hh, Ww, C


def merge_static_tokens(F: torch.Tensor, static_mask: torch.Tensor,
                        frame_segment_ids: Optional[torch.Tensor] = None, *,
                        num_kept: Optional[int] = None) -> MergeResult:
    """Eq. 3: static-token merging.

    ``F`` (T, H', W', C); ``static_mask`` (T-1, H', W') bool, row t-1 flags token (t, i, j)
    as static (S_t(i, j) in the Top-K). Each maximal run of static tokens t1..t2 at one
    position is merged with the token right before it, t0 = t1 - 1 (not static by
    maximality), into one token = mean of F_{t0..t2}(i, j) placed at t0; the run's other
    tokens are dropped. Exactly ``static_mask.sum()`` tokens are dropped, so the count is
    known before the content.

    Runs may cross segment boundaries (choice: the paper merges "across the whole video"
    and forbidding it would make the dropped count content-dependent); the merged token
    belongs to the segment of t0. A token that is not merged is returned bit-exactly.
    Vectorised: run heads by a cumulative max over t, sums by ``index_add_`` over run ids.

    ``num_kept`` (optional): the caller's count N - K of kept tokens (the Triton kernel needs it
    to allocate its outputs without a host read); checked here against the mask.
    """
    T, Hh, Ww, C = check_merge_args(F, static_mask)
    P = Hh * Ww
    N = T * P
    dev = F.device
    static = torch.zeros(T, P, dtype=torch.bool, device=dev)
    if T > 1:
        static[1:] = static_mask.reshape(T - 1, P).to(dev, torch.bool)
    head = ~static                                           # (T, P) run heads / kept tokens
    tt = torch.arange(T, device=dev).unsqueeze(1).expand(T, P)
    head_t = torch.cummax(torch.where(head, tt, torch.zeros_like(tt)), dim=0).values
    pos = torch.arange(P, device=dev).unsqueeze(0)
    head_flat = (head_t * P + pos).reshape(-1)               # (N,) flat index of each run head
    head_f = head.reshape(-1)
    rank = torch.cumsum(head_f.to(torch.int64), 0) - 1       # kept rank of each head
    src2kept = rank[head_flat]                               # (N,)
    flat_idx = torch.nonzero(head_f).squeeze(-1)
    n = flat_idx.numel()
    if num_kept is not None and int(num_kept) != n:
        raise ValueError(f"num_kept={num_kept} but the static mask keeps {n} of {N} tokens")
    sums = torch.zeros(n, C, dtype=torch.float32, device=dev)
    sums.index_add_(0, src2kept, F.reshape(N, C).to(torch.float32))
    run_len = torch.bincount(src2kept, minlength=n)
    feats = (sums / run_len.unsqueeze(-1).to(torch.float32)).to(F.dtype)
    t = flat_idx // P
    rem = flat_idx % P
    thw = torch.stack([t, rem // Ww, rem % Ww], dim=-1)
    if frame_segment_ids is None:
        seg = torch.zeros(n, dtype=torch.int64, device=dev)
    else:
        seg_raw = frame_segment_ids.to(dev, torch.int64)[t]
        # renumber 0..M-1 (seg_raw is non-decreasing in raster order)
        change = torch.ones_like(seg_raw)
        if n > 1:
            change[1:] = (seg_raw[1:] != seg_raw[:-1]).to(torch.int64)
        seg = torch.cumsum(change, 0) - 1
    return MergeResult(feats, flat_idx, thw, seg, run_len, src2kept)
