"""The bookkeeping of the in-LLM stages against brute force (no engine).

* compacted query/prefix lengths per stage (``stages.plan_requests``) equal a simulation that
  drops random visual tokens token by token;
* the per-stage slot mapping equals a per-token block-table lookup;
* the scheduler rules: a video and the rest of its prompt are never split; a prefix-cache
  hit never ends inside a video; the per-request block key sits on the block of the first
  video's start only.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
import pytest

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.stages import VideoSpan, VideoSummary, _ReqPlan, _slot_mapping, plan_requests
from hieravid_vllm import scheduler as hsched
from hieravid_vllm import stages as hstages

CFG = HieraVidConfig(budget=0.3)


def _video(offset, counts, extra=0, name="v"):
    return VideoSpan(offset, counts[0] + extra, tuple(counts), (False,) + (True,) * (len(counts) - 1),
                     name, CFG)


def _random_counts(rng, stages):
    c = [rng.randint(1, 40)]
    for _ in range(stages - 1):
        c.append(rng.randint(1, c[-1]))
    return c


def _survivors(rng, videos, total_len, stages):
    """surv[g, p]: token p present in stage g (random kept visual tokens, nested stages)."""
    surv = np.ones((stages, total_len), dtype=bool)
    for v in videos:
        vis = list(range(v.offset, v.offset + v.counts[0]))
        kept = vis
        for g in range(1, stages):
            kept = sorted(rng.sample(kept, v.counts[g]))
            mask = np.zeros(total_len, dtype=bool)
            mask[kept] = True
            region = np.zeros(total_len, dtype=bool)
            region[vis] = True
            surv[g] &= ~region | mask
    return surv


@pytest.mark.parametrize("seed", range(60))
def test_plan_requests_matches_token_simulation(seed):
    rng = random.Random(seed)
    S = 4
    reqs, truth = [], []
    for i in range(rng.randint(1, 5)):
        videos, pos = [], rng.randint(0, 20)
        for k in range(rng.randint(0, 3)):
            counts = _random_counts(rng, S)
            extra = rng.randint(0, 1)
            videos.append(_video(pos, counts, extra, f"r{i}v{k}"))
            pos += counts[0] + extra + rng.randint(0, 15)
        prompt = pos + rng.randint(1, 10)
        total = prompt + rng.randint(0, 20)
        # a step that prefills every video and reaches the prompt end, a step after all
        # videos (decode / text), or a text chunk that ends before the first video
        kind = rng.random()
        if videos and kind < 0.4:
            start = rng.randint(0, videos[0].offset)
            n = rng.randint(prompt - start, total - start)
        elif videos and kind < 0.55 and videos[0].offset > 0:
            start = rng.randint(0, videos[0].offset - 1)
            n = rng.randint(1, videos[0].offset - start)
        else:
            lo = videos[-1].end if videos else 0
            start = rng.randint(lo, total - 1)
            n = rng.randint(1, total - start)
        # half the requests come with the summary the model caches, half without
        summary = VideoSummary.of(videos, S) if videos and rng.random() < 0.5 else None
        reqs.append(_ReqPlan(i, start, n, prompt, videos, summary=summary))
        surv = _survivors(rng, videos, total, S)
        truth.append([(int(surv[g, :start].sum()), int(surv[g, start:start + n].sum()))
                      for g in range(S)])
    q, nc = plan_requests(reqs, S)
    for i, t in enumerate(truth):
        for g in range(S):
            assert (nc[g, i], q[g, i]) == t[g], (i, g)


def test_plan_requests_rejects_split_video_and_missing_question():
    v = _video(10, [20, 10, 5, 2])
    with pytest.raises(RuntimeError, match="split across"):
        plan_requests([_ReqPlan(0, 0, 20, 40, [v])], 4)
    with pytest.raises(RuntimeError, match="last prompt token"):
        plan_requests([_ReqPlan(0, 0, 35, 40, [v])], 4)


@pytest.mark.parametrize("q", [[40, 1, 60, 0, 7], [1, 1, 1, 1, 1], [2, 0, 1, 1, 1]])
def test_slot_mapping_is_block_table_lookup(q):
    rng = np.random.default_rng(0)
    bs = 16
    table = rng.permutation(200).reshape(5, 40)
    nc = np.array([0, 17, 33, 5, 100])
    q = np.array(q)
    got = _slot_mapping(table, bs, nc, q, int(q.sum()) + 3)
    want = []
    for i in range(5):
        for j in range(nc[i], nc[i] + q[i]):
            want.append(table[i][j // bs] * bs + j % bs)
    assert got[:len(want)].tolist() == want
    assert (got[len(want):] == -1).all()


def _request(spans, prompt, rid="r"):
    feats = [SimpleNamespace(modality=m, mm_position=SimpleNamespace(offset=o, length=n))
             for m, o, n in spans]
    return SimpleNamespace(mm_features=feats, num_prompt_tokens=prompt, request_id=rid)


def test_scheduler_never_splits_video_and_question():
    r = _request([("image", 2, 10), ("video", 20, 50)], prompt=90)
    assert not hsched.must_wait(r, 0, 90)           # whole prompt
    assert not hsched.must_wait(r, 0, 120)
    assert hsched.must_wait(r, 0, 89)               # question cut off
    assert hsched.must_wait(r, 0, 19)               # would prefill text now, video later
    assert hsched.must_wait(r, 30, 10)              # inside the video
    assert not hsched.must_wait(r, 70, 5)           # video already computed (cache hit)
    assert not hsched.must_wait(_request([("image", 0, 10)], 50), 0, 5)  # no video


def test_prefix_hit_cut_before_video():
    r = _request([("video", 40, 100)], prompt=200)
    assert hsched.usable_hit(r, 32, 16) == 32
    assert hsched.usable_hit(r, 48, 16) == 32       # ends inside the video
    assert hsched.usable_hit(r, 128, 16) == 32
    assert hsched.usable_hit(r, 144, 16) == 144     # whole video cached
    r2 = _request([("video", 64, 10)], prompt=100)
    assert hsched.usable_hit(r2, 70, 16) == 64


def test_block_key_on_first_video_block_only():
    r = _request([("video", 40, 100), ("video", 150, 20)], prompt=200, rid="abc")
    keys = [hsched.hieravid_extra_keys(r, s, s + 16) for s in range(0, 208, 16)]
    marked = [i for i, k in enumerate(keys) if k is not None]
    assert marked == [40 // 16]
    assert keys[marked[0]] == ("hieravid_stages", "abc")
    assert hsched.hieravid_extra_keys(_request([("image", 0, 5)], 10), 0, 16) is None


def test_kv_events_carry_the_request_key():
    """vLLM's BlockPool (real, CPU) publishing KV-cache events for a full-mode video request:
    the block holding the video's first token is announced with the per-request key, as its
    block hash is (block_pool imported the hasher by name: both names are patched). The
    registry applies the patch; the HieraVid scheduler switches the keys on (``enable``)."""
    from vllm.v1.core import block_pool as bp
    from vllm.v1.core import kv_cache_utils as kcu

    from hieravid_vllm import patches
    from hieravid_vllm.patches.engine_core import block_hasher

    patches.apply_all()
    block_hasher.enable()  # what HieraVidScheduler.__init__ does in the engine core
    assert bp.generate_block_hash_extra_keys is kcu.generate_block_hash_extra_keys
    assert getattr(bp.generate_block_hash_extra_keys, patches.MARK, False)
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    r = Request("req-7", list(range(200)), SamplingParams(max_tokens=1), None, mm_features=[
        MultiModalFeatureSpec(data=None, modality="video", identifier="vid-hash",
                              mm_position=PlaceholderRange(offset=40, length=100))])
    keys = [bp.generate_block_hash_extra_keys(r, s, s + 16, 0)[0] for s in range(0, 208, 16)]
    marked = [i for i, k in enumerate(keys) if k and ("hieravid_stages", "req-7") in k]
    assert marked == [40 // 16]


def _engine_args(**kw):
    base = dict(pipeline_parallel_size=1, speculative_config=None, data_parallel_size=1,
                scheduler_cls=None, async_scheduling=None,
                compilation_config=SimpleNamespace(cudagraph_mode=None))
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("kw, reason", [
    (dict(pipeline_parallel_size=2), "pipeline"),
    (dict(speculative_config={"method": "ngram"}), "speculative"),
    (dict(data_parallel_size=2), "data parallel"),
    (dict(scheduler_cls="my.Scheduler"), "scheduler-cls"),
])
def test_full_mode_falls_back_to_input_only_where_unsupported(kw, reason, caplog):
    from hieravid_vllm import vllm_patches
    from hieravid_vllm.options import ServingOptions

    opts = ServingOptions.from_dict({"budget": 0.3})
    assert opts.config.mode == "full"
    args = _engine_args(**kw)
    with caplog.at_level("WARNING", logger="vllm.hieravid_vllm"):
        out = vllm_patches.configure_stages(args, opts)
    assert out.config.mode == "input_only" and out.config.budget == 0.3
    assert reason in caplog.text
    assert args.scheduler_cls == kw.get("scheduler_cls")  # scheduler untouched


def test_full_mode_refuses_the_shm_processor_cache():
    """Through vLLM's real EngineArgs: full mode + shm stops start-up naming the flag; input
    only mode (no scheduler hook) accepts it."""
    from vllm.engine.arg_utils import EngineArgs

    from hieravid_vllm.testing.models import build_tiny_model
    from hieravid_vllm.vllm_patches import apply_all

    apply_all()
    model = str(build_tiny_model("qwen2_5_vl"))
    args = EngineArgs(model=model, mm_processor_cache_type="shm",
                      additional_config={"hieravid": {"budget": 0.3}})
    with pytest.raises(ValueError, match="--mm-processor-cache-type shm"):
        args.create_engine_config()
    cfg = EngineArgs(model=model, mm_processor_cache_type="shm", additional_config={
        "hieravid": {"budget": 0.3, "mode": "input_only"}}).create_engine_config()
    assert cfg.model_config.get_multimodal_config().mm_processor_cache_type == "shm"


@pytest.mark.parametrize("mode", ["full", "input_only"])
def test_bad_dpp_split_env_stops_start_up(mode, monkeypatch):
    """HIERAVID_DPP_SPLIT (the greedy kernel's launch), HIERAVID_HOST_GREEDY (the CPU
    greedy's loop) and HIERAVID_BOUNDARY_COUNTS (where a boundary's counts are computed) are
    checked at start-up in both modes, the error names the variable; a
    good value passes."""
    from hieravid_vllm import vllm_patches
    from hieravid_vllm.options import ServingOptions

    opts = ServingOptions.from_dict({"budget": 0.3, "mode": mode})
    monkeypatch.setenv("HIERAVID_DPP_SPLIT", "fast")
    with pytest.raises(ValueError, match="HIERAVID_DPP_SPLIT"):
        vllm_patches.configure_stages(_engine_args(), opts)
    monkeypatch.setenv("HIERAVID_DPP_SPLIT", "off")
    assert vllm_patches.configure_stages(_engine_args(), opts).config.mode == mode
    monkeypatch.setenv("HIERAVID_HOST_GREEDY", "numbaa")
    with pytest.raises(ValueError, match="HIERAVID_HOST_GREEDY"):
        vllm_patches.configure_stages(_engine_args(), opts)
    monkeypatch.setenv("HIERAVID_HOST_GREEDY", "numpy")
    assert vllm_patches.configure_stages(_engine_args(), opts).config.mode == mode
    monkeypatch.setenv("HIERAVID_BOUNDARY_COUNTS", "gpu")
    with pytest.raises(ValueError, match="HIERAVID_BOUNDARY_COUNTS"):
        vllm_patches.configure_stages(_engine_args(), opts)
    monkeypatch.setenv("HIERAVID_BOUNDARY_COUNTS", "device")
    assert vllm_patches.configure_stages(_engine_args(), opts).config.mode == mode


def test_full_mode_installs_the_scheduler():
    from hieravid_vllm import vllm_patches
    from hieravid_vllm.options import ServingOptions

    args = _engine_args()
    out = vllm_patches.configure_stages(args, ServingOptions.from_dict({"budget": 0.3}))
    assert out.config.mode == "full"
    assert args.scheduler_cls == vllm_patches.SCHEDULER_CLS == \
        f"{hsched.HieraVidScheduler.__module__}.{hsched.HieraVidScheduler.__name__}"
    assert args.async_scheduling is False


def test_compacted_tokens_matches_token_simulation():
    rng = random.Random(7)
    for _ in range(200):
        spans, pos = [], rng.randint(0, 10)
        videos = []
        for k in range(rng.randint(1, 3)):
            counts = _random_counts(rng, 4)
            videos.append(_video(pos, counts, 0, f"v{k}"))
            spans.append((pos, tuple(counts)))
            pos += counts[0] + rng.randint(0, 8)
        total = pos + 10
        surv = _survivors(rng, videos, total, 4)
        for n in range(total + 1):
            # never inside a video at a step end, except the positions the scheduler allows
            for g in range(4):
                if any(v.offset < n < v.visual_end for v in videos):
                    continue
                assert hstages.compacted_tokens(spans, g, n) == int(surv[g, :n].sum())
        # the scheduler's per-request form (decode shortcut past the last video) counts alike
        fast = hstages.StageSpans(spans)
        for n in range(total + 1):
            for g in range(4):
                assert fast.compact(g, n) == hstages.compacted_tokens(spans, g, n), (n, g)
    assert hstages.NO_SPANS.compact(2, 17) == 17


# ---------------------------------------------------------------------------------------------
# staged_forward's rows at the stage boundaries, against per-row masks by token position
# ---------------------------------------------------------------------------------------------
class _Layer:
    """A decoder layer stand-in with vLLM's call convention (positions, hidden, residual):
    mixes its rows' positions in, so that a wrong row or position changes the output."""

    def __init__(self, gen, C):
        self.w = torch.randn(C, C, generator=gen, dtype=torch.float64) / C ** 0.5

    def __call__(self, positions, hidden, residual):
        pos = positions.to(torch.float64).sum(0, keepdim=True).T * 1e-3
        res = hidden if residual is None else hidden + residual
        return torch.tanh(res @ self.w + pos), res


