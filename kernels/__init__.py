"""Triton kernels for HieraVid, installed as ``hieravid_kernels``.

Dispatch functions (Triton on CUDA tensors, the pure-PyTorch reference of
:mod:`hieravid_vllm.core` elsewhere; ``backend="triton"`` forces the kernel -- on CPU tensors under
Triton's interpreter, ``backend="torch"`` the reference; env ``HIERAVID_KERNELS_BACKEND`` sets the
default of ``"auto"``):

* :func:`similarity_map` -- Eq. 1 adjacent-frame cosine similarity, (T, H', W', C) -> (T-1, H', W')
* :func:`merge_static_tokens` -- Eq. 3 static-token merging -> ``MergeResult``
* :func:`greedy_map_batched` / :func:`greedy_map` -- fast greedy MAP of the (relevance-weighted)
  DPP, all segments in one launch; :func:`greedy_map_batched_many` -- several such calls
* :func:`frame_level_select` -- one frame-level pruning stage using the batched greedy MAP;
  :func:`frame_level_select_many` -- the videos of one stage boundary, one device read
* :data:`OPS` -- the three dispatches above as the ``ops`` of
  :func:`hieravid_vllm.core.pipeline.prune_input_stage` / ``select_layer_stage`` (what the
  vLLM plugin passes: the serving path calls only these dispatches)

Importing this package needs only torch (triton optional, vLLM never); the reference is imported
from ``hieravid_vllm.core`` when used. Design notes and costs: kernels/README.md.
"""
from ._utils import HAS_TRITON, interpreter_ready, poisoned_outputs
from .dpp import (gram_triton, greedy_map, greedy_map_batched, greedy_map_batched_many,
                  greedy_map_batched_triton, greedy_map_explicit_triton)
from .merge import merge_static_tokens, merge_static_tokens_triton
from .select import frame_level_select, frame_level_select_many
from .similarity import similarity_map, similarity_map_triton


class DispatchOps:
    """``ops`` for :func:`hieravid_vllm.core.pipeline.prune_input_stage` and
    ``select_layer_stage`` (the attributes of ``hieravid_vllm.core.pipeline.PruneOps``): the
    dispatches of this package, each with ``backend="auto"`` -- Triton on CUDA tensors, the core
    reference elsewhere (env ``HIERAVID_KERNELS_BACKEND`` overrides)."""

    similarity_map = staticmethod(similarity_map)
    merge_static_tokens = staticmethod(merge_static_tokens)
    frame_level_select = staticmethod(frame_level_select)
    frame_level_select_many = staticmethod(frame_level_select_many)

    def __repr__(self) -> str:
        return "hieravid_kernels.OPS"


OPS = DispatchOps()

__all__ = [
    "HAS_TRITON", "interpreter_ready", "poisoned_outputs",
    "similarity_map", "similarity_map_triton",
    "merge_static_tokens", "merge_static_tokens_triton",
    "greedy_map_batched", "greedy_map_batched_many", "greedy_map", "greedy_map_batched_triton",
    "greedy_map_explicit_triton", "gram_triton",
    "frame_level_select", "frame_level_select_many",
    "DispatchOps", "OPS",
]
