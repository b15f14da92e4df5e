"""HieraVid algorithm as pure PyTorch (no vLLM import anywhere in this package).

Modules: ``config`` (HieraVidConfig), ``schedule`` (Eq. 4-5, 11), ``segment`` (Eq. 1-3),
``dpp`` (Eq. 6-10, fast greedy MAP), ``flops`` (Eq. 12), ``pipeline`` (entry points).
"""
from .config import DEFAULT_NUM_LAYERS, HieraVidConfig
from .dpp import (GreedyCall, block_diagonal_kernel, dpp_kernel, frame_level_select,
                  greedy_map, greedy_map_batched, greedy_map_batched_many, relevance,
                  segment_layout)
from .flops import (DEFAULT_TEXT_TOKENS, QWEN2_7B, ModelSpec, flops_ratio, hieravid_flops,
                    layer_flops, prefill_flops, vanilla_flops)
from .pipeline import (InputStageResult, StageInput, prune_input_stage, select_layer_stage,
                       select_layer_stage_many)
from .schedule import (StageSchedule, allocate_segment_counts, build_schedule, segment_counts,
                       segment_scores, stage_retention)
from .segment import (MergeResult, frame_segments, merge_static_tokens, overlap_ratio,
                      segments_avg_pool, segments_from_overlap, similarity_map, static_topk)

__all__ = [
    "DEFAULT_NUM_LAYERS", "HieraVidConfig",
    "GreedyCall", "block_diagonal_kernel", "dpp_kernel", "frame_level_select", "greedy_map",
    "greedy_map_batched", "greedy_map_batched_many", "relevance", "segment_layout",
    "DEFAULT_TEXT_TOKENS", "QWEN2_7B", "ModelSpec", "flops_ratio", "hieravid_flops",
    "layer_flops", "prefill_flops", "vanilla_flops",
    "InputStageResult", "StageInput", "prune_input_stage", "select_layer_stage",
    "select_layer_stage_many",
    "StageSchedule", "allocate_segment_counts", "build_schedule", "segment_counts",
    "segment_scores", "stage_retention",
    "MergeResult", "frame_segments", "merge_static_tokens", "overlap_ratio",
    "segments_avg_pool", "segments_from_overlap", "similarity_map", "static_topk",
]
