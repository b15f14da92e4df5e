"""Layer-level stages inside vLLM (HieraVid Sec. 3.3, Eq. 8-11) -- the worker side.

At every stage boundary layer ``B[g]`` (``HieraVidConfig.stage_boundaries``) the visual
tokens of a request whose video is prefilled in this step are pruned again: relevance of each
visual token's hidden state to the last prompt token's hidden state (Eq. 8), the
relevance-weighted DPP per segment of the input stage (Eq. 9-10) and the per-segment counts
(Eq. 5) -- :func:`hieravid_vllm.core.pipeline.select_layer_stage_many`, all the step's videos
at once. Later layers compute, cache and attend over the kept tokens only; text tokens are never
dropped.

How it fits vLLM v1:

* KV cache: each stage's layers form their own KV cache group (engine-core patch
  :mod:`hieravid_vllm.patches.engine_core.kv_cache_groups`; vLLM lets groups of one page
  size alias the same memory, each with its own block table). The scheduler hook
  (:class:`hieravid_vllm.scheduler.HieraVidScheduler`) makes group ``g`` allocate only the
  slots its kept tokens need, so a request holds about the sum over stages of kept tokens and
  admission counts that footprint. Stage ``g`` stores a request's KV compacted: token ``p``
  lives at index ``p - D_g(p)`` of the group's blocks, ``D_g`` = visual tokens dropped
  before stage ``g`` (kept visual tokens in order inside the video run). (With one group for
  all layers -- ``HIERAVID_KV_GROUPS=0`` or stages of unequal depth -- the same compacted
  layout lives in the shared blocks: compute savings only.)
* The counts per stage are a function of the video grid and the config (the core schedule),
  so before the forward the runner hook (:func:`build_step_plan`, called right after the model
  runner built its attention metadata, :mod:`hieravid_vllm.patches.worker.stage_hooks`)
  knows ``D_g`` for every request and builds, with the
  attention backend's own metadata builder, one attention metadata and one slot mapping per
  stage (compacted ``query_start_loc`` / ``seq_lens`` / ``slot_mapping``) and installs them
  for that stage's layers in the per-layer dicts of the forward context. No host sync
  mid-forward.
* The model (:func:`staged_forward`) gathers hidden states, residuals and positions at each
  boundary for the requests that select in this step (their whole video and the last prompt
  token are in the step; the scheduler hook guarantees it). Where each video's rows lie is
  host arithmetic on the plan (:func:`_video_rows`), and each video's tokens per segment are
  tracked on the host from the input stage on, so a boundary reads the device once: the Eq. 4
  segment sums of all its videos (on CUDA everything enqueued before that read overlaps the
  layers still running). Kept tokens keep their rotary
  positions; decode tokens continue the original numbering. Steps without a selection run
  vLLM's own (compiled) forward: only the metadata of later stages differs.
* The final hidden states are scattered back to the step's token rows (text rows, in
  particular every request's last token, are always kept), so sampling is unchanged.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.dpp import boundary_counts_on_device, cat_rows, host_to_device
from hieravid_vllm.core.pipeline import StageInput, select_layer_stage, select_layer_stage_many

logger = logging.getLogger("vllm.hieravid_vllm")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class VideoSpan:
    """One pruned video in a request's token sequence.

    offset: first placeholder position; counts: visual tokens per stage (``counts[0]`` =
    placeholders that are visual tokens, they come first in the run); length: the whole
    placeholder run (LLaVA-OneVision: + 1 newline token, never pruned); uses_dpp per stage;
    mm_hash: the encoder-cache key of the video (its segment layout).
    """

    offset: int
    length: int
    counts: tuple
    uses_dpp: tuple
    mm_hash: str
    config: HieraVidConfig

    @property
    def visual_end(self) -> int:
        return self.offset + self.counts[0]

    @property
    def end(self) -> int:
        return self.offset + self.length



@dataclass(frozen=True)
class VideoSummary:
    """What a step's plan needs of a request's videos when the step touches none of them:
    ``first`` offset of the first video, ``end`` of the last, ``dropped[g]`` visual tokens
    dropped before stage ``g`` over all of them (computed once per request)."""

    first: int
    end: int
    dropped: np.ndarray

    @classmethod
    def of(cls, videos: Sequence[VideoSpan], num_stages: int) -> "VideoSummary":
        st = StageSpans([(v.offset, v.counts[:num_stages]) for v in videos])
        return cls(min(v.offset for v in videos), max(v.end for v in videos),
                   np.asarray(st.dropped, dtype=np.int64))


@dataclass
class _ReqPlan:
    index: int
    start: int            # num computed tokens (first scheduled position)
    num_tokens: int       # scheduled tokens
    num_prompt: int
    videos: List[VideoSpan]
    selecting: List[VideoSpan] = field(default_factory=list)
    summary: Optional[VideoSummary] = None  # of ``videos`` (cached per request by the model)


@dataclass
class StepPlan:
    """What the model needs for one forward with HieraVid stages."""

    boundaries: List[int]                 # first layer of each stage
    reqs: List[_ReqPlan]                  # per request; empty when no video is in the step
    num_tokens: int                       # unpadded tokens of the step
    query_start_loc: np.ndarray           # (num_reqs + 1,) of the step
    selecting: bool                       # any request selects in this step
    stage_rows: List[int] = field(default_factory=list)  # unpadded rows per stage


def compacted_tokens(spans, g: int, n: int) -> int:
    """Slots stage ``g`` needs for the first ``n`` tokens of a request: ``n`` minus the
    visual tokens dropped before stage ``g`` among them. ``spans``: (offset, counts per
    stage) of the request's videos in order (shared by the worker's plan and the scheduler's
    KV allocation, so both count alike)."""
    c = n
    for off, counts in spans:
        if n <= off:
            break
        c -= max(0, min(n - off, counts[0]) - counts[g])
    return c


class StageSpans:
    """:func:`compacted_tokens` of one request, with its decode case precomputed.

    Every scheduling step asks the KV managers of the ``S - 1`` later stage groups how many
    slots a request needs (twice per group); past the end of the request's last video --
    every decode step -- the answer is ``n - dropped[g]`` (visual tokens dropped before stage
    ``g`` over all videos), computed once here instead of a walk over the spans per call.
    ``spans``: (offset, counts per stage) of the request's videos in order.
    """

    __slots__ = ("spans", "end", "dropped")

    def __init__(self, spans) -> None:
        self.spans = tuple((int(o), tuple(int(x) for x in c)) for o, c in spans)
        self.end = max((o + c[0] for o, c in self.spans), default=0)
        num_stages = max((len(c) for _o, c in self.spans), default=1)
        self.dropped = tuple(sum(c[0] - c[g] for _o, c in self.spans)
                             for g in range(num_stages))

    def compact(self, g: int, n: int) -> int:
        """Slots stage ``g`` needs for the request's first ``n`` tokens."""
        if n >= self.end:
            return n - self.dropped[g] if self.spans else n
        return compacted_tokens(self.spans, g, n)


