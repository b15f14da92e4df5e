"""The HieraVid reference forward (hieravid_vllm.reference): the oracle of the vLLM stages.

Independent checks on the tiny checkpoints of all three architectures:
(a) budget 1.0 (nothing pruned): logits == transformers' own forward / generate on the same
    processor inputs; M-RoPE positions == transformers' ``get_rope_index`` (video rows always;
    text after a video where both numberings agree) and == the plugin's vLLM-side numbering
    (``HieraVidMRoPEMixin``) on a long video where transformers 5.x differs;
(b) budgets 0.3 / 0.1: a second formulation -- transformers' own text model over the FULL
    sequence, the dropped visual tokens hidden by per-layer 4D masks (forward pre-hooks), the
    selection computed in the hooks from the full-length stream -- gives the same selections
    and the same logits at every row alive at the end;
(c) kept counts per stage == the schedule, text rows all kept, stage i subset of stage i-1,
    the pruned prompt's visual rows carry the input stage's features;
(d) extra_token_ids: appended rows == fresh forwards of prompt + extra with the selection held
    fixed, selection independent of the extra tokens, KV-cached greedy decode == full forwards.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.pipeline import select_layer_stage
from hieravid_vllm.reference import HieraVidReference, qwen_mrope_positions, reference_forward
from hieravid_vllm.testing.models import build_tiny_model

ARCHS = ["qwen2_5_vl", "qwen2_vl", "llava_onevision"]
FPS = 8.0
QUESTION = "What happens in the clip, and which colours appear?"
ATOL = 2e-5


def _clip(num_frames: int, height: int, width: int, seed: int, num_scenes: int = 2) -> np.ndarray:
    """Frames with scene structure (static backgrounds, a moving square): merging and
    segmentation have something to do."""
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, num_frames, num_scenes + 1).astype(int)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for s in range(num_scenes):
        bg = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        bg = np.repeat(np.repeat(bg[::14, ::14], 14, 0), 14, 1)[:height, :width]
        for f in range(bounds[s], bounds[s + 1]):
            img = bg.copy()
            y = (7 * f) % max(1, height - 28)
            img[y:y + 28, 10:38] = (255, 255, 255)
            out[f] = img
    return out


@pytest.fixture(scope="module")
def clips():
    return {"short": _clip(8, 112, 112, seed=1),
            "wide": _clip(8, 112, 168, seed=2, num_scenes=3),
            "long": _clip(16, 56, 56, seed=3)}


_RUNNERS: dict = {}


def _videos(arch: str, clips, keys) -> list:
    """LLaVA-OneVision makes 64 tokens per frame whatever the size: few frames keep it fast
    (two videos of different lengths: the processor cannot stack their frames)."""
    if arch == "llava_onevision":
        return [clips[k][:4 if k == "short" else 2] for k in keys]
    return [clips[k] for k in keys]


def _runner(arch: str) -> HieraVidReference:
    if arch not in _RUNNERS:
        _RUNNERS[arch] = HieraVidReference(build_tiny_model(arch))
    return _RUNNERS[arch]


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=atol)


# ---------------------------------------------------------------------------------------------
# second formulation: transformers' text model over the full sequence + per-layer 4D masks
# ---------------------------------------------------------------------------------------------
def _masked_full_forward(ref: HieraVidReference, prep, extra=(), keep=None):
    """Every layer sees all rows; at stage i the keys of the visual tokens dropped so far are
    masked out (additive -inf) for every query. Selections are made in forward pre-hooks on the
    stage's first layer from the full-length residual stream. Returns (logits (S+E, V),
    kept flat indices per video per stage, alive rows at the end, the stream entering every
    boundary layer at the rows alive before its selection)."""
    lm = ref.lm
    cfg = prep.config
    S = prep.num_prompt_tokens
    extra = list(extra)
    E = len(extra)
    n = S + E
    emb = prep.inputs_embeds
    if E:
        emb = torch.cat([emb, lm.embed_tokens(torch.tensor(extra))])
    if ref.is_qwen:
        ext = torch.arange(E) + prep.next_position
        pos = torch.cat([prep.positions, ext[None].expand(3, E)], 1)[:, None, :]
    else:
        pos = torch.arange(n)[None]
    dropped = torch.zeros(n, dtype=torch.bool)
    vis = [torch.arange(v.start, v.end) for v in prep.videos]       # alive visual rows
    segs = [v.input_stage.segment_ids.clone() for v in prep.videos]
    flat = [[v.input_stage.kept_indices.clone()] for v in prep.videos]
    neg = torch.finfo(torch.float32).min
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    bounds = prep.boundaries
    states = []

    def hook(module, args, kwargs):
        li = module._hv_idx
        hidden = args[0] if args else kwargs["hidden_states"]
        if li in bounds[1:]:
            stage = bounds.index(li)
            h = hidden[0]
            states.append(h[~dropped].float())
            for v, span in enumerate(prep.videos):
                sched = span.input_stage.schedule
                if keep is not None:
                    k = keep[v][stage - 1]
                else:
                    q_rows = torch.tensor([r for r in range(span.end, S) if not dropped[r]])
                    k = select_layer_stage(h[vis[v]], h[q_rows], segs[v],
                                           target=sched.counts[stage], config=cfg,
                                           use_dpp=sched.uses_dpp[stage],
                                           num_segments=span.input_stage.num_segments)
                gone = torch.ones(vis[v].numel(), dtype=torch.bool)
                gone[k] = False
                dropped[vis[v][gone]] = True
                vis[v], segs[v] = vis[v][k], segs[v][k]
                flat[v].append(flat[v][-1][k])
        allowed = causal & ~dropped[None, :]
        mask = torch.zeros(n, n).masked_fill(~allowed, neg)[None, None]
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = []
    for i, layer in enumerate(lm.layers):
        layer._hv_idx = i
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=emb[None], position_ids=pos, use_cache=False)
            logits = ref.model.lm_head(out.last_hidden_state[0]).float()
    finally:
        for h in handles:
            h.remove()
    alive = torch.nonzero(~dropped).flatten()
    return logits, flat, alive, states


# ---------------------------------------------------------------------------------------------
# (a) nothing pruned == transformers
# ---------------------------------------------------------------------------------------------
def _hf_inputs(ref, clips_list, extra=()):
    enc = dict(ref.encode(clips_list, QUESTION, fps=FPS))
    if extra:
        e = torch.tensor([list(extra)])
        enc["input_ids"] = torch.cat([enc["input_ids"], e], 1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        if "mm_token_type_ids" in enc:
            enc["mm_token_type_ids"] = torch.cat(
                [enc["mm_token_type_ids"], torch.zeros_like(e, dtype=enc["mm_token_type_ids"].dtype)], 1)
    return enc


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_one_equals_transformers(arch, clips):
    ref = _runner(arch)
    videos = _videos(arch, clips, ["short"])
    extra = [11, 42, 7]
    out = ref.forward(videos, QUESTION, HieraVidConfig(budget=1.0), fps=FPS,
                      extra_token_ids=extra, return_boundary_states=True)
    enc = _hf_inputs(ref, videos, extra)
    # nothing pruned: the pruned prompt is the processor's prompt
    assert out.prompt_token_ids == enc["input_ids"][0, :-len(extra)].tolist()
    assert all(k.numel() == out.counts[0][0] for k in out.kept_indices[0])
    with torch.no_grad():
        hf_out = ref.model(**enc, output_hidden_states=True)
    hf = hf_out.logits[0].float()
    S = len(out.prompt_token_ids)
    # the stream the selection reads = HF's output_hidden_states[b]
    assert len(out.boundary_states) == len(out.boundaries) - 1
    for st, b in zip(out.boundary_states, out.boundaries[1:]):
        _close(st, hf_out.hidden_states[b][0])
    _close(out.prompt_logits, hf[S - 1])
    _close(out.extra_logits, hf[S:])
    if ref.is_qwen:  # positions: transformers' get_rope_index (numberings agree on this clip)
        pos, _ = ref.model.model.get_rope_index(
            enc["input_ids"], video_grid_thw=enc["video_grid_thw"],
            second_per_grid_ts=enc.get("second_per_grid_ts"),
            mm_token_type_ids=enc["mm_token_type_ids"], attention_mask=enc["attention_mask"])
        assert torch.equal(out.positions, pos[:, 0])
    # greedy generation: transformers' generate (raw logits) vs the KV-cached reference decode
    prompt_enc = _hf_inputs(ref, videos)
    with torch.no_grad():
        g = ref.model.generate(**prompt_enc, max_new_tokens=4, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
    hf_tokens = g.sequences[0, S:].tolist()
    hf_logits = torch.stack([x[0] for x in g.logits]).float()
    mine = out.generate(4)
    assert mine.token_ids == hf_tokens
    _close(mine.logits, hf_logits)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_long_video(arch, clips):
    """A clip whose temporal extent exceeds its spatial one: video rows == transformers'
    get_rope_index; text after the video == the vLLM-side numbering (HieraVidMRoPEMixin,
    resumes at max + 1), where transformers 5.x resumes at max(h, w) instead."""
    from types import SimpleNamespace

    from hieravid_vllm.models.common import HieraVidMRoPEMixin

    ref = _runner(arch)
    enc = ref.encode([clips["long"]], QUESTION, fps=FPS)
    prep = ref.prepare([clips["long"]], QUESTION, HieraVidConfig(budget=1.0), fps=FPS)
    ids = enc["input_ids"]
    pos_hf, _ = ref.model.model.get_rope_index(
        ids, video_grid_thw=enc["video_grid_thw"], second_per_grid_ts=enc.get("second_per_grid_ts"),
        mm_token_type_ids=enc["mm_token_type_ids"], attention_mask=enc["attention_mask"])
    pos_hf = pos_hf[:, 0]
    vid = ids[0] == ref.video_token_id
    first_after = int(torch.nonzero(vid).max()) + 1
    assert torch.equal(prep.positions[:, :first_after], pos_hf[:, :first_after])
    t, h, w = enc["video_grid_thw"][0].tolist()
    assert t > h // 2  # the case where the two numberings differ
    assert not torch.equal(prep.positions, pos_hf)
    # the plugin's vLLM-side numbering
    tps = float(getattr(ref.config.vision_config, "tokens_per_second", 1.0) or 1.0)
    spg = enc.get("second_per_grid_ts")
    t_factor = float(spg[0]) * tps if arch == "qwen2_5_vl" else 1.0
    offset = int(torch.nonzero(vid).min())
    feat = SimpleNamespace(mm_position=SimpleNamespace(offset=offset, length=int(vid.sum())))
    stub = SimpleNamespace(iter_mm_grid_thw=lambda feats: iter(
        [(offset, t, h // 2, w // 2, t_factor)]))
    pos_v, delta_v = HieraVidMRoPEMixin.get_mrope_input_positions(stub, ids[0].tolist(), [feat])
    assert torch.equal(prep.positions, pos_v)
    assert prep.next_position == len(prep.prompt_token_ids) + delta_v
    # and the standalone helper
    pos_h, delta_h = qwen_mrope_positions(ids.shape[1], [(offset, t, h // 2, w // 2, t_factor)])
    assert torch.equal(pos_h, pos_v) and delta_h == delta_v


# ---------------------------------------------------------------------------------------------
# (b) + (c) pruned: second formulation and schedule invariants
# ---------------------------------------------------------------------------------------------
def _check_invariants(out):
    prep = out.prepared
    S = prep.num_prompt_tokens
    visual = torch.zeros(S, dtype=torch.bool)
    for v, span in enumerate(prep.videos):
        visual[span.start:span.end] = True
        sched = span.input_stage.schedule
        got = [k.numel() for k in out.kept_indices[v]]
        assert got == list(sched.counts) == list(out.counts[v])
        assert torch.equal(out.kept_indices[v][0], span.input_stage.kept_indices)
        for a, b in zip(out.kept_indices[v], out.kept_indices[v][1:]):
            assert torch.isin(b, a).all()
            assert torch.equal(b, torch.sort(b).values)     # original order kept
        # the visual rows carry the input stage's (merged) features in order
        _close(prep.inputs_embeds[span.start:span.end], span.input_stage.features, atol=0)
        for i, rows in enumerate(out.rows):
            assert int(((rows >= span.start) & (rows < span.end)).sum()) == sched.counts[i]
    text_rows = torch.nonzero(~visual).flatten()
    for rows in out.rows:
        assert torch.isin(text_rows, rows).all()
    # prompt length = text + kept (+ LLaVA newline, counted as text)
    T = int((~visual).sum())
    assert S == T + sum(s.num_kept for s in prep.videos)


CASES = [(arch, ("short",) if arch != "qwen2_vl" else ("wide",), budget)
         for arch in ARCHS for budget in (0.3, 0.1)]
CASES += [("qwen2_5_vl", ("wide", "short"), 0.1), ("llava_onevision", ("short", "wide"), 0.3)]


@pytest.mark.parametrize("arch,keys,budget", CASES)
def test_pruned_matches_masked_full_sequence(arch, keys, budget, clips):
    ref = _runner(arch)
    cfg = HieraVidConfig(budget=budget)
    videos = _videos(arch, clips, keys)
    out = ref.forward(videos, QUESTION, cfg, fps=FPS, return_all_logits=True,
                      return_boundary_states=True)
    _check_invariants(out)
    # pruned prompt = rows of the processor's prompt; Qwen: their unpruned M-RoPE positions
    # (transformers' get_rope_index; both numberings agree on these clips)
    prep = out.prepared
    enc = ref.encode(videos, QUESTION, fps=FPS)
    assert enc["input_ids"][0, prep.unpruned_rows].tolist() == out.prompt_token_ids
    if ref.is_qwen:
        pos, _ = ref.model.model.get_rope_index(
            enc["input_ids"], video_grid_thw=enc["video_grid_thw"],
            second_per_grid_ts=enc.get("second_per_grid_ts"),
            mm_token_type_ids=enc["mm_token_type_ids"], attention_mask=enc["attention_mask"])
        assert torch.equal(out.positions, pos[:, 0, prep.unpruned_rows])
    else:
        assert torch.equal(out.positions[0], torch.arange(prep.num_prompt_tokens))
    assert out.counts[0][-1] < out.counts[0][0] < out.prepared.videos[0].features[..., 0].numel()
    logits, flat, alive, states = _masked_full_forward(ref, out.prepared)
    for a, b in zip(out.boundary_states, states):
        _close(a, b)
    for v in range(len(videos)):
        for a, b in zip(out.kept_indices[v], flat[v]):
            assert torch.equal(a, b)
    assert torch.equal(alive, out.rows[-1])
    _close(out.all_logits, logits[alive])
    _close(out.prompt_logits, logits[-1])


def test_mean_relevance_query(clips):
    """relevance_source='mean': the query is every alive prompt row after the video (two
    videos: the first video's query includes the second video's kept tokens)."""
    ref = _runner("qwen2_5_vl")
    cfg = HieraVidConfig(budget=0.3, relevance_source="mean")
    out = ref.forward([clips["wide"], clips["short"]], QUESTION, cfg, fps=FPS,
                      return_all_logits=True)
    _check_invariants(out)
    logits, flat, alive, _ = _masked_full_forward(ref, out.prepared)
    assert all(torch.equal(a, b) for v in range(2) for a, b in zip(out.kept_indices[v], flat[v]))
    _close(out.all_logits, logits[alive])


def test_bad_inputs():
    ref = _runner("qwen2_5_vl")
    with pytest.raises(ValueError, match="mode='full'"):
        ref.prepare([_clip(4, 56, 56, 0)], QUESTION, HieraVidConfig(mode="input_only"))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        ref.prepare([np.zeros((4, 56, 56), np.uint8)], QUESTION, HieraVidConfig())
    with pytest.raises(ValueError, match="fps"):
        ref.prepare([_clip(4, 56, 56, 0)] * 2, QUESTION, HieraVidConfig(), fps=[8.0])


# ---------------------------------------------------------------------------------------------
# (d) decoding steps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_extra_tokens_hold_the_selection(arch, clips):
    ref = _runner(arch)
    cfg = HieraVidConfig(budget=0.3)
    prep = ref.prepare(_videos(arch, clips, ["short"]), QUESTION, cfg, fps=FPS)
    base = ref.forward(prep)
    extra = [17, 3, 250]
    out = ref.forward(prep, extra_token_ids=extra)
    # selection depends on the prompt only
    for a, b in zip(out.kept_indices[0], base.kept_indices[0]):
        assert torch.equal(a, b)
    _close(out.prompt_logits, base.prompt_logits)
    for k in range(len(extra)):
        fresh = ref.forward(prep, extra_token_ids=extra[:k + 1], keep=base.stage_keep)
        _close(out.extra_logits[k], fresh.extra_logits[-1])
    # second formulation with the extra tokens appended, selection held fixed
    logits, _flat, _alive, _ = _masked_full_forward(ref, prep, extra, keep=base.stage_keep)
    S = prep.num_prompt_tokens
    _close(out.extra_logits, logits[S:])
    # KV-cached greedy decode == full forwards over the generated tokens
    gen = base.generate(4, ignore_eos=True)
    assert len(gen.token_ids) == 4 and gen.finish_reason == "length"
    full = ref.forward(prep, extra_token_ids=gen.token_ids[:-1])
    _close(gen.logits, full.logits)
    assert gen.token_ids == [int(t) for t in torch.argmax(full.logits, -1)]


def test_one_call_form_matches_runner(clips):
    ref = _runner("qwen2_5_vl")
    cfg = HieraVidConfig(budget=0.3)
    a = ref.forward([clips["short"]], QUESTION, cfg, fps=FPS, extra_token_ids=[5])
    b = reference_forward(ref.model_dir, [clips["short"]], QUESTION, cfg.model_dump(),
                          extra_token_ids=[5], fps=FPS)
    assert a.prompt_token_ids == b.prompt_token_ids
    assert all(torch.equal(x, y) for x, y in zip(a.kept_indices[0], b.kept_indices[0]))
    _close(a.logits, b.logits, atol=0)
