"""One frame-level pruning stage with the Triton greedy MAP (mirror of the core reference).

:func:`frame_level_select` is :func:`hieravid_vllm.core.dpp.frame_level_select` step for step
(relevance, per-segment counts, padded segment layout, greedy MAP or relevance top-k), with the
batched greedy MAP going through :func:`hieravid_kernels.greedy_map_batched` (Triton on CUDA
tensors). The tests check that both return the same tokens.
"""
from typing import Optional

import torch

from .dpp import greedy_map_batched

__all__ = ["frame_level_select"]


def frame_level_select(hidden: torch.Tensor, query: Optional[torch.Tensor],
                       segment_ids: torch.Tensor, target: int, config=None,
                       use_dpp: bool = True, num_segments: Optional[int] = None, *,
                       backend: str = "auto", split=None) -> torch.LongTensor:
    """Keep ``target`` of the ``hidden`` (n, C) tokens, ascending positions (see the core
    function for the algorithm); ``backend`` picks the greedy MAP implementation, ``split``
    the experimental multi-program kernel (Triton path only)."""
    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.dpp import kernel_features, relevance, segment_layout
    from hieravid_vllm.core.schedule import segment_counts

    config = HieraVidConfig.coerce(config)
    n = hidden.shape[0]
    dev = hidden.device
    target = int(target)
    if not 0 <= target <= n:
        raise ValueError(f"target must be in [0, {n}], got {target}")
    if target == n:
        return torch.arange(n, dtype=torch.int64, device=dev)
    if target == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    seg = segment_ids.to(dev, torch.int64)
    index, lengths = segment_layout(seg, num_segments)
    M = index.shape[0]
    r = relevance(hidden, query, config.relevance_sign, config.relevance_source)
    ks = segment_counts(hidden, seg, target, config, num_segments=M).to(dev)
    valid = index >= 0
    safe = index.clamp_min(0)
    r_pad = torch.where(valid, r[safe], torch.zeros_like(r[safe]))
    if use_dpp:
        V, sc = kernel_features(hidden, config.dpp_kernel)
        feats = V[safe]                                               # (M, n_max, C)
        kw = {} if split is None else {"split": split}
        sel = greedy_map_batched(feats, lengths, ks, weights=r_pad, scale=sc,
                                 eps=config.dpp_eps, fallback_scores=r_pad, backend=backend,
                                 **kw)
    else:
        key = torch.where(valid, -r_pad, torch.full_like(r_pad, float("inf")))
        sel = torch.sort(key, dim=-1, stable=True).indices[:, : int(ks.max())]
        ar = torch.arange(sel.shape[1], device=dev).unsqueeze(0)
        sel = torch.where(ar < ks.unsqueeze(-1), sel, torch.full_like(sel, -1))
    keep = sel >= 0
    tok = index.gather(1, sel.clamp_min(0))[keep]
    return torch.sort(tok).values
