"""One frame-level pruning stage with the Triton greedy MAP.

:func:`frame_level_select` is :func:`hieravid_vllm.core.dpp.frame_level_select` (relevance,
per-segment counts, padded segment layout, greedy MAP or relevance top-k) with its batched greedy
MAP replaced by the dispatch :func:`hieravid_kernels.greedy_map_batched` (Triton on CUDA
tensors): one implementation of the stage, two greedy MAP backends.
:func:`frame_level_select_many` is the same for the videos of one stage boundary, with one
device read for all of them (:func:`hieravid_vllm.core.dpp.frame_level_select_many`) and all
their greedy MAPs in one :func:`hieravid_kernels.greedy_map_batched_many` call (CUDA: one
launch per video; CPU: the reference's length buckets over all videos' segments); its
greedy launches never read anything back (``read_flag=False``: the multi-program kernel's
fallback is decided on the device).
"""
import functools
from typing import Optional

import torch

from .dpp import greedy_map_batched, greedy_map_batched_many

__all__ = ["frame_level_select", "frame_level_select_many"]


def _greedy(backend: str, split, read_flag: bool = True, many: bool = False):
    kw = {} if split is None else {"split": split}
    if not read_flag:
        kw["read_flag"] = False
    return functools.partial(greedy_map_batched_many if many else greedy_map_batched,
                             backend=backend, **kw)


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

    return core_select(hidden, query, segment_ids, target, HieraVidConfig.coerce(config),
                       use_dpp=use_dpp, num_segments=num_segments,
                       greedy=_greedy(backend, split))


def frame_level_select_many(inputs, *, backend: str = "auto", split=None,
                            device_counts: bool = False):
    """:func:`frame_level_select` on the videos of one stage boundary (a sequence of
    :class:`hieravid_vllm.core.dpp.StageInput`): per video (kept positions, kept tokens per
    segment on the host), one device read for all of them; ``device_counts``: none (the
    sync-free boundary, counts returned on the device)."""
    from hieravid_vllm.core.dpp import frame_level_select_many as core_many

    return core_many(inputs, greedy_many=_greedy(backend, split, read_flag=False, many=True),
                     device_counts=device_counts)