class _TextModel:
    def __init__(self, gen, C, num_layers):
        self.layers = [_Layer(gen, C) for _ in range(num_layers)]
        self.start_layer, self.end_layer = 0, num_layers

    @staticmethod
    def norm(hidden, residual):
        return hidden + residual, None


def _masked_forward(tm, plan, positions, embeds, layouts):
    """The staged forward written with per-row masks: every row's request and position,
    each video's visual rows and query rows (its end .. the last prompt token) found by
    comparing positions at every boundary."""
    from hieravid_vllm.core.pipeline import select_layer_stage

    n_total = embeds.shape[0]
    qsl = plan.query_start_loc
    req = torch.full((n_total,), -1, dtype=torch.int64)
    pos = torch.zeros(n_total, dtype=torch.int64)
    for r in plan.reqs:
        a, b = int(qsl[r.index]), int(qsl[r.index + 1])
        req[a:b] = r.index
        pos[a:b] = r.start + torch.arange(b - a)
    rows = torch.arange(n_total)
    seg = {(r.index, vi): layouts[v.mm_hash][:2] for r in plan.reqs
           for vi, v in enumerate(r.selecting)}
    kept_pos = {}
    hidden, residual, g = embeds, None, 0
    for li, layer in enumerate(tm.layers):
        if li in plan.boundaries[1:]:
            g += 1
            stream = hidden if residual is None else hidden + residual
            keep = torch.ones(hidden.shape[0], dtype=torch.bool)
            cr, cp = req[rows], pos[rows]
            for r in plan.reqs:
                for vi, v in enumerate(r.selecting):
                    vis = torch.nonzero((cr == r.index) & (cp >= v.offset)
                                        & (cp < v.offset + v.counts[0])).flatten()
                    q = (cr == r.index) & (cp >= v.offset + v.counts[0]) & (cp < r.num_prompt)
                    s, nseg = seg[(r.index, vi)]
                    kept = select_layer_stage(stream[vis].float(), stream[q].float(), s,
                                              v.counts[g], v.config,
                                              use_dpp=bool(v.uses_dpp[g]), num_segments=nseg)
                    keep[vis] = False
                    keep[vis[kept]] = True
                    seg[(r.index, vi)] = (s[kept], nseg)
                    kept_pos.setdefault(v.mm_hash, []).append(cp[vis[kept]] - v.offset)
            hidden, rows, positions = hidden[keep], rows[keep], positions[..., keep]
            residual = residual[keep]
        hidden, residual = layer(positions, hidden, residual)
    hidden, _ = tm.norm(hidden, residual)
    out = hidden.new_zeros((n_total, hidden.shape[-1]))
    out[rows] = hidden
    return out, kept_pos


