"""The per-stage attention metadata of a mixed batch, built by vLLM's own GPU-backend builders
(issue #13, item 2; no engine, no CUDA).

:func:`hieravid_vllm.stages.build_step_plan` runs on a batch of several requests -- a video
prefill that selects (the prompt after a prefix-cache hit), a second selecting video prefill
with two videos, a decode step of a pruned-video request, a text-only prefill chunk and a
text-only decode -- over stand-ins for the runner's input batch and block tables, with vLLM's
real :class:`~vllm.v1.worker.utils.AttentionGroup` (its kernel-block mapping included) and
the backend's real metadata builder. Every stage's built metadata is compared with a
token-by-token simulation: the tokens alive at stage ``g`` are drawn at random (nested kept
sets of each video's visual tokens), token ``p`` lives at index (alive tokens before ``p``)
of the request's blocks in that stage's KV group, so

* ``query_start_loc`` = cumsum of alive tokens scheduled per request;
* ``seq_lens`` = alive tokens up to the end of the step; ``max_query_len`` / ``max_seq_len``;
* ``slot_mapping`` = block_table[req, idx // block] * block + idx % block, per alive
  scheduled token, in row order (the padding rows -1);
* ``block_table`` = that KV group's table (mapped to kernel blocks where the backend's
  blocks are smaller than the cache's);

in both layouts: one KV group per stage (each stage its own block table) and one shared group.

Backends: FLASH_ATTN's builder (``FlashAttentionMetadataBuilder.build``) runs on CPU as it is
(FA2 path: ``get_flash_attn_version()`` is None without CUDA, so no AOT scheduler). FlashInfer
cannot be imported without the ``flashinfer`` package (its module imports it at top level;
not installed here, and its ``plan()`` JIT-compiles CUDA); the test runs its builder where
the package imports (never here) and otherwise checks the ``CommonAttentionMetadata`` the
plugin hands every builder (captured from the same call) against the simulation, including
what FlashInfer's ``build`` relies on: ``is_prefilling``, and decodes first with query length
1 at every stage (``split_decodes_and_prefills``).

The last tests check when vLLM's own slot mappings and metadata of KV cache groups 1..S-1 are
left to the plan (``stages.plan_replaces_stage_groups``) and the runner patch that does it
(``patches.worker.stage_hooks``), on a runner class with vLLM's call order.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.stages import StageState, VideoSpan, build_step_plan

CFG = HieraVidConfig(budget=0.3)
LAYERS = 4
BOUNDARIES = [0, 1, 2, 3]  # one layer per stage
S = len(BOUNDARIES)
HEADS, KV_HEADS, HEAD = 4, 2, 64
NAME = "language_model.model.layers.{}.self_attn.attn"


# ------------------------------------------------------------------------------------------
# the batch
# ------------------------------------------------------------------------------------------
def _video(offset, counts, extra, name):
    return VideoSpan(offset, counts[0] + extra, tuple(counts),
                     (False,) + (True,) * (len(counts) - 1), name, CFG)


def _batch(rng):
    """Requests (videos, num_prompt, start, num_tokens) in the runner's order for backends that
    reorder the batch (decodes first): decode of a video request, text decode, prefill with a
    video after a prefix hit, two-video prefill, text prefill chunk."""
    v0 = _video(40, [90, 50, 30, 12], 1, "a")                 # LLaVA-OV-like: + newline token
    v1a, v1b = _video(10, [64, 40, 20, 8], 0, "b"), _video(100, [30, 20, 12, 6], 0, "c")
    v2 = _video(5, [70, 35, 20, 9], 0, "d")
    return [
        dict(videos=[v2], prompt=100, start=100 + 7, num=1),     # decoding (7 tokens out)
        dict(videos=[], prompt=20, start=25, num=1),             # text decode
        dict(videos=[v0], prompt=160, start=32, num=128),        # prefix hit of 32 (< video)
        dict(videos=[v1a, v1b], prompt=150, start=0, num=150),
        dict(videos=[], prompt=300, start=64, num=96),           # text prefill, a middle chunk
    ]


def _alive(rng, req):
    """alive[g]: bool per position (up to the end of the step) at stage g."""
    n = req["start"] + req["num"]
    alive = np.ones((S, n), dtype=bool)
    for v in req["videos"]:
        if v.offset >= n:  # not reached by the end of the step: nothing dropped yet
            continue
        kept = list(range(v.offset, v.visual_end))
        for g in range(1, S):
            kept = sorted(rng.sample(kept, v.counts[g]))
            drop = np.ones(n, dtype=bool)
            drop[v.offset:v.visual_end] = False
            drop[kept] = True
            alive[g] &= drop
    return alive


class _Model:
    def __init__(self, videos_by_req):
        self.hieravid_boundaries = BOUNDARIES
        self.hieravid_state = StageState()
        self._videos = videos_by_req

    def hieravid_request_videos(self, state):
        return self._videos[state.req_id]


def _block_table(rng, num_reqs, width, num_blocks):
    ids = rng.sample(range(1, num_blocks), num_reqs * width)
    return np.asarray(ids, dtype=np.int32).reshape(num_reqs, width)


def _runner(reqs, groups, block_size, attn_groups, pad):
    rng = random.Random(1)
    width = 40
    num_reqs = len(reqs)
    tables = []
    for _ in range(groups):
        t = _block_table(rng, num_reqs, width, 4096)
        tables.append(SimpleNamespace(
            block_size=block_size, block_table=SimpleNamespace(np=t),
            get_device_tensor=lambda n, t=t: torch.from_numpy(t[:n])))
    qsl = np.zeros(num_reqs + 1, dtype=np.int32)
    qsl[1:] = np.cumsum([r["num"] for r in reqs])
    ib = SimpleNamespace(
        req_ids=[f"r{i}" for i in range(num_reqs)],
        num_computed_tokens_cpu=np.asarray([r["start"] for r in reqs]),
        num_prompt_tokens=np.asarray([r["prompt"] for r in reqs]),
        block_table=tables)
    return SimpleNamespace(
        input_batch=ib,
        requests={f"r{i}": SimpleNamespace(req_id=f"r{i}") for i in range(num_reqs)},
        query_start_loc=SimpleNamespace(cpu=torch.from_numpy(qsl),
                                        gpu=torch.from_numpy(qsl.copy())),
        kv_cache_config=SimpleNamespace(kv_cache_groups=[None] * groups),
        device=torch.device("cpu"), attn_groups=attn_groups), int(qsl[-1]) + pad


# ------------------------------------------------------------------------------------------
# vLLM objects
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import (CacheConfig, ModelConfig, SchedulerConfig, VllmConfig,
                             set_current_vllm_config)

    from hieravid_vllm.testing.models import build_tiny_model

    mc = ModelConfig(model=str(build_tiny_model("qwen2_5_vl")), dtype="float32",
                     max_model_len=4096, enforce_eager=True)
    cfg = VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=16),
                     scheduler_config=SchedulerConfig(max_num_seqs=8,
                                                      max_num_batched_tokens=2048,
                                                      max_model_len=4096,
                                                      is_encoder_decoder=False))
    with set_current_vllm_config(cfg):
        yield cfg


def _attn_groups(vllm_config, backend_cls, groups, block_size, kernel_block_size):
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.utils import AttentionGroup

    names = [NAME.format(i) for i in range(LAYERS)]
    by_group = [[n] for n in names] if groups == S else [names]
    out = []
    for gid, layer_names in enumerate(by_group):
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD,
                                 dtype=torch.float32)
        ag = AttentionGroup(backend_cls, layer_names, spec, gid)
        ag.create_metadata_builders(vllm_config, torch.device("cpu"), kernel_block_size)
        out.append([ag])
    return out


class _Capture:
    """Wraps each group's build_metadata: records the CommonAttentionMetadata it was handed."""

    def __init__(self, attn_groups):
        self.calls = []
        for groups in attn_groups:
            for ag in groups:
                orig = ag.build_metadata

                def build(cm, ubatch_idx=0, *a, _orig=orig, _ag=ag, **kw):
                    self.calls.append((_ag, cm))
                    return _orig(cm, ubatch_idx, *a, **kw)

                ag.build_metadata = build


