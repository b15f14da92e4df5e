"""Static-token merging (Eq. 3) as two Triton kernels.

Reference: :func:`hieravid_vllm.core.segment.merge_static_tokens` (same outputs, returned as the
same :class:`~hieravid_vllm.core.segment.MergeResult`).

Token (t, p) is a run head (kept) unless row t-1 of the static mask flags it; a maximal run of
static tokens t1..t2 at position p is averaged together with its head t0 = t1 - 1 into the head's
slot. Kept tokens are numbered in raster order (t, then p).

1. ``_merge_index_kernel`` -- one program, vectors over the P positions, one sequential pass over
   the T frames: the rank of every head is the running count of heads in earlier frames plus an
   exclusive prefix sum (``tl.cumsum``) over positions within the frame; it writes
   ``flat_indices``, ``thw``, ``segment_ids`` (renumbered exactly as the reference: +1 at every
   change of the frame's segment id between consecutive kept tokens), ``source_to_kept`` (the rank
   of the current run head, for every token) and ``run_length`` (written when a run closes).
   Integer work on N = T P elements: a few microseconds.
2. ``_merge_features_kernel`` -- grid (position blocks, channel blocks); each program walks the
   frames once, keeping the running fp32 sum and count of the open run of each of its positions in
   registers; when a new head arrives the closed run's mean is written to the kept row of its head
   (the rank read from ``source_to_kept``), the last runs are written after the loop. Every feature
   is read once, every kept row written once; summation order (t ascending, from zero, divided by
   the count in fp32, cast to the input dtype) is the reference's, so unmerged tokens come back
   bit-exactly.

The number of kept tokens N - K must be known to allocate the outputs: pass ``num_kept`` (the
schedule knows it: N - merge_count) to avoid the one host synchronisation (``static_mask.sum()``).
"""
from typing import Optional

import torch

from ._utils import build, empty, next_pow2, tl, use_triton

__all__ = ["merge_static_tokens", "merge_static_tokens_triton"]


