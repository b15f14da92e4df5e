"""Adjacent-frame cosine similarity map (Eq. 1) as one Triton kernel.

Reference: :func:`hieravid_vllm.core.segment.similarity_map`.

S_t(p) = <F_t(p), F_{t-1}(p)> / max(|F_t(p)| |F_{t-1}(p)|, eps) for t = 1..T-1, every spatial
position p, fp32 accumulation whatever the input dtype.

Launch layout: the (T-1) x P output is cut into tiles of BLOCK_T frames x BLOCK_P positions; a
program loops over the channels in BLOCK_C slices, loading its tile of frames t and the same tile
shifted one frame back (frames t-1), and accumulates the dot product and both squared norms in
fp32 registers. The shifted tile overlaps the unshifted one in BLOCK_T - 1 of its BLOCK_T frames
(same program, same instant: served by L1/L2) and program ids run fastest along time, so the
halo frame of a tile is the last frame of the tile launched just before it: each feature crosses
DRAM about once. One launch, no host synchronisation.
"""
import torch

from ._utils import build, empty, next_pow2, tl, use_triton

__all__ = ["similarity_map", "similarity_map_triton"]


def _similarity_kernel(F, S, T, P, C, eps,
                       BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_p = tl.program_id(1)
    t0 = 1 + pid_t * BLOCK_T                         # first frame of the tile (1..T-1)
    r = tl.arange(0, BLOCK_T * BLOCK_P)
    t_rel = r // BLOCK_P
    p = pid_p * BLOCK_P + r % BLOCK_P
    row_ok = (t0 + t_rel < T) & (p < P)
    # 64-bit scalar base, 32-bit offsets inside the tile (BLOCK_T frames: < 2^31 elements)
    cur_base = F + t0.to(tl.int64) * P * C           # F[t0, 0, 0]
    prev_base = cur_base - P * C                     # F[t0 - 1, 0, 0]
    off = (t_rel * P + p) * C
    cols = tl.arange(0, BLOCK_C)
    dot = tl.zeros([BLOCK_T * BLOCK_P], dtype=tl.float32)
    n_cur = tl.zeros([BLOCK_T * BLOCK_P], dtype=tl.float32)
    n_prev = tl.zeros([BLOCK_T * BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        m = row_ok[:, None] & (c < C)[None, :]
        o = off[:, None] + c[None, :]
        a = tl.load(cur_base + o, mask=m, other=0.0).to(tl.float32)
        b = tl.load(prev_base + o, mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        n_cur += tl.sum(a * a, axis=1)
        n_prev += tl.sum(b * b, axis=1)
    den = tl.maximum(tl.sqrt(n_cur) * tl.sqrt(n_prev), eps)
    out = (t0 - 1).to(tl.int64) * P + t_rel * P + p
    tl.store(S + out, dot / den, mask=row_ok)


def similarity_map_triton(F: torch.Tensor, eps: float = 1e-12, block_t: int = 4,
                          block_p: int = 8, block_c: int = None,
                          num_warps: int = 4) -> torch.Tensor:
    """Triton kernel for :func:`similarity_map` (any device: CPU runs the interpreter)."""
    if F.dim() != 4:
        raise ValueError(f"F must be (T, H', W', C), got shape {tuple(F.shape)}")
    T, Hh, Ww, C = F.shape
    P = Hh * Ww
    if T < 2:
        return torch.zeros((0, Hh, Ww), dtype=torch.float32, device=F.device)
    S = empty((T - 1, Hh, Ww), torch.float32, F.device)
    if P == 0:
        return S
    x = F.contiguous()
    if block_c is None:
        block_c = min(128, max(16, next_pow2(C)))
    grid = (triton_cdiv(T - 1, block_t), triton_cdiv(P, block_p))
    kern = build(_similarity_kernel, F.device)
    kwargs = {} if F.device.type == "cpu" else {"num_warps": num_warps}
    kern[grid](x, S, T, P, C, float(eps), BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_C=block_c,
               **kwargs)
    return S


def triton_cdiv(a: int, b: int) -> int:
    return (int(a) + int(b) - 1) // int(b)


def similarity_map(F: torch.Tensor, eps: float = 1e-12, *, backend: str = "auto") -> torch.Tensor:
    """Eq. 1 similarity map (T-1, H', W') fp32: Triton on CUDA tensors, reference elsewhere
    (``backend``: ``"auto"`` | ``"triton"`` | ``"torch"``, see :mod:`hieravid_kernels._utils`)."""
    if use_triton(backend, F):
        return similarity_map_triton(F, eps)
    from hieravid_vllm.core.segment import similarity_map as ref
    return ref(F, eps)
