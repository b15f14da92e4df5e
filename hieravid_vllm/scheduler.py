"""The scheduler hook of HieraVid's in-LLM stages (installed as vLLM's ``scheduler_cls``).

The selection at a stage boundary needs the whole video and the request's last prompt token
in one forward (Sec. 3.3: relevance to the last instruction token). So, for a request with a
pruned video, :class:`HieraVidScheduler`

* never ends a prefill step between the start of a not-yet-computed video and the end of the
  prompt (the request waits for a step with room instead; the API process rejects prompts
  that could never fit, see :func:`check_prompt_fits`);
* does not take a prefix-cache hit that ends inside a video (it is cut back to the block
  boundary before the video);
* keeps prefix caching correct: later stages store a request's KV compacted (token ``p`` at
  ``p - D_g``), so a block from the first video on holds KV that depends on the question and
  on the request's own continuation. Such blocks get a per-request hash key
  (:func:`hieravid_extra_keys`) and are never shared; blocks before the first video are
  shared as usual (the key is added by the registry's block-hasher patch,
  :mod:`hieravid_vllm.patches.engine_core.block_hasher`). A preempted request finds its own blocks again (same request id), and its
  recomputed selection is the same (it depends only on the prompt).

Everything else is vLLM's scheduler.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from vllm.v1.core.sched.scheduler import Scheduler

from hieravid_vllm.stages import NO_SPANS, StageSpans

logger = logging.getLogger("vllm.hieravid_vllm")


def _video_spans(request) -> List[tuple]:
    spans = []
    for f in getattr(request, "mm_features", None) or ():
        if f.modality == "video":
            pos = f.mm_position
            spans.append((int(pos.offset), int(pos.offset) + int(pos.length)))
    return sorted(spans)


def must_wait(request, num_computed: int, num_new: int) -> bool:
    """True when scheduling ``num_new`` tokens would split a video's prefill from the end
    of the prompt."""
    end = num_computed + num_new
    prompt = request.num_prompt_tokens
    if end >= prompt:
        return False
    return any(e > num_computed for _s, e in _video_spans(request))


def usable_hit(request, num_hit: int, block_size: int, before_first_video: bool = False) -> int:
    """The longest prefix-cache hit not ending inside a video run (``before_first_video``:
    not reaching past the first video's start, needed with one KV cache group per stage,
    whose blocks hold compacted tokens from there on)."""
    for s, e in _video_spans(request):
        if s < num_hit < e or (before_first_video and s < num_hit):
            return (s // block_size) * block_size
    return num_hit


def request_stage_spans(request, hf_config) -> List[tuple]:
    """(offset, counts per stage) of every video of a request (engine-core side; from the
    video's grid and budget, exactly as the worker and the prompt processor count)."""
    from hieravid_vllm.models.common import (num_llm_layers, serving_options, stage_schedule,
                                             video_item_config, video_item_grid)

    opts = serving_options(hf_config)
    L = num_llm_layers(hf_config)
    spans = []
    for f in getattr(request, "mm_features", None) or ():
        if f.modality != "video" or f.data is None:
            continue
        frames, per_frame, _extra = video_item_grid(hf_config, f.data)
        counts, _uses = stage_schedule(video_item_config(opts, f.data), frames, per_frame, L)
        spans.append((int(f.mm_position.offset), tuple(counts)))
    return sorted(spans)


class HieraVidScheduler(Scheduler):
    """vLLM's scheduler with the HieraVid constraints described in the module docstring.

    With one KV cache group per stage (patch :mod:`hieravid_vllm.patches.engine_core.
    kv_cache_groups`) the group of stage ``g`` allocates only the slots its kept tokens need
    (:func:`hieravid_vllm.stages.compacted_tokens`, :class:`hieravid_vllm.stages.StageSpans`;
    the managers are wrapped per instance by
    :mod:`hieravid_vllm.patches.engine_core.stage_kv_manager`, and the coordinator by
    :mod:`hieravid_vllm.patches.engine_core.stage_kv_coordinator` so that a request holding
    every block a step needs, with nothing new to cache, skips the per-group calls), so a request's KV memory is
    about the sum over stages of its kept tokens, and admission counts that smaller
    footprint. Creating it switches on the per-request block keys
    (:mod:`hieravid_vllm.patches.engine_core.block_hasher`) in this process.
    """

    def __init__(self, *args, **kwargs):
        from hieravid_vllm.patches.engine_core import (block_hasher, stage_kv_coordinator,
                                                       stage_kv_manager)

        block_hasher.enable()  # before any request is hashed
        super().__init__(*args, **kwargs)
        self._hv_spans: dict = {}
        self._hv_hf_config = self.vllm_config.model_config.hf_config
        groups = self.kv_cache_config.kv_cache_groups
        self.hieravid_stage_groups = len(groups) > 1
        if self.hieravid_stage_groups:
            coordinator = self.kv_cache_manager.coordinator
            for g, m in enumerate(coordinator.single_type_managers):
                if g:
                    stage_kv_manager.wrap_stage_manager(m, g, self._hv_spans_of)
            # decode steps: one check per request instead of every group's manager
            fast = stage_kv_coordinator.wrap_stage_coordinator(coordinator, self._hv_spans_of)
            logger.info("HieraVid: %d KV cache groups (one per stage)%s", len(groups),
                        "" if fast else "; no coordinator fast path (not all full attention)")

    def _hv_spans_of(self, request_id: str) -> StageSpans:
        return self._hv_spans.get(request_id, NO_SPANS)

    def add_request(self, request) -> None:
        if _video_spans(request):
            self._hv_spans[request.request_id] = StageSpans(
                request_stage_spans(request, self._hv_hf_config))
        super().add_request(request)

    def _free_request(self, request, *args, **kwargs):
        out = super()._free_request(request, *args, **kwargs)
        self._hv_spans.pop(request.request_id, None)
        return out

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if n and must_wait(request, num_computed_tokens, n):
            return 0
        return n

    def _get_local_prefix_cache_hit(self, request, *args, **kwargs):
        # vLLM 0.33 added ``max_cache_hit_length``; every further argument is vLLM's
        # (registry entry :mod:`hieravid_vllm.patches.engine_core.scheduler`)
        blocks, num_local, boundary, divergent = super()._get_local_prefix_cache_hit(
            request, *args, **kwargs)
        if num_local and _video_spans(request):
            bs = self.block_size
            keep = usable_hit(request, num_local, bs, self.hieravid_stage_groups)
            if keep != num_local:
                # take only the part of the hit before the video (nothing is allocated or
                # touched yet: allocate_slots does that with the blocks returned here)
                blocks = type(blocks)(tuple(g[: keep // bs] for g in blocks.blocks))
                num_local = keep
                boundary = min(boundary, keep) if isinstance(boundary, int) else boundary
        return blocks, num_local, boundary, divergent


# ------------------------------------------------------------------------------------------
# block hashes
# ------------------------------------------------------------------------------------------
def hieravid_extra_keys(request, start_token_idx: int, end_token_idx: int) -> Optional[tuple]:
    """A per-request key for the block holding the start of the request's first video
    (hashes chain, so every later block is per-request too)."""
    spans = _video_spans(request)
    if not spans:
        return None
    first = spans[0][0]
    if start_token_idx <= first < end_token_idx:
        return ("hieravid_stages", request.request_id)
    return None