#: The :class:`StageSpans` of a request without a pruned video (every stage counts ``n``).
NO_SPANS = StageSpans(())


def plan_requests(reqs: List[_ReqPlan], num_stages: int):
    """Per stage: (query lens, computed-prefix lens) in compacted coordinates; checks that
    every request either selects in this step (whole video + last prompt token scheduled) or
    has no video token in it.

    Requests without a video count their tokens as they are; a request whose step lies
    wholly before its first video or after its last one (decode steps, text chunks) shifts
    its prefix by the tokens dropped before each stage (:class:`VideoSummary`, cached per
    request). Only a step that touches a video -- the selecting step -- visits the request's
    videos one by one. (:func:`build_step_plan` calls this only for a step that touches a
    video; other steps it plans over the batch's arrays, :class:`BatchVideos`.)"""
    n = len(reqs)
    start = np.fromiter((r.start for r in reqs), dtype=np.int64, count=n)
    num = np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=n)
    q = np.broadcast_to(num, (num_stages, n)).copy()
    nc = np.broadcast_to(start, (num_stages, n)).copy()
    for i, r in enumerate(reqs):
        r.selecting = []
        if not r.videos:
            continue
        sm = r.summary
        if sm is None:
            sm = r.summary = VideoSummary.of(r.videos, num_stages)
        s, e = r.start, r.start + r.num_tokens
        if s >= sm.end:        # every video before the step: a constant shift per stage
            nc[1:, i] -= sm.dropped[1:]
            continue
        if e <= sm.first:      # the step ends before the first video: nothing dropped yet
            continue
        for v in r.videos:
            if v.end <= s or v.offset >= e:
                continue
            if v.offset < s or v.end > e:
                raise RuntimeError(
                    f"HieraVid: a pruned video (tokens {v.offset}..{v.end}) is split across "
                    f"prefill steps (this step computes {s}..{e}); the HieraVid scheduler "
                    "must schedule a video and the rest of its prompt in one step")
            r.selecting.append(v)
        if r.selecting and e < r.num_prompt:
            raise RuntimeError("HieraVid: the last prompt token must be in the step that "
                               "prefills the video")
        spans = [(v.offset, v.counts) for v in r.videos]
        for g in range(1, num_stages):  # stage 0 keeps every token it was given
            nc[g, i] = compacted_tokens(spans, g, s)
            q[g, i] = compacted_tokens(spans, g, e) - nc[g, i]
    return q, nc