# ------------------------------------------------------------------------------------------
# the simulation
# ------------------------------------------------------------------------------------------
def _expected(reqs, alives, tables, g, block_size, pad):
    q, seq, slots = [], [], []
    for i, (r, alive) in enumerate(zip(reqs, alives)):
        s, e = r["start"], r["start"] + r["num"]
        a = alive[g]
        idx = np.cumsum(a) - 1  # compacted index of each alive position
        rows = [p for p in range(s, e) if a[p]]
        q.append(len(rows))
        seq.append(int(a[:e].sum()))
        for p in rows:
            j = int(idx[p])
            slots.append(int(tables[i, j // block_size]) * block_size + j % block_size)
    qsl = np.concatenate([[0], np.cumsum(q)])
    return dict(qsl=qsl, seq=np.asarray(seq), slots=np.asarray(slots + [-1] * pad),
                rows=int(sum(q)), max_q=max(q), max_seq=max(seq))


def _check_cm(cm, want, reqs):
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills

    assert cm.num_actual_tokens == want["rows"]
    assert cm.num_reqs == len(reqs)
    assert cm.is_prefilling.tolist() == [r["start"] < r["prompt"] for r in reqs]
    # decodes stay first with query length 1 (FlashInfer / reordering backends split on it)
    nd = next((i for i, r in enumerate(reqs) if r["num"] != 1), len(reqs))
    assert split_decodes_and_prefills(cm, decode_threshold=1)[:2] == (nd, len(reqs) - nd)
    assert cm.query_start_loc_cpu.tolist() == want["qsl"].tolist()
    assert cm.query_start_loc.tolist() == want["qsl"].tolist()
    assert cm.seq_lens.tolist() == want["seq"].tolist()
    assert cm.seq_lens_cpu_upper_bound.tolist() == want["seq"].tolist()
    assert cm.max_query_len == want["max_q"] and cm.max_seq_len == want["max_seq"]
    assert cm.slot_mapping.tolist() == want["slots"].tolist()
    assert cm.causal is True


def _check_flash_attn(md, want, table, kernel_table):
    assert md.num_actual_tokens == want["rows"]
    assert md.query_start_loc.tolist() == want["qsl"].tolist()        # cu_seqlens_q
    assert md.seq_lens.tolist() == want["seq"].tolist()               # seqused_k
    assert md.max_query_len == want["max_q"] and md.max_seq_len == want["max_seq"]
    assert md.slot_mapping.tolist() == want["slots"].tolist()
    assert torch.equal(md.block_table.cpu(), torch.from_numpy(kernel_table(table)))
    assert md.causal is True and md.scheduler_metadata is None


def _run(vllm_config, backend_cls, groups, kernel_block_size=None, block_size=16, pad=5,
         seed=0, reqs=None, selecting=(False, False, True, True, False), runs=1):
    rng = random.Random(seed)
    reqs = _batch(rng) if reqs is None else reqs
    alives = [_alive(rng, r) for r in reqs]
    attn_groups = _attn_groups(vllm_config, backend_cls, groups, block_size, kernel_block_size)
    cap = _Capture(attn_groups)
    runner, padded = _runner(reqs, groups, block_size, attn_groups, pad)
    model = _Model({f"r{i}": r["videos"] for i, r in enumerate(reqs)})
    names = [NAME.format(i) for i in range(LAYERS)]
    stage0 = object()
    for _ in range(runs):  # runs > 1: the same batch again (its arrays are reused)
        cap.calls.clear()
        attn_metadata = {n: stage0 for n in names}
        slot_by_layer = {n: torch.zeros(padded, dtype=torch.int64) for n in names}
        plan = build_step_plan(runner, model, attn_metadata, slot_by_layer, len(reqs),
                               padded - pad)
    assert plan is not None and plan.selecting == any(selecting)
    if any(selecting):
        assert [bool(r.selecting) for r in plan.reqs] == list(selecting)
    else:  # no video in the step: planned over the batch's arrays, no per-request plan
        assert plan.reqs == []
    assert attn_metadata[names[0]] is stage0  # stage 0 keeps the runner's own metadata
    assert len(cap.calls) == S - 1
    out = []
    for g in range(1, S):
        gid = g if groups == S else 0
        table = runner.input_batch.block_table[gid].block_table.np[:len(reqs)]
        want = _expected(reqs, alives, table, g, block_size, pad)
        assert plan.stage_rows[g] == want["rows"]
        ag, cm = cap.calls[g - 1]
        assert ag is attn_groups[gid][0]
        _check_cm(cm, want, reqs)
        md = attn_metadata[names[g]]
        assert md is not stage0 and slot_by_layer[names[g]] is cm.slot_mapping
        out.append((md, want, table, ag))
    return out


def _decode_batch():
    """A step that touches no video: decodes of pruned-video requests (one video, two videos,
    LLaVA-OV-like with a newline token), a request whose prompt chunk ends before its video,
    text decode and a text prefill chunk (plan over the batch's arrays)."""
    v0 = _video(40, [90, 50, 30, 12], 1, "a")
    v1a, v1b = _video(10, [64, 40, 20, 8], 0, "b"), _video(100, [30, 20, 12, 6], 0, "c")
    v2 = _video(5, [70, 35, 20, 9], 0, "d")
    v3 = _video(200, [40, 30, 20, 10], 0, "e")
    return [
        dict(videos=[v2], prompt=75, start=75, num=1),             # prompt ends with the video
        dict(videos=[v1a, v1b], prompt=150, start=150 + 30, num=1),
        dict(videos=[], prompt=20, start=25, num=1),
        dict(videos=[v0], prompt=160, start=160, num=1),           # its first decode step
        dict(videos=[v3], prompt=260, start=64, num=96),           # chunk ends before the video
        dict(videos=[], prompt=300, start=64, num=96),
    ]


@pytest.mark.parametrize("groups", [S, 1], ids=["group-per-stage", "shared-group"])
@pytest.mark.parametrize("runs", [1, 2])
def test_step_without_a_video_is_planned_over_arrays(vllm_config, groups, runs):
    """The array path (no request's video in the step) against the same token simulation,
    also when the batch's arrays come from the previous step's cache (runs=2)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    out = _run(vllm_config, CPUAttentionBackend, groups, reqs=_decode_batch(),
               selecting=(False,) * 6, runs=runs)
    assert len(out) == S - 1


def test_batch_arrays_follow_the_batch():
    """StageState.batch_videos: reused for the same requests in the same order, rebuilt for
    another order or after a request is freed; rows match the per-request summaries."""
    from hieravid_vllm.stages import VideoSummary

    reqs = _decode_batch()
    videos = {f"r{i}": r["videos"] for i, r in enumerate(reqs)}
    st = StageState()
    requests = {rid: SimpleNamespace(req_id=rid) for rid in videos}

    def videos_of(state):
        return videos[state.req_id]

    ids = tuple(videos)
    a = st.batch_videos(ids, requests, videos_of, S)
    assert st.batch_videos(ids, requests, videos_of, S) is a
    b = st.batch_videos(ids[::-1], requests, videos_of, S)
    assert b is not a and b.req_ids == ids[::-1]
    for bv in (a, b):
        for i, rid in enumerate(bv.req_ids):
            v = videos[rid]
            if not v:
                assert bv.end[i] == 0 and (bv.dropped[:, i] == 0).all()
                continue
            sm = VideoSummary.of(v, S)
            assert (bv.first[i], bv.end[i]) == (min(x.offset for x in v), max(x.end for x in v))
            # dropped before stage g: the visual tokens of all videos minus those kept
            assert bv.dropped[:, i].tolist() == [sum(x.counts[0] - x.counts[g] for x in v)
                                                 for g in range(S)]
            assert bv.dropped[:, i].tolist() == sm.dropped.tolist()
    st.free_request(ids[0])
    assert st.batch_videos(ids[::-1], requests, videos_of, S) is not b


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [S, 1], ids=["group-per-stage", "shared-group"])
def test_flash_attn_builder_per_stage(vllm_config, groups):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    for md, want, table, ag in _run(vllm_config, FlashAttentionBackend, groups):
        assert type(md).__name__ == "FlashAttentionMetadata"
        _check_flash_attn(md, want, table, lambda t: t.astype(np.int32))


def test_flash_attn_builder_kernel_blocks(vllm_config):
    """Cache blocks of 64, kernel blocks of 16 (vLLM maps the block table in
    ``AttentionGroup.build_metadata``): slots stay the same numbers, tables are mapped."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    def kernel(t):
        return (t[:, :, None].astype(np.int64) * 4 + np.arange(4)).reshape(t.shape[0], -1)

    for md, want, table, ag in _run(vllm_config, FlashAttentionBackend, S,
                                    kernel_block_size=16, block_size=64):
        assert ag.kernel_block_size == 16
        _check_flash_attn(md, want, table, kernel)


@pytest.mark.parametrize("groups", [S, 1], ids=["group-per-stage", "shared-group"])
def test_stage_inputs_per_stage(vllm_config, groups):
    """The CommonAttentionMetadata every builder gets per stage (checked in ``_run``),
    here through CPU_ATTN's builder: what FlashInfer's ``build`` would receive."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    bs = 32
    out = _run(vllm_config, CPUAttentionBackend, groups, block_size=bs)
    # FlashInfer's paged-KV plan inputs (``_compute_flashinfer_kv_metadata``: indptr = cumsum
    # of ceil(seq_len / page), indices = each request's first pages of the block table,
    # last_page_len) from the simulated seq lens: every slot a stage writes lies in a page
    # the plan lists for that request, at an offset below the page's used length
    for md, want, table, ag in out:
        seq = want["seq"]
        pages = -(-seq // bs)
        indptr = np.concatenate([[0], np.cumsum(pages)])
        indices = np.concatenate([table[i, :pages[i]] for i in range(len(seq))])
        last = np.where((seq % bs == 0) & (seq != 0), bs, seq % bs)
        qsl = want["qsl"]
        for i in range(len(seq)):
            own = indices[indptr[i]:indptr[i + 1]]
            for slot in want["slots"][qsl[i]:qsl[i + 1]]:
                page = int(slot) // bs
                assert page in own
                if page == own[-1]:
                    assert int(slot) % bs < last[i]


# FlashInferMetadataBuilder.build is not run anywhere here: vLLM's flashinfer module imports
# the flashinfer package at top level, which needs the CUDA Python stack; the inputs the
# plugin hands it are checked per stage above (test_stage_inputs_per_stage).


@pytest.mark.parametrize("groups", [S, 1], ids=["group-per-stage", "shared-group"])
def test_flex_builder_stage_metadata_survive_later_stages(vllm_config, groups):
    """FLEX_ATTENTION's builder hands out views of its own persistent buffers
    (``query_start_loc``, ``seq_lens``, ``decode_offset``, ``doc_ids``, physical-to-logical
    map), so a second ``build`` on the same builder rewrites the first's metadata. With one
    KV group per stage every stage has its own builder and keeps its values; with one shared
    group the stages share one builder and all but the last are overwritten -- why the
    shared layout is for CPU_ATTN only (see the report of issue #13)."""
    from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend

    vllm_config.cache_config.num_gpu_blocks = 4096
    try:
        out = _run(vllm_config, FlexAttentionBackend, groups)
    finally:
        vllm_config.cache_config.num_gpu_blocks = None
    intact = []
    for md, want, table, ag in out:
        n = len(want["seq"])
        intact.append(md.query_start_loc[:n + 1].tolist() == want["qsl"].tolist() and
                      md.seq_lens[:n].tolist() == want["seq"].tolist())
        assert md.slot_mapping.tolist() == want["slots"].tolist()  # not a builder buffer
    if groups == S:
        assert all(intact)
    else:
        assert intact == [False] * (S - 2) + [True]


# ------------------------------------------------------------------------------------------
# vLLM's own work for the stage groups: left to the plan when the plan replaces it
# ------------------------------------------------------------------------------------------
def _stage_groups(attn_groups):
    return [SimpleNamespace(layer_names=list(g[0].layer_names)) for g in attn_groups]


def test_plan_replaces_stage_groups_only_where_it_builds_every_layer(vllm_config):
    """True only with one KV cache group per stage holding exactly that stage's layers and a
    video in the batch (then build_step_plan builds every layer of groups 1..S-1)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from hieravid_vllm.stages import plan_replaces_stage_groups

    reqs = _decode_batch()
    text_first = [reqs[2], reqs[5]] + reqs[:2]    # rows 0-1 without a video
    ag = _attn_groups(vllm_config, CPUAttentionBackend, S, 16, None)
    for batch, n, want in ((reqs, len(reqs), True), (text_first, 2, False),
                           (text_first, 3, True)):
        runner, _ = _runner(batch, S, 16, ag, 0)
        runner.kv_cache_config.kv_cache_groups = _stage_groups(ag)
        model = _Model({f"r{i}": r["videos"] for i, r in enumerate(batch)})
        assert plan_replaces_stage_groups(runner, model, n) is want, (n, want)
    # a group that also holds a layer of another stage: vLLM keeps building every group
    runner, _ = _runner(reqs, S, 16, ag, 0)
    groups = _stage_groups(ag)
    groups[1].layer_names.append(NAME.format(2))
    runner.kv_cache_config.kv_cache_groups = groups
    assert not plan_replaces_stage_groups(runner, _Model({f"r{i}": r["videos"]
                                                          for i, r in enumerate(reqs)}),
                                          len(reqs))
    # one group for all layers (HIERAVID_KV_GROUPS=0)
    ag1 = _attn_groups(vllm_config, CPUAttentionBackend, 1, 16, None)
    runner, _ = _runner(reqs, 1, 16, ag1, 0)
    runner.kv_cache_config.kv_cache_groups = _stage_groups(ag1)
    assert not plan_replaces_stage_groups(runner, _Model({f"r{i}": r["videos"]
                                                          for i, r in enumerate(reqs)}),
                                          len(reqs))


def test_runner_hook_leaves_the_stage_groups_to_the_plan(vllm_config):
    """The runner patch (``stage_hooks.apply``) on a runner class with vLLM's call order
    (_prepare_inputs -> _get_slot_mappings -> _build_attention_metadata inside execute_model):
    with a video in the batch, vLLM computes KV cache group 0's slot mapping and metadata
    only, the plan builds every layer of the other groups (the real CPU_ATTN builder) and the
    full config is back afterwards; without a video vLLM does every group and there is no
    plan; a step that skipped groups 1.. and then cannot be planned is an error."""
    from dataclasses import dataclass

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from hieravid_vllm.patches.worker import stage_hooks

    ag = _attn_groups(vllm_config, CPUAttentionBackend, S, 16, None)
    names = [n for g in ag for n in g[0].layer_names]

    @dataclass
    class Config:  # stands for vLLM's KVCacheConfig dataclass
        kv_cache_groups: list

    class BlockTables:  # MultiGroupBlockTable's interface
        def __init__(self, tables, calls):
            self.block_tables, self.calls = tables, calls

        def __getitem__(self, i):
            return self.block_tables[i]

        def compute_slot_mapping(self, num_reqs, qsl, positions):
            for t in self.block_tables:
                t.compute_slot_mapping(num_reqs, qsl, positions)

    class Runner:
        def __init__(self, reqs, calls):
            base, self.padded = _runner(reqs, S, 16, ag, 5)
            self.__dict__.update(vars(base))
            self.kv_cache_config = Config(_stage_groups(ag))
            for g, t in enumerate(self.input_batch.block_table):
                t.compute_slot_mapping = lambda *a, g=g: calls.append(("slots", g))
            self.input_batch.block_table = BlockTables(self.input_batch.block_table, calls)
            self.input_batch.num_reqs = len(reqs)
            self.model = _Model({f"r{i}": r["videos"] for i, r in enumerate(reqs)})
            self.model.hieravid_stages_enabled = True
            self.calls = calls

        def get_model(self):
            return self.model

        def execute_model(self, ubatch_slices=None):
            self._prepare_inputs()
            self._get_slot_mappings()
            n = self.input_batch.num_reqs
            return self._build_attention_metadata(
                num_tokens=int(self.query_start_loc.cpu[n]), num_reqs=n,
                ubatch_slices=ubatch_slices)

        def _prepare_inputs(self):
            self.input_batch.block_table.compute_slot_mapping(self.input_batch.num_reqs,
                                                              None, None)

        def _get_slot_mappings(self):
            return {}, {n: torch.full((self.padded,), -7) for n in names}

        def _build_attention_metadata(self, **kw):
            groups = self.kv_cache_config.kv_cache_groups
            self.calls.append(("build", len(groups)))
            return {n: "vllm" for g in groups for n in g.layer_names}, None

    stage_hooks.apply(SimpleNamespace(GPUModelRunner=Runner))

    calls = []
    r = Runner(_decode_batch(), calls)
    md, _ = r.execute_model()
    assert calls == [("slots", 0), ("build", 1)]
    assert len(r.kv_cache_config.kv_cache_groups) == S and not r._hieravid_first_group
    assert set(md) == set(names) and md[names[0]] == "vllm"
    assert all(md[n] != "vllm" for n in names[1:])          # built by the plan
    assert r.model.hieravid_state.take_plan() is not None
    assert not getattr(r.input_batch.block_table, stage_hooks._FIRST_ONLY)

    calls = []
    r = Runner([dict(videos=[], prompt=20, start=25, num=1),
                dict(videos=[], prompt=300, start=64, num=96)], calls)
    md, _ = r.execute_model()
    assert calls == [("slots", g) for g in range(S)] + [("build", S)]
    assert all(md[n] == "vllm" for n in names)
    assert r.model.hieravid_state.take_plan() is None

    r = Runner(_decode_batch(), [])
    with pytest.raises(RuntimeError, match="left to the stage plan"):
        r.execute_model(ubatch_slices=object())
    assert len(r.kv_cache_config.kv_cache_groups) == S