@pytest.mark.parametrize("seed", range(12))
def test_staged_forward_rows_match_position_masks(seed):
    """Random steps: text-only requests, decodes of requests with videos, selecting requests
    with one to three videos (some past a cached prefix, some with a trailing newline token,
    some relevance over several query rows that include a later video's rows), padding rows.
    The output rows and the tokens each stage keeps equal the mask-based forward's."""
    from hieravid_vllm.core import HieraVidConfig

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    C, S = 16, 4
    tm = _TextModel(gen, C, 6)
    boundaries = [0, 1, 3, 5]
    reqs, layouts, qsl = [], {}, [0]
    n_reqs = rng.randint(2, 5)
    must = rng.randrange(n_reqs)          # at least one request selects
    for i in range(n_reqs):
        kind = "select" if i == must else rng.choice(["text", "decode", "select"])
        start, videos, selecting = rng.randint(0, 30), [], []
        if kind == "text":
            n_tok = rng.randint(1, 12)
            num_prompt = start + n_tok
        elif kind == "decode":
            v = _video(rng.randint(0, 5), [20, 12, 8, 5], name=f"d{i}")
            videos = [v]
            start, n_tok, num_prompt = v.end + 10, 1, v.end + 5
        else:
            p = start + rng.randint(0, 4)
            for j in range(rng.randint(1, 3)):
                counts = _random_counts(rng, S)
                counts[0] = max(counts[0], 6)
                counts = sorted(counts, reverse=True)
                cfg = HieraVidConfig(budget=0.3, relevance_source=rng.choice(["last", "mean"]))
                v = VideoSpan(p, counts[0] + rng.randint(0, 1), tuple(counts),
                              (False, False, True, True), f"v{i}-{j}", cfg)
                videos.append(v)
                nseg = rng.randint(1, 3)
                ids = torch.sort(torch.randint(0, nseg, (counts[0],), generator=gen)).values
                # with host lengths (as the engine passes them) or without (read from the ids)
                layouts[v.mm_hash] = ((ids, nseg, torch.bincount(ids, minlength=nseg))
                                      if rng.random() < 0.5 else (ids, nseg))
                p = v.end + rng.randint(0, 5)
            num_prompt = p + rng.randint(1, 4)
            n_tok = num_prompt - start
            selecting = list(videos)
        r = _ReqPlan(i, start, n_tok, num_prompt, videos)
        r.selecting = selecting
        reqs.append(r)
        qsl.append(qsl[-1] + n_tok)
    n_real = qsl[-1]
    n_total = n_real + rng.randint(0, 4)
    plan = hstages.StepPlan(boundaries, reqs, n_real, np.asarray(qsl), True)
    embeds = torch.randn(n_total, C, generator=gen, dtype=torch.float64)
    positions = torch.randint(0, 1000, (3, n_total), generator=gen)
    want, want_pos = _masked_forward(tm, plan, positions, embeds, layouts)
    log = {}
    got = hstages.staged_forward(tm, plan, positions, embeds, layouts, log)
    assert torch.equal(got, want)
    assert set(log) == set(want_pos)
    for h, per_stage in log.items():
        assert [d["pos"].tolist() for d in per_stage] == [p.tolist() for p in want_pos[h]]