def _merge_index_kernel(STATIC, FSEG, FLAT, THW, SEG, RUNLEN, SRC2KEPT, T, P, W,
                        HAS_FSEG: tl.constexpr, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    pm = offs < P
    zero = tl.zeros([BLOCK_P], dtype=tl.int64)
    head_rank = zero
    run_cnt = zero
    base = tl.sum(zero, axis=0)          # int64 scalar 0: kept tokens in earlier frames
    cur_seg = base
    if HAS_FSEG:
        last_seg = tl.load(FSEG).to(tl.int64)
    else:
        last_seg = base
    for t in range(0, T):
        if t == 0:
            head = pm
        else:
            st = tl.load(STATIC + (t - 1) * P + offs, mask=pm, other=1)
            head = pm & (st == 0)
        hi = head.to(tl.int64)
        nh = tl.sum(hi, axis=0)
        rank = base + tl.cumsum(hi, axis=0) - hi
        # close the runs at positions where a new run starts
        tl.store(RUNLEN + head_rank, run_cnt, mask=head & (t > 0))
        head_rank = tl.where(head, rank, head_rank)
        run_cnt = tl.where(head, 1, run_cnt + 1)
        tok = t * P + offs
        tl.store(SRC2KEPT + tok, head_rank, mask=pm)
        tl.store(FLAT + rank, tok.to(tl.int64), mask=head)
        tl.store(THW + rank * 3, zero + t, mask=head)
        tl.store(THW + rank * 3 + 1, (offs // W).to(tl.int64), mask=head)
        tl.store(THW + rank * 3 + 2, (offs % W).to(tl.int64), mask=head)
        if HAS_FSEG:
            sr = tl.load(FSEG + t).to(tl.int64)
            new_seg = (nh > 0) & (sr != last_seg)
            cur_seg = cur_seg + new_seg.to(tl.int64)
            last_seg = tl.where(nh > 0, sr, last_seg)
        tl.store(SEG + rank, zero + cur_seg, mask=head)
        base = base + nh
    tl.store(RUNLEN + head_rank, run_cnt, mask=pm)


def _merge_features_kernel(F, STATIC, SRC2KEPT, OUT, T, P, C,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                           BF16_RNE: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < P
    m2 = pm[:, None] & (c < C)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_P], dtype=tl.float32)
    row = tl.zeros([BLOCK_P], dtype=tl.int64)
    for t in range(0, T):
        if t == 0:
            head = pm
        else:
            st = tl.load(STATIC + (t - 1) * P + p, mask=pm, other=1)
            head = pm & (st == 0)
        # write the runs that close here (their head's kept row) before starting new ones
        close = head & (t > 0)
        mean = acc / tl.maximum(cnt, 1.0)[:, None]
        if BF16_RNE:  # interpreter: its fp32 -> bf16 cast truncates; round to nearest even
            bits = mean.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            outv = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            outv = mean.to(OUT.dtype.element_ty)
        tl.store(OUT + row[:, None] * C + c[None, :], outv, mask=close[:, None] & m2)
        x = tl.load(F + (t * P + p).to(tl.int64)[:, None] * C + c[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        acc = tl.where(head[:, None], x, acc + x)
        cnt = tl.where(head, 1.0, cnt + 1.0)
        r = tl.load(SRC2KEPT + t * P + p, mask=head, other=0)
        row = tl.where(head, r, row)
    mean = acc / tl.maximum(cnt, 1.0)[:, None]
    if BF16_RNE:
        bits = mean.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        outv = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        outv = mean.to(OUT.dtype.element_ty)
    tl.store(OUT + row[:, None] * C + c[None, :], outv, mask=m2)


def merge_static_tokens_triton(F: torch.Tensor, static_mask: torch.Tensor,
                               frame_segment_ids: Optional[torch.Tensor] = None,
                               num_kept: Optional[int] = None, block_p: int = 16,
                               block_c: Optional[int] = None, num_warps: int = 4):
    """Triton kernels for :func:`merge_static_tokens` (any device: CPU runs the interpreter)."""
    from hieravid_vllm.core.segment import MergeResult

    if F.dim() != 4:
        raise ValueError(f"F must be (T, H', W', C), got shape {tuple(F.shape)}")
    T, Hh, Ww, C = F.shape
    P = Hh * Ww
    N = T * P
    dev = F.device
    if static_mask.shape != (max(T - 1, 0), Hh, Ww):
        raise ValueError(f"static_mask must be {(max(T - 1, 0), Hh, Ww)}, got "
                         f"{tuple(static_mask.shape)}")
    static = static_mask.to(dev, torch.bool).contiguous().view(torch.uint8)
    if num_kept is None:
        num_kept = N - int(static.sum())
    n = int(num_kept)
    i64 = torch.int64
    flat = empty((n,), i64, dev)
    thw = empty((n, 3), i64, dev)
    seg = empty((n,), i64, dev)
    run_len = empty((n,), i64, dev)
    src2kept = empty((N,), i64, dev)
    feats = empty((n, C), F.dtype, dev)
    if N == 0:
        return MergeResult(feats, flat, thw, seg, run_len, src2kept)
    has_fseg = frame_segment_ids is not None
    fseg = (frame_segment_ids.to(dev, i64).contiguous() if has_fseg
            else torch.zeros(1, dtype=i64, device=dev))
    kw = {} if dev.type == "cpu" else {"num_warps": num_warps}
    build(_merge_index_kernel, dev)[(1,)](
        static, fseg, flat, thw, seg, run_len, src2kept, T, P, Ww,
        HAS_FSEG=has_fseg, BLOCK_P=next_pow2(P), **({} if dev.type == "cpu" else
                                                     {"num_warps": 8 if P > 1024 else 4}))
    if C > 0:
        if block_c is None:
            block_c = min(128, max(16, next_pow2(C)))
        grid = ((P + block_p - 1) // block_p, (C + block_c - 1) // block_c)
        build(_merge_features_kernel, dev)[grid](
            F.contiguous(), static, src2kept, feats, T, P, C,
            BLOCK_P=block_p, BLOCK_C=block_c,
            BF16_RNE=(dev.type == "cpu" and F.dtype == torch.bfloat16), **kw)
    return MergeResult(feats, flat, thw, seg, run_len, src2kept)


def merge_static_tokens(F: torch.Tensor, static_mask: torch.Tensor,
                        frame_segment_ids: Optional[torch.Tensor] = None, *,
                        num_kept: Optional[int] = None, backend: str = "auto"):
    """Eq. 3 static-token merging -> :class:`~hieravid_vllm.core.segment.MergeResult`: Triton on
    CUDA tensors, reference elsewhere. ``num_kept`` (N - K, optional) lets the Triton path
    allocate its outputs without reading the mask back to the host."""
    if use_triton(backend, F, static_mask):
        return merge_static_tokens_triton(F, static_mask, frame_segment_ids, num_kept)
    from hieravid_vllm.core.segment import merge_static_tokens as ref
    return ref(F, static_mask, frame_segment_ids)
