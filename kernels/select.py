"""One frame-level pruning stage with the Triton greedy MAP.

:func:`frame_level_select` is :func:`hieravid_vllm.core.dpp.frame_level_select` (relevance,
per-segment counts, padded segment layout, greedy MAP or relevance top-k) with its batched greedy
MAP replaced by the dispatch :func:`hieravid_kernels.greedy_map_batched` (Triton on CUDA
tensors): one implementation of the stage, two greedy MAP backends.
"""
import functools
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
    the greedy launch (Triton path only; None: ``default_split``, the multi-program kernel on
    CUDA)."""
    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.dpp import frame_level_select as core_select

    kw = {} if split is None else {"split": split}
    greedy = functools.partial(greedy_map_batched, backend=backend, **kw)
    return core_select(hidden, query, segment_ids, target, HieraVidConfig.coerce(config),
                       use_dpp=use_dpp, num_segments=num_segments, greedy=greedy)