def _slots_of(block_table: np.ndarray, block_size: int, req: np.ndarray,
              pos: np.ndarray) -> np.ndarray:
    """KV slots of tokens at (compacted) positions ``pos`` of batch rows ``req``."""
    return block_table[req, pos // block_size].astype(np.int64) * block_size + pos % block_size


def _slot_mapping(block_table: np.ndarray, block_size: int, nc: np.ndarray, q: np.ndarray,
                  total: int) -> np.ndarray:
    """KV slots of the ``q[i]`` tokens of request ``i`` that follow its ``nc[i]`` cached ones
    (vectorised over the batch); rows past them (padding) are -1."""
    out = np.full(total, -1, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    n = int(q.sum())
    if n:
        req = np.repeat(np.arange(len(q)), q)
        first = np.cumsum(q) - q
        j = np.asarray(nc, dtype=np.int64)[req] + np.arange(n, dtype=np.int64) - first[req]
        out[:n] = _slots_of(block_table, block_size, req, j)
    return out


def stage_layer_names(layer_names, boundaries: Sequence[int]) -> Dict[int, List[str]]:
    """Attention layer names by the stage of their decoder layer (``...layers.<i>....``);
    names without a layer index are left out."""
    by_stage: Dict[int, List[str]] = {}
    for name in layer_names:
        m = _LAYER_RE.search(name)
        if m is None:
            continue
        idx = int(m.group(1))
        g = 0
        for i, b in enumerate(boundaries):
            if idx >= b:
                g = i
        by_stage.setdefault(g, []).append(name)
    return by_stage


def _names_by_stage(runner, model) -> Dict[int, set]:
    """Attention layer names per stage (of every attention group of the runner), grouped
    once per model (layer names never change)."""
    st = model.hieravid_state
    if st.names_by_stage is None:
        names = [n for groups in runner.attn_groups for ag in groups for n in ag.layer_names]
        st.names_by_stage = {g: set(n) for g, n in
                             stage_layer_names(names, model.hieravid_boundaries).items()}
    return st.names_by_stage


def plan_replaces_stage_groups(runner, model, num_reqs: int) -> bool:
    """True when :func:`build_step_plan` will build this step's attention metadata and slot
    mappings for every layer of KV cache groups 1..S-1, so that vLLM's own for those groups
    would be overwritten unused: one KV cache group per stage, each holding exactly its
    stage's layers, and a request with a video in the batch. The runner hook
    (:mod:`hieravid_vllm.patches.worker.stage_hooks`) then lets vLLM compute group 0's only."""
    st = model.hieravid_state
    S = len(model.hieravid_boundaries)
    groups = runner.kv_cache_config.kv_cache_groups
    if S < 2 or len(groups) != S:
        return False
    if st.replaces_groups is None:  # constant per model
        names = _names_by_stage(runner, model)
        st.replaces_groups = all(
            bool(names.get(g)) and set(groups[g].layer_names) == names[g]
            and all(set(ag.layer_names) <= names[g] for ag in runner.attn_groups[g])
            for g in range(1, S))
    if not st.replaces_groups:
        return False
    return st.batch_videos(tuple(runner.input_batch.req_ids[:num_reqs]), runner.requests,
                           model.hieravid_request_videos, S).any_video


@dataclass
class BatchVideos:
    """The videos of the requests of a batch, in the runner's row order, as arrays (cached by
    :meth:`StageState.batch_videos` while the batch keeps its requests and order):
    ``first`` / ``end``: first video offset / last video end per row (no video: never
    reached / 0); ``dropped[g]``: visual tokens dropped before stage ``g`` over the row's
    videos (:class:`VideoSummary`)."""

    req_ids: tuple
    videos: List[List[VideoSpan]]
    summaries: List[Optional[VideoSummary]]
    any_video: bool
    first: np.ndarray      # (n,)
    end: np.ndarray        # (n,)
    dropped: np.ndarray    # (S, n)

    @classmethod
    def of(cls, req_ids: tuple, videos, summaries, num_stages: int) -> "BatchVideos":
        n = len(req_ids)
        first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        end = np.zeros(n, dtype=np.int64)
        dropped = np.zeros((num_stages, n), dtype=np.int64)
        for i, sm in enumerate(summaries):
            if sm is not None:
                first[i], end[i], dropped[:, i] = sm.first, sm.end, sm.dropped
        return cls(req_ids, videos, summaries, any(bool(v) for v in videos), first, end,
                   dropped)


def build_step_plan(runner, model, attn_metadata, slot_by_layer, num_reqs: int,
                    num_tokens: int) -> Optional[StepPlan]:
    """Runner hook: per-stage attention metadata and slot mappings for this step.

    Returns None (and changes nothing) when no request in the batch has a pruned video.
    A step that touches no request's video (decode steps, text chunks) is planned over the
    batch's arrays (:class:`BatchVideos`) without a per-request object; only a step that
    prefills a video goes through :func:`plan_requests` request by request.
    """
    if not isinstance(attn_metadata, dict) or not attn_metadata:
        return None
    ib = runner.input_batch
    boundaries = list(model.hieravid_boundaries)
    S = len(boundaries)
    bv = model.hieravid_state.batch_videos(tuple(ib.req_ids[:num_reqs]), runner.requests,
                                           model.hieravid_request_videos, S)
    if not bv.any_video:
        return None
    qsl = runner.query_start_loc.cpu[:num_reqs + 1].numpy().astype(np.int64)
    starts = np.asarray(ib.num_computed_tokens_cpu[:num_reqs], dtype=np.int64)
    prompts = np.asarray(ib.num_prompt_tokens[:num_reqs], dtype=np.int64)
    lens = np.diff(qsl)
    shared = not ((starts < bv.end) & (starts + lens > bv.first)).any()
    if shared:
        # every video before the step or after it: every stage schedules the rows vLLM
        # scheduled (q_g = lens), the rows past their videos shifted by a constant per stage
        # (plan_requests' first two cases, over the batch)
        reqs = []
        nc = starts - bv.dropped * (starts >= bv.end)
        n_rows = int(qsl[-1])
        stage_rows = [n_rows] * S
    else:
        # a video in the step (its selecting prefill): request by request
        reqs = [_ReqPlan(i, int(s0), int(n0), int(p0), v, summary=sm) for i, (s0, n0, p0, v, sm)
                in enumerate(zip(starts, lens, prompts, bv.videos, bv.summaries))]
        q, nc = plan_requests(reqs, S)
        stage_rows = [int(x) for x in q.sum(axis=1)]
    plan = StepPlan(boundaries, reqs, num_tokens, qsl, any(r.selecting for r in reqs),
                    stage_rows)

    kv_groups = runner.kv_cache_config.kv_cache_groups
    per_stage_groups = len(kv_groups) == S
    if len(kv_groups) != 1 and not per_stage_groups:
        raise RuntimeError(f"HieraVid stages need one KV cache group or one per stage, "
                           f"got {len(kv_groups)}")
    any_layer = next(iter(attn_metadata))
    pad = max((int(slot_by_layer[any_layer].shape[0]) if slot_by_layer else num_tokens)
              - num_tokens, 0)
    device = runner.device
    names_by_stage = _names_by_stage(runner, model)
    stages = [g for g in range(1, S) if names_by_stage.get(g)]
    if not stages:
        return plan
    is_prefilling = torch.from_numpy(nc[0] < prompts)
    tables = [ib.block_table[g if per_stage_groups else 0] for g in stages]
    if shared:
        # One query layout for all stages (vLLM's own tensors, as it shares them across KV
        # cache groups); seq lens and slot mappings of all stages in one host array each and
        # one copy to the device.
        qsl_cpu = runner.query_start_loc.cpu[:num_reqs + 1]
        qsl_dev = runner.query_start_loc.gpu[:num_reqs + 1]
        seq_np = (nc[stages] + lens).astype(np.int32)                       # (G, n)
        max_seq = seq_np.max(axis=1).tolist() if num_reqs else [0] * len(stages)
        if (lens == 1).all():   # decode: one token per request
            req, pos = np.arange(num_reqs), nc[stages]
        else:
            req = np.repeat(np.arange(num_reqs), lens)
            pos = nc[stages][:, req] + (np.arange(n_rows) - qsl[:-1][req])
        slots_np = np.full((len(stages), n_rows + pad), -1, dtype=np.int64)
        for i, bt in enumerate(tables):
            slots_np[i, :n_rows] = _slots_of(bt.block_table.np, bt.block_size, req, pos[i])
        seq_cpu = torch.from_numpy(seq_np)
        seq_dev, slots_dev = seq_cpu.to(device), torch.from_numpy(slots_np).to(device)
        max_q = int(lens.max()) if num_reqs else 0
        per_stage = [(qsl_dev, qsl_cpu, seq_dev[i], seq_cpu[i], n_rows, max_q, max_seq[i],
                      slots_dev[i]) for i in range(len(stages))]
    else:
        per_stage = []
        for g, bt in zip(stages, tables):
            qsl_g = np.zeros(num_reqs + 1, dtype=np.int32)
            qsl_g[1:] = np.cumsum(q[g])
            seq_g = (nc[g] + q[g]).astype(np.int32)
            slots = _slot_mapping(bt.block_table.np[:num_reqs], bt.block_size, nc[g], q[g],
                                  stage_rows[g] + pad)
            qsl_t, seq_t = torch.from_numpy(qsl_g), torch.from_numpy(seq_g)
            per_stage.append((qsl_t.to(device), qsl_t, seq_t.to(device), seq_t, stage_rows[g],
                              int(q[g].max()) if num_reqs else 0,
                              int(seq_g.max()) if num_reqs else 0,
                              torch.from_numpy(slots).to(device)))
    from vllm.v1.attention.backend import CommonAttentionMetadata  # worker only

    stage_names = model.hieravid_state.stage_names
    for g, bt, (qsl_dev, qsl_cpu, seq_dev, seq_cpu, rows, max_q, max_seq, slot_t) in zip(
            stages, tables, per_stage):
        gid = g if per_stage_groups else 0
        cm = CommonAttentionMetadata(
            query_start_loc=qsl_dev,
            query_start_loc_cpu=qsl_cpu,
            seq_lens=seq_dev,
            seq_lens_cpu_upper_bound=seq_cpu,
            num_reqs=num_reqs,
            num_actual_tokens=rows,
            max_query_len=max_q,
            max_seq_len=max_seq,
            block_table_tensor=bt.get_device_tensor(num_reqs),
            slot_mapping=slot_t,
            causal=True,
            is_prefilling=is_prefilling,
        )
        names = names_by_stage[g]
        for attn_group in runner.attn_groups[gid]:
            key = (g, id(attn_group))
            group_names = stage_names.get(key)
            if group_names is None:  # constant per model: filtered once
                group_names = stage_names[key] = [n for n in attn_group.layer_names
                                                  if n in names]
            if not group_names:
                continue
            md = attn_group.build_metadata(cm, 0)
            for n in group_names:
                attn_metadata[n] = md
                if slot_by_layer is not None:
                    slot_by_layer[n] = slot_t
    return plan


# ------------------------------------------------------------------------------------------
# model side
# ------------------------------------------------------------------------------------------
def _kernel_ops():
    """The kernels' dispatch (Triton on CUDA tensors, the core reference elsewhere)."""
    from hieravid_kernels import OPS

    return OPS


def profile_stage_selection(runner) -> Optional[tuple]:
    """Run, inside vLLM's ``profile_run``, the largest in-LLM selection this server can meet,
    so that the memory profile that sizes the KV cache counts its workspace (Gram/Cholesky
    rows, float32 copies of the visual hidden states) next to the dummy forward's.

    Size: the most visual tokens one video can bring into the LLM (vLLM's own
    ``mm_budget.mm_max_toks_per_item["video"]``, which the HieraVid processor counts as the
    input stage's kept tokens), capped by the tokens of one step; the first boundary's
    target from the schedule (the largest selection: later stages select among fewer).
    Same dtype, device and kernels as the serving path. Returns ``(n, target)`` (also kept as
    ``runner.hieravid_profiled_selection``), or None (HieraVid off, input-only mode, no
    video)."""
    from hieravid_vllm.core.schedule import build_schedule

    model = runner.get_model()
    opts = getattr(model, "hieravid_options", None)
    budget = getattr(runner, "mm_budget", None)
    if opts is None or opts.config.mode != "full" or budget is None:
        return None
    n = int((getattr(budget, "mm_max_toks_per_item", None) or {}).get("video", 0))
    n = min(n, int(getattr(runner, "max_num_tokens", n) or n))
    if n < 2:
        return None
    cfg = opts.config
    hf_config = runner.model_config.hf_config
    text = getattr(hf_config, "text_config", None) or hf_config
    layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    # the schedule of a video whose input stage keeps n tokens
    sched = build_schedule(cfg, n, layers)
    rho0 = sched.counts[0] / max(1, sched.num_visual)
    sched = build_schedule(cfg, max(n, int(round(n / rho0))) if rho0 > 0 else n, layers)
    target = int(min(n - 1, sched.counts[1] if len(sched.counts) > 1 else n // 2))
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(runner, "dtype", torch.float32)
    stream = torch.randn(n + 1, hidden, generator=gen).to(device=runner.device, dtype=dtype)
    hv, query = stream[:n].float(), stream[n:].float()  # as _select_rows copies them
    seg = torch.zeros(n, dtype=torch.long, device=runner.device)
    keep = select_layer_stage(hv, query, seg, target, cfg, use_dpp=True, num_segments=1,
                              ops=_kernel_ops())
    assert keep.numel() == target, (keep.numel(), target)
    runner.hieravid_profiled_selection = (n, target)
    logger.info("HieraVid: profile run included the largest in-LLM selection (%d of %d "
                "visual tokens, hidden %d)", target, n, hidden)
    return n, target


def _video_rows(plan: StepPlan, h: int) -> List[tuple]:
    """Where the selecting videos' rows lie in a stream that holds stage ``h``'s rows, from
    the plan alone (host arithmetic, nothing read from the device).

    A step's rows are its requests' scheduled tokens in order (``query_start_loc``), then
    padding; a stage drops visual rows only, keeping the order. So a selecting video's
    ``counts[h]`` visual rows are contiguous, starting at its offset's row minus the rows
    dropped before it (earlier requests' videos and its request's earlier videos), and its
    query rows (``visual_end`` .. the last prompt token, as :func:`_select_rows` reads them)
    follow them. Returns ``(r, vi, v, a, n, q_end)`` per video in row order: visual rows
    ``[a, a + n)``, query rows ``[a + n, q_end)``.
    """
    qsl = plan.query_start_loc
    out = []
    shift = 0                                     # rows dropped by earlier requests
    for r in plan.reqs:
        if not r.selecting:
            continue
        base = int(qsl[r.index]) - shift - r.start  # row of position p, before r's own drops
        drop_all = sum(v.counts[0] - v.counts[h] for v in r.selecting)
        q_end = base + r.num_prompt - drop_all      # one past the last prompt token's row
        d = 0
        for vi, v in enumerate(r.selecting):
            n = int(v.counts[h])
            out.append((r, vi, v, base + v.offset - d, n, q_end))
            d += v.counts[0] - n
        shift += drop_all
    return out


@functools.lru_cache(maxsize=None)
def _device_counts() -> bool:
    """``HIERAVID_BOUNDARY_COUNTS=device`` (read once per worker; checked at start-up)."""
    on = boundary_counts_on_device()
    if on:
        logger.info("HieraVid: stage boundaries compute their Eq. 4-5 counts on the device "
                    "(HIERAVID_BOUNDARY_COUNTS=device): no read-back inside the forward")
    return on


def _rows(hidden: torch.Tensor, residual: Optional[torch.Tensor],
          index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of the residual stream (hidden + residual) as float32, one gather."""
    x = hidden.index_select(0, index)
    if residual is not None:
        x = x + residual.index_select(0, index)
    return x.float()


def _select_rows(plan: StepPlan, g: int, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                 seg_state: Dict[tuple, tuple], vpos: Dict[tuple, torch.Tensor],
                 kept_log: Optional[dict]) -> torch.Tensor:
    """Row indices (into the current rows) that stage ``g`` keeps, ascending.

    The rows of every video and its query come from the plan (:func:`_video_rows`): host
    arithmetic, no per-row masks and no device read-back. All videos' visual rows, then all
    their query rows, are copied out of the stream in one gather, so the selection gets them
    as consecutive blocks of one tensor (laid out as one without another copy). The kept
    index is the host's index of every other row (other requests, text, padding) with each
    video's kept positions written into its place, in one scatter.
    """
    n_rows = hidden.shape[0]
    dev = hidden.device
    spans = _video_rows(plan, g - 1)
    if not spans:                  # no video selects in this step
        return torch.arange(n_rows, device=dev)
    new_n = n_rows - sum(n - int(v.counts[g]) for _r, _vi, v, _a, n, _q in spans)
    ns = [n for *_x, n, _q in spans]
    qs = [q_end - a - n for *_x, a, n, q_end in spans]
    rows = np.concatenate([np.arange(a, a + n) for *_x, a, n, _q in spans] +
                          [np.arange(a + n, q_end) for *_x, a, n, q_end in spans])
    x = _rows(hidden, residual, host_to_device(rows, dev))
    vis, qry = x[:sum(ns)].split(ns), x[sum(ns):].split(qs)
    inputs = []
    for (r, vi, v, a, n, q_end), h, q in zip(spans, vis, qry):
        seg, nseg, lengths, bound = seg_state[(r.index, vi)]
        inputs.append(StageInput(h, q, seg, v.counts[g], v.config, bool(v.uses_dpp[g]), nseg,
                                 lengths, max_length=bound))
    # every video of the boundary at once: one device read (the Eq. 4 segment sums), or
    # none with HIERAVID_BOUNDARY_COUNTS=device (the counts stay on the device)
    on_device = _device_counts()
    results = select_layer_stage_many(inputs, ops=_kernel_ops(), device_counts=on_device)
    idx = np.empty(new_n, dtype=np.int64)
    dst_off = []                   # per video: where its kept rows go, and its first row
    src = dst = 0
    for (r, vi, v, a, n, q_end), inp, (keep, counts) in zip(spans, inputs, results):
        key = (r.index, vi)
        k = int(v.counts[g])
        if keep.shape[0] != k:
            raise RuntimeError(f"HieraVid: stage {g} kept {keep.shape[0]} tokens of a video, "
                               f"its schedule says {k}")
        idx[dst:dst + a - src] = np.arange(src, a)
        dst += a - src
        dst_off.append((dst, a, k))
        dst += k
        src = a + n
        seg, nseg = inp.segment_ids, inp.num_segments
        # sync-free: a host bound of the next stage's longest segment (its layout's width;
        # this stage's lengths are on the host at the first boundary only)
        bound = None
        if on_device:
            bound = (int(inp.max_length) if inp.max_length is not None
                     else int(inp.lengths.max()) if inp.lengths is not None
                     and inp.lengths.device.type == "cpu" and inp.lengths.numel() else n)
            bound = min(bound, k)
        seg_state[key] = (seg[keep.to(seg.device)], nseg, counts, bound)
        if kept_log is not None:  # debug dump: what the selection saw and chose
            vpos[key] = vpos[key][keep]
            kept_log.setdefault(v.mm_hash, []).append({
                "pos": vpos[key].cpu(),
                "hidden_visual": inp.hidden.cpu(), "query": inp.query.cpu(),
                "segment_ids": seg.cpu(), "num_segments": nseg, "target": v.counts[g],
                "use_dpp": bool(v.uses_dpp[g]),
                "config": v.config.model_dump(mode="json")})
    idx[dst:] = np.arange(src, n_rows)
    out = host_to_device(idx, dev)
    # every video's kept positions + its first row, into its place, at once
    pos = np.concatenate([np.arange(d0, d0 + k) for d0, _a, k in dst_off] +
                         [np.repeat([a for _d, a, _k in dst_off], [k for *_x, k in dst_off])])
    pos_d = host_to_device(pos, dev)
    T = pos.shape[0] // 2
    keep_all = cat_rows([keep.to(dev) for keep, _c in results])
    out.index_copy_(0, pos_d[:T], keep_all + pos_d[T:])
    return out


def staged_forward(text_model, plan: StepPlan, positions: torch.Tensor,
                   inputs_embeds: torch.Tensor, layouts: Dict[str, Any],
                   kept_log: Optional[dict] = None) -> torch.Tensor:
    """Qwen2-style decoder forward with HieraVid stage boundaries (see module docstring).

    ``text_model``: vLLM's ``Qwen2Model`` (``layers``, ``norm``); ``layouts``: mm_hash ->
    (segment_ids, num_segments[, tokens per segment on the host]) of every selecting video
    (from the input stage; with the lengths, no stage reads the segment ids back).
    Returns hidden states for all of the step's rows (rows dropped at a boundary are zero).
    """
    hidden = inputs_embeds
    residual = None
    n_total = hidden.shape[0]
    device = hidden.device
    orig_rows = None                 # the step's row of every current row (None: identity)
    seg_state, vpos = {}, {}
    for r in plan.reqs:
        for vi, v in enumerate(r.selecting):
            lay = layouts[v.mm_hash]
            seg_state[(r.index, vi)] = (lay[0], lay[1], lay[2] if len(lay) > 2 else None, None)
            if kept_log is not None:  # video-relative positions of its current rows
                vpos[(r.index, vi)] = torch.arange(v.counts[0], device=device)
    boundaries = set(plan.boundaries[1:])
    g = 0
    for idx, layer in enumerate(text_model.layers[text_model.start_layer:text_model.end_layer],
                                start=text_model.start_layer):
        if idx in boundaries:
            g += 1
            keep = _select_rows(plan, g, hidden, residual, seg_state, vpos, kept_log)
            hidden = hidden[keep]
            if residual is not None:
                residual = residual[keep]
            positions = positions[..., keep]
            orig_rows = keep if orig_rows is None else orig_rows[keep]
        hidden, residual = layer(positions, hidden, residual)
    hidden, _ = text_model.norm(hidden, residual)
    if orig_rows is None:
        return hidden
    out = hidden.new_zeros((n_total, hidden.shape[-1]))
    out[orig_rows] = hidden
    return out


# ------------------------------------------------------------------------------------------
# the model mixin (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision: all run vLLM's Qwen2Model)
# ------------------------------------------------------------------------------------------
#: File prefix of the per-stage kept-token dumps written to $HIERAVID_DEBUG_DIR.
STAGES_DUMP_PREFIX = "stages"


class StageState:
    """A worker's HieraVid stage state, owned by the model, each part freed on vLLM's own
    lifecycle events (fed by the runner patch :mod:`hieravid_vllm.patches.worker.stage_state`):

    * ``layouts``: the input stage's (segment_ids, num_segments, kept_indices, tokens per
      segment on the host) of a video, per
      encoder-cache entry (``mm_hash``). ``embed_multimodal`` hands each video's layout in
      with its output row (:meth:`add_output`); the runner pairs the row with its ``mm_hash``
      when it caches it (:meth:`cache_output`) and frees it with the encoder-cache entry
      (:meth:`free_outputs`, the scheduler's ``free_encoder_mm_hashes``). Rows not cached by
      the end of the encoder run (vLLM's profiling) are dropped (:meth:`end_encoder_run`).
    * ``videos``: a request's :class:`VideoSpan` list, computed on first use, and its
      :class:`VideoSummary` (``summaries``), freed when the runner drops the request's state
      (:meth:`free_request`).
    * the step plan: set by the runner hook for the step (:meth:`set_plan`), taken once by the
      model's forward (:meth:`take_plan`).
    * ``names_by_stage``: attention layer names per stage, ``stage_names`` per stage and
      attention group, ``replaces_groups`` (:func:`plan_replaces_stage_groups`; constant per
      model).
    """

    def __init__(self) -> None:
        self._pending: Dict[int, tuple] = {}  # id(row) -> (row, layout), one encoder run
        self.layouts: Dict[str, tuple] = {}
        self.videos: Dict[str, List[VideoSpan]] = {}
        self.summaries: Dict[str, VideoSummary] = {}  # of ``videos`` (requests with one)
        self._plan: Optional[StepPlan] = None
        self.names_by_stage: Optional[Dict[int, set]] = None
        self.stage_names: Dict[tuple, List[str]] = {}  # (stage, attn group) -> its layers
        self.replaces_groups: Optional[bool] = None  # see plan_replaces_stage_groups
        self._batch: Optional[BatchVideos] = None  # of the last step's batch

    # encoder outputs
    def add_output(self, row: torch.Tensor, layout: tuple) -> None:
        self._pending[id(row)] = (row, layout)  # the row is held: its id stays unique

    def cache_output(self, mm_hash: str, output) -> None:
        item = self._pending.pop(id(output), None)
        if item is not None and item[0] is output:
            self.layouts[mm_hash] = item[1]

    def free_outputs(self, mm_hashes) -> None:
        for h in mm_hashes:
            self.layouts.pop(h, None)

    def end_encoder_run(self) -> None:
        self._pending.clear()

    # requests
    def free_request(self, req_id: str) -> None:
        self.videos.pop(req_id, None)
        self.summaries.pop(req_id, None)
        self._batch = None

    def batch_videos(self, req_ids: tuple, requests, videos_of, num_stages: int) -> BatchVideos:
        """The :class:`BatchVideos` of a batch (rows in ``req_ids`` order): the last one
        again while the batch has the same requests in the same order (most decode steps),
        else built from the per-request ``videos_of(requests[rid])`` and their summaries."""
        bv = self._batch
        if bv is not None and bv.req_ids == req_ids and bv.dropped.shape[0] == num_stages:
            return bv
        videos = [videos_of(requests[rid]) for rid in req_ids]
        summaries = [(self.summaries.get(rid) or VideoSummary.of(v, num_stages)) if v else None
                     for rid, v in zip(req_ids, videos)]
        self._batch = bv = BatchVideos.of(req_ids, videos, summaries, num_stages)
        return bv

    # the step plan
    def set_plan(self, plan: Optional[StepPlan]) -> None:
        self._plan = plan

    def take_plan(self) -> Optional[StepPlan]:
        plan, self._plan = self._plan, None
        return plan


class HieraVidStagesMixin:
    """Adds the in-LLM stages to a HieraVid model class.

    Subclasses hand each video embedding they return from ``embed_multimodal`` to
    :meth:`hieravid_add_video_output` with its input-stage layout.
    """

    def _hieravid_stages_setup(self) -> None:
        from hieravid_vllm.models.common import num_llm_layers

        opts = self.hieravid_options
        self.hieravid_stages_enabled = opts is not None and opts.config.mode == "full"
        L = num_llm_layers(self.config)
        self.hieravid_boundaries = list(opts.config.stage_boundaries(L)) if opts else [0]
        self.hieravid_state = StageState()
        if opts is not None:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                # the CPU greedy's compiled loop: loaded (or compiled) now, not at the first
                # video (GPUs run the greedy in Triton)
                from hieravid_vllm.core.dpp import warm_host_greedy

                warm_host_greedy()

    def hieravid_add_video_output(self, row: torch.Tensor, res) -> None:
        """Record the input-stage layout of a video's output row (full mode only)."""
        if self.hieravid_stages_enabled:
            # tokens per segment on the host, read here (the encoder step) once per video, so
            # that no stage boundary reads the segment ids back mid-forward
            lengths = torch.bincount(res.segment_ids.to("cpu", torch.int64))
            self.hieravid_state.add_output(row, (res.segment_ids, lengths.shape[0],
                                                 res.kept_indices, lengths))

    def hieravid_request_videos(self, state) -> List[VideoSpan]:
        """The pruned videos of a request (worker side, from its multimodal features)."""
        rid = state.req_id
        hit = self.hieravid_state.videos.get(rid)
        if hit is not None:
            return hit
        from hieravid_vllm.models.common import (num_llm_layers, stage_schedule,
                                                 video_item_config, video_item_grid)

        opts = self.hieravid_options
        L = num_llm_layers(self.config)
        out = []
        for f in state.mm_features or ():
            if f.modality != "video":
                continue
            frames, per_frame, extra = video_item_grid(self.config, f.data)
            cfg = video_item_config(opts, f.data)
            counts, uses = stage_schedule(cfg, frames, per_frame, L)
            length = int(f.mm_position.length)
            if length != counts[0] + extra:
                raise RuntimeError(f"HieraVid: video run of {length} tokens, schedule says "
                                   f"{counts[0]} + {extra}")
            out.append(VideoSpan(int(f.mm_position.offset), length, counts, uses,
                                 f.identifier, cfg))
        out.sort(key=lambda v: v.offset)
        self.hieravid_state.videos[rid] = out
        if out:
            self.hieravid_state.summaries[rid] = VideoSummary.of(out,
                                                                 len(self.hieravid_boundaries))
        return out

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        plan = self.hieravid_state.take_plan()
        if plan is None or not plan.selecting or intermediate_tensors is not None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                                   **kwargs)
        text_model = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = text_model.embed_input_ids(input_ids)
        layouts = {}
        for r in plan.reqs:
            for v in r.selecting:
                layout = self.hieravid_state.layouts.get(v.mm_hash)
                if layout is None:
                    raise RuntimeError("HieraVid: no segment layout for a video prefilled in "
                                       "this step (encoder output missing)")
                layouts[v.mm_hash] = layout
        import os

        from hieravid_vllm.models.common import DEBUG_DIR_ENV
        debug_dir = os.environ.get(DEBUG_DIR_ENV)
        kept_log = {} if debug_dir else None
        out = staged_forward(text_model, plan, positions, inputs_embeds,
                             {h: (l[0], l[1], l[3]) for h, l in layouts.items()}, kept_log)
        if kept_log:
            _dump_stages(debug_dir, kept_log, layouts)
        return out


_dump_counter = 0


def _dump_stages(debug_dir: str, kept_log: dict, layouts: dict) -> None:
    """Per video: kept tokens at every stage as flat indices into its T*H'*W' tokens."""
    import os
    from pathlib import Path

    global _dump_counter
    for mm_hash, per_stage in kept_log.items():
        kept0 = layouts[mm_hash][2].cpu()
        stages = [kept0] + [kept0[d["pos"].long()] for d in per_stage]
        _dump_counter += 1
        path = Path(debug_dir) / f"{STAGES_DUMP_PREFIX}-{os.getpid()}-{_dump_counter:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"mm_hash": mm_hash, "stages": stages, "boundaries": per_stage}, path)
