"""Static-token merging (Eq. 3) as two Triton kernels.

Reference: :func:`hieravid_vllm.core.segment.merge_static_tokens` (same outputs, returned as the
same :class:`~hieravid_vllm.core.segment.MergeResult`).

Token (t, p) is a run head (kept) unless row t-1 of the static mask flags it; a maximal run of
static tokens t1..t2 at position p is averaged together with its head t0 = t1 - 1 into the head's
slot. Kept tokens are numbered in raster order (t, then p).

1. ``_merge_index_kernel`` -- one program, tiles of BLOCK_T frames x all P positions, T / BLOCK_T
   sequential steps (8 for 64 frames x 169 positions): the rank of every head is the number of
   heads in earlier frames (carried) plus prefix sums (``tl.cumsum``) over the tile's frames and
   over positions within a frame; the head of every token's run is a forward fill along time
   (``tl.associative_scan`` with max; ranks grow with time); a run's length is written at its
   last token (the next frame's token at that position is a head: the static row one frame
   ahead, loaded again); segment ids are renumbered exactly as the reference (+1 at every change
   of the frame's segment id between consecutive kept tokens). Writes ``flat_indices``, ``thw``,
   ``segment_ids``, ``run_length``, ``source_to_kept``: integer work on N = T P elements.
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

from ._utils import build, empty, jit_helper, next_pow2, tl, use_triton

__all__ = ["merge_static_tokens", "merge_static_tokens_triton"]


@jit_helper
def _max_combine(a, b):
    return tl.maximum(a, b)


def _merge_index_kernel(STATIC, FSEG, FLAT, THW, SEG, RUNLEN, SRC2KEPT, T, P, W,
                        HAS_FSEG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program; (BLOCK_T frames x all positions) tiles, T / BLOCK_T sequential steps."""
    pp = tl.arange(0, BLOCK_P)
    pm = pp < P
    tt = tl.arange(0, BLOCK_T)
    # int32 inside (N = T P < 2^31), int64 in the outputs
    base = tl.sum(tl.zeros([BLOCK_P], dtype=tl.int32), axis=0)   # kept tokens in earlier frames
    cur_id = base                                                  # current renumbered segment
    last_has = base - 1                      # last frame with kept tokens before this block
    prev_rank = tl.full([BLOCK_P], -1, tl.int32)   # rank of the open run's head, per position
    prev_t = tl.full([BLOCK_P], -1, tl.int32)      # frame of that head
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        tm = t < T
        m2 = tm[:, None] & pm[None, :]
        # token (t, p) is a run head unless static row t - 1 flags it (frame 0: all heads)
        st = tl.load(STATIC + (t - 1)[:, None] * P + pp[None, :],
                     mask=m2 & (t >= 1)[:, None], other=0)
        head = m2 & (st == 0)
        hi = head.to(tl.int32)
        hcount = tl.sum(hi, axis=1)                                   # heads per frame
        frame_off = base + tl.cumsum(hcount, axis=0) - hcount
        rank = frame_off[:, None] + tl.cumsum(hi, axis=1) - hi       # kept rank (raster order)
        tok = t[:, None] * P + pp[None, :]
        tl.store(FLAT + rank, tok.to(tl.int64), mask=head)
        tl.store(THW + rank * 3, (t[:, None] + 0 * pp[None, :]).to(tl.int64), mask=head)
        tl.store(THW + rank * 3 + 1, (0 * t[:, None] + pp[None, :] // W).to(tl.int64),
                 mask=head)
        tl.store(THW + rank * 3 + 2, (0 * t[:, None] + pp[None, :] % W).to(tl.int64),
                 mask=head)
        # every token -> its run head: forward fill of the head rank / frame along t
        fr = tl.associative_scan(tl.where(head, rank, -1), 0, _max_combine)
        fr = tl.maximum(fr, prev_rank[None, :])
        ft = tl.associative_scan(tl.where(head, t[:, None] + 0 * pp[None, :], -1), 0,
                                 _max_combine)
        ft = tl.maximum(ft, prev_t[None, :])
        tl.store(SRC2KEPT + tok, fr.to(tl.int64), mask=m2)
        # run length, written at the run's last token (next frame's token is a head, or t = T-1)
        stn = tl.load(STATIC + t[:, None] * P + pp[None, :], mask=m2 & (t + 1 < T)[:, None],
                      other=0)
        last = m2 & ((t + 1 >= T)[:, None] | (stn == 0))
        tl.store(RUNLEN + fr, (t[:, None] - ft + 1).to(tl.int64), mask=last)
        # segment ids: +1 whenever the frame's id differs from the previous frame with kept
        # tokens (the reference's change between consecutive kept tokens)
        if HAS_FSEG:
            stp = tl.load(STATIC + (t - 2)[:, None] * P + pp[None, :],
                          mask=m2 & (t >= 2)[:, None], other=0)
            hprev = tl.sum((m2 & (t >= 1)[:, None] & (stp == 0)).to(tl.int32), axis=1)
            prev_has = tl.associative_scan(tl.where(hprev > 0, t - 1, -1), 0, _max_combine)
            prev_has = tl.maximum(prev_has, last_has)
            sr = tl.load(FSEG + t, mask=tm, other=0)
            ps = tl.load(FSEG + tl.maximum(prev_has, 0), mask=tm, other=0)
            change = (hcount > 0) & (t >= 1) & (prev_has >= 0) & (sr != ps)
            ids = cur_id + tl.cumsum(change.to(tl.int32), axis=0)
            tl.store(SEG + rank, (ids[:, None] + 0 * rank).to(tl.int64), mask=head)
            cur_id = cur_id + tl.sum(change.to(tl.int32), axis=0)
            last_has = tl.maximum(last_has, tl.max(tl.where(tm & (hcount > 0), t, -1), axis=0))
        else:
            tl.store(SEG + rank, (0 * rank).to(tl.int64), mask=head)
        base = base + tl.sum(hcount, axis=0)
        prev_rank = tl.maximum(prev_rank, tl.max(tl.where(m2, fr, -1), axis=0))
        prev_t = tl.maximum(prev_t, tl.max(tl.where(m2, ft, -1), axis=0))


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
                               block_c: Optional[int] = None, num_warps: int = 4,
                               block_t: Optional[int] = None):
    """Triton kernels for :func:`merge_static_tokens` (any device: CPU runs the interpreter)."""
    from hieravid_vllm.core.segment import MergeResult, check_merge_args

    T, Hh, Ww, C = check_merge_args(F, static_mask)
    P = Hh * Ww
    N = T * P
    dev = F.device
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
    bp = next_pow2(P)
    bt = block_t or max(1, min(next_pow2(T), 2048 // bp))   # frames per index-kernel step
    build(_merge_index_kernel, dev)[(1,)](
        static, fseg, flat, thw, seg, run_len, src2kept, T, P, Ww,
        HAS_FSEG=has_fseg, BLOCK_T=bt, BLOCK_P=bp, **({} if dev.type == "cpu" else
                                                       {"num_warps": 8}))
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
    return ref(F, static_mask, frame_segment_ids, num_kept=num_kept)
