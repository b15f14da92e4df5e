"""Top-level entry points of the HieraVid core.

* :func:`prune_input_stage` -- one video's features (T, H', W', C) before the LLM: similarity
  map, segmentation, static-token merging (Sec. 3.1.1); in ``input_only`` mode also the
  frame-level DPP down to the budget (Sec. 3.2, Table 4 ablation).
* :func:`select_layer_stage` -- one in-LLM stage (Sec. 3.3): the selection applied at a stage
  boundary to that layer's visual hidden states and the instruction token's hidden state,
  reusing the segment layout of the input stage; :func:`select_layer_stage_many` -- the same
  for the videos of a batch at one boundary, with one device read for all of them.

Both take ``ops``: the implementations of the three hot spots (similarity map, static-token
merging, frame-level DPP selection), any object with the attributes of :class:`PruneOps`.
Default: :data:`REFERENCE_OPS`, the pure-PyTorch references of this package. The serving path
passes ``hieravid_kernels.OPS`` (the kernel dispatch: Triton on CUDA tensors, these references
elsewhere); this package itself imports neither vLLM nor Triton.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .config import DEFAULT_NUM_LAYERS, HieraVidConfig
from .dpp import StageInput, frame_level_select, frame_level_select_many
from .schedule import StageSchedule, build_schedule, round_half_up
from .segment import (MergeResult, frame_segments, merge_static_tokens, similarity_map,
                      static_topk)

__all__ = ["InputStageResult", "PruneOps", "REFERENCE_OPS", "StageInput", "prune_input_stage",
           "select_layer_stage", "select_layer_stage_many"]


@dataclass(frozen=True)
class PruneOps:
    """The three hot spots of the pruning, as called by :func:`prune_input_stage` and
    :func:`select_layer_stage` (each with the signature and result of the reference):

    similarity_map(F) -> S (Eq. 1), :func:`~hieravid_vllm.core.segment.similarity_map`;
    merge_static_tokens(F, static_mask, frame_segment_ids, num_kept=N - K) -> MergeResult
    (Eq. 3), :func:`~hieravid_vllm.core.segment.merge_static_tokens`;
    frame_level_select(hidden, query, segment_ids, target, config, use_dpp=, num_segments=)
    -> kept positions (Sec. 3.2, Eq. 4-10), :func:`~hieravid_vllm.core.dpp.frame_level_select`;
    frame_level_select_many(inputs) -> [(kept positions, kept per segment)] for several
    videos with one device read, :func:`~hieravid_vllm.core.dpp.frame_level_select_many`
    (optional: an ``ops`` without it gets one ``frame_level_select`` call per video).
    """

    similarity_map: Callable = similarity_map
    merge_static_tokens: Callable = merge_static_tokens
    frame_level_select: Callable = frame_level_select
    frame_level_select_many: Callable = frame_level_select_many


REFERENCE_OPS = PruneOps()


@dataclass(frozen=True)
class InputStageResult:
    """Tokens entering the LLM for one video.

    kept_indices: (n,) int64 flat indices into the T * H' * W' tokens, ascending (for a
        merged token: its first token t0).
    features: (n, C) their features (merged means for merged runs, otherwise unchanged).
    thw: (n, 3) int64 (t, i, j) of the kept tokens (M-RoPE positions).
    segment_ids: (n,) int64 segment of each kept token (0..num_segments-1, temporal order).
    frame_segment_ids: (T,) int64 segment of every frame (before renumbering).
    schedule: the exact per-stage counts (``schedule.counts[0] == n``).
    merge: the full static-merging result (stage 1), before any input-level pruning.
    """

    kept_indices: torch.Tensor
    features: torch.Tensor
    thw: torch.Tensor
    segment_ids: torch.Tensor
    frame_segment_ids: torch.Tensor
    schedule: StageSchedule
    merge: MergeResult

    @property
    def num_segments(self) -> int:
        return int(self.segment_ids.max()) + 1 if self.segment_ids.numel() else 0


def prune_input_stage(features: torch.Tensor, instruction_embedding: Optional[torch.Tensor] = None,
                      config: Optional[HieraVidConfig] = None,
                      num_layers: int = DEFAULT_NUM_LAYERS, *,
                      ops: Optional[PruneOps] = None) -> InputStageResult:
    """Input stage of HieraVid on one video.

    ``features`` (T, H', W', C) visual tokens (projector output); ``instruction_embedding``
    (C,) or (q, C) instruction token embeddings (only used in ``input_only`` mode; None:
    relevance r = 1); ``num_layers`` the LLM depth (for the stage weights of the schedule).

    1. S = similarity_map (Eq. 1); K = schedule.merge_count = round(R_merge * N) (capped at
       (T-1) H' W'); static tokens = Top-K of S (Eq. 2-3).
    2. Frame segments (Sec. 3.1.1; ``config.segmentation``); the segmentation Top-K uses
       ``config.segment_ratio`` when set, otherwise the same K.
    3. Static-token merging (Eq. 3) -> N - K tokens (``full`` mode stops here: stage 1).
    4. ``input_only``: frame-level DPP (Sec. 3.2, per-segment counts Eq. 4-5) to round(b N).

    ``ops`` (default :data:`REFERENCE_OPS`) supplies steps 1, 3 and 4 (module docstring).
    """
    ops = REFERENCE_OPS if ops is None else ops
    cfg = HieraVidConfig.coerce(config)
    if features.dim() != 4:
        raise ValueError(f"features must be (T, H', W', C), got {tuple(features.shape)}")
    T, Hh, Ww, C = features.shape
    N = T * Hh * Ww
    sched = build_schedule(cfg, N, num_layers, max_merge=max(T - 1, 0) * Hh * Ww)
    K = sched.merge_count
    S = ops.similarity_map(features)
    static = static_topk(S, K)
    K_seg = K
    if cfg.segmentation == "merge_ratio" and cfg.segment_ratio is not None:
        K_seg = min(round_half_up(cfg.segment_ratio * N), S.numel())
    fseg = frame_segments(features, cfg, S=S, K_seg=K_seg,
                          static_mask=static if K_seg == K else None)
    merged = ops.merge_static_tokens(features, static, fseg, num_kept=N - K)
    if cfg.mode == "full" or sched.input_target == merged.flat_indices.numel():
        return InputStageResult(merged.flat_indices, merged.features, merged.thw,
                                merged.segment_ids, fseg, sched, merged)
    keep = ops.frame_level_select(merged.features, instruction_embedding, merged.segment_ids,
                                  sched.input_target, cfg, use_dpp=True,
                                  num_segments=merged.num_segments)
    seg = merged.segment_ids[keep]
    # renumber segments that kept no token away (ids stay in temporal order)
    if seg.numel():
        change = torch.ones_like(seg)
        change[1:] = (seg[1:] != seg[:-1]).to(seg.dtype)
        seg = torch.cumsum(change, 0) - 1
    return InputStageResult(merged.flat_indices[keep], merged.features[keep],
                            merged.thw[keep], seg, fseg, sched, merged)


def select_layer_stage(hidden_visual: torch.Tensor, query: Optional[torch.Tensor],
                       segment_ids: torch.Tensor, target: int,
                       config: Optional[HieraVidConfig] = None,
                       use_dpp: bool = True,
                       num_segments: Optional[int] = None, *,
                       ops: Optional[PruneOps] = None) -> torch.LongTensor:
    """Layer-level stage (Sec. 3.3): positions (ascending) of the visual tokens to keep.

    ``hidden_visual`` (n, C) the visual tokens' hidden states at the stage's first layer,
    ``query`` (C,) the last instruction token's hidden state (or (q, C), see
    ``config.relevance_source``), ``segment_ids`` (n,) of these tokens (from the input stage,
    subset by earlier selections), ``target`` the stage count (``schedule.counts[i]``).
    ``use_dpp``: ``schedule.uses_dpp[i]`` (False: relevance-only stage, the top-k relevance
    per segment). Delegates to ``ops.frame_level_select`` (default
    :func:`hieravid_vllm.core.dpp.frame_level_select`; the serving path passes
    ``ops=hieravid_kernels.OPS``).
    """
    cfg = HieraVidConfig.coerce(config)
    ops = REFERENCE_OPS if ops is None else ops
    return ops.frame_level_select(hidden_visual, query, segment_ids, target, cfg,
                                  use_dpp=use_dpp, num_segments=num_segments)


def select_layer_stage_many(inputs: Sequence[StageInput], *, ops: Optional[PruneOps] = None,
                            device_counts: bool = False
                            ) -> List[Tuple[torch.LongTensor, Optional[torch.Tensor]]]:
    """:func:`select_layer_stage` for the videos that select at one stage boundary of a batch
    (one :class:`~hieravid_vllm.core.dpp.StageInput` each): per video (kept positions
    ascending, kept tokens per segment (M,) int64 on the host, the next stage's
    ``lengths``), each video the same result as :func:`select_layer_stage` alone. With every
    ``lengths`` given, the boundary reads the device once (the Eq. 4 segment sums of all
    videos), see :func:`~hieravid_vllm.core.dpp.frame_level_select_many`.
    ``device_counts``: the sync-free boundary (nothing read back; the kept tokens per
    segment come back on the device), see there; needs ``ops.frame_level_select_many``."""
    ops = REFERENCE_OPS if ops is None else ops
    inputs = [replace(i, config=HieraVidConfig.coerce(i.config)) for i in inputs]
    many = getattr(ops, "frame_level_select_many", None)
    if device_counts:
        if many is None:
            raise ValueError("device_counts needs ops with frame_level_select_many")
        return many(inputs, device_counts=True)
    if many is not None:
        return many(inputs)
    return [(ops.frame_level_select(i.hidden, i.query, i.segment_ids, i.target, i.config,
                                    use_dpp=i.use_dpp, num_segments=i.num_segments), None)
            for i in inputs]
