"""benchmarks/step_profile.py: a real in-process vLLM engine per configuration, tiny model.

Checks what the benchmark's table rests on: every configuration ran, the measured run has one
engine step per output token (the prefill of every request in the first, then one decode
step per token), every timed vLLM function was called once per step and its time lies inside
the step's (the scheduler and runner parts sum to at most the step, and the model forward is
most of a decode step), full mode's prompts are longer than input-only's (its input stage
keeps more tokens: the budget is the layer average, counted independently here from the
schedule), and the per-layer timing (``--layers``) sees the stages' rows. The engines run with
prefix caching on (``--prefix-caching``, the server default): the first measured step still
computes every prompt token of both requests (the warm-up shares no block with them), so
every row count of that step is new to the engine's process: one per stage in full mode, one
otherwise. vLLM's own EVS runs beside them at the same budget (#14's peer).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.vllm]

MAX_TOKENS = 5


def _load():
    # imported by name from benchmarks/ (on sys.path, which spawned children inherit): the
    # benchmark runs each engine in a spawned process that unpickles ``_run`` by module name
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_profile

    return step_profile


@pytest.fixture(scope="module")
def report():
    sp = _load()
    args = sp.argparse.Namespace(configs=["input_only", "full", "evs"], budget=0.3,
                                 requests=2, max_tokens=MAX_TOKENS, frames="8", preset="tiny",
                                 rounds=1, kv_groups=None, layers=True, prefix_caching=True,
                                 new_shapes=False, timeout=900)
    return sp, sp.run(args)


def test_every_config_ran_one_step_per_token(report):
    _sp, rep = report
    assert [r["config"] for r in rep["rounds"]] == ["input_only", "full", "evs"]
    for r in rep["rounds"]:
        assert "error" not in r, r
        assert r["steps"] == MAX_TOKENS, r


def test_timed_parts_lie_inside_the_step(report):
    sp, rep = report
    for r in rep["rounds"]:
        for phase in ("first", "decode"):
            t = r[phase]
            missing = [n for n in sp.SCHED_FNS + sp.RUNNER_FNS if n not in t]
            assert not missing, (phase, missing)
            parts = sum(t[n] for n in sp.SCHED_FNS + sp.RUNNER_FNS)
            assert 0 < parts <= t["step"] * 1.001, (phase, parts, t["step"])
            assert t["_model_forward"] > 0.3 * t["step"], (phase, t)


def test_full_mode_prompts_are_the_input_stage_counts(report):
    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.schedule import build_schedule

    _sp, rep = report
    by = {r["config"]: r["prompt_tokens_mean"] for r in rep["rounds"]}
    assert by["full"] > by["input_only"]
    # the same clip in both: the difference is the input stage's kept visual tokens
    # (full: counts[0] of the layer-level schedule; input_only: round(b * N))
    t, hw = 8 // 2, (224 // 28) ** 2  # 8 frames, temporal patch 2; 224 px / 28 px patches
    n, layers = t * hw, 4  # the tiny preset's LLM has 4 layers
    full0 = build_schedule(HieraVidConfig(budget=0.3), n, layers, (t - 1) * hw).counts[0]
    only0 = build_schedule(HieraVidConfig(budget=0.3, mode="input_only"), n, layers,
                           (t - 1) * hw).counts[0]
    assert by["full"] - by["input_only"] == full0 - only0


def test_evs_prompts_keep_evs_token_count(report):
    """vLLM's EVS at rate q = 1 - b keeps max(tokens per frame, floor(N (1 - q))) of the
    clip's N video tokens (fixed by the processor from the grid; vLLM's documented count,
    written out here), so its prompts differ from input_only's (round(b N) by the schedule)
    by exactly the difference of the two counts, and from full mode's by its stage-0 count."""
    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.schedule import build_schedule

    _sp, rep = report
    by = {r["config"]: r["prompt_tokens_mean"] for r in rep["rounds"]}
    t, hw = 8 // 2, (224 // 28) ** 2
    n = t * hw
    evs = max(hw, int(n * (1.0 - round(1.0 - 0.3, 6))))
    assert evs < n
    for mode in ("input_only", "full"):
        kept = build_schedule(HieraVidConfig(budget=0.3, mode=mode), n, 4,
                              (t - 1) * hw).counts[0]
        assert by["evs"] - by[mode] == evs - kept, (mode, by, evs, kept)


def test_new_row_counts_are_one_per_stage(report):
    """The measured prompts (with prefix caching: a text part the earlier prompts lack) give
    the prefill step row counts no earlier step had: full mode one per stage (the tiny LLM's
    4 layers are 4 stages, each with fewer rows), input_only and EVS one; the rows recorded
    are the step's own (the first layer's is both prompts' length)."""
    sp, rep = report
    for r in rep["rounds"]:
        assert r["first_rows"][0] == round(2 * r["prompt_tokens_mean"]), r["first_rows"]
        want = 4 if r["config"] == "full" else 1
        assert len(set(r["first_rows"])) == want == r["new_row_counts"], r
    assert "input_only 1; full 4; evs 1" in sp.markdown(rep, "test machine")


def test_full_mode_leaves_the_stage_groups_to_its_plan(report):
    """Every step of the measured run has a video request in its batch, so in full mode
    (tiny preset: 4 layers, one stage and one KV cache group each) vLLM computes the slot
    mapping and attention metadata of group 0 only and the stage plan builds the other 3
    groups' metadata (without the skip: 4 slot mappings and 4 + 3 builds per step);
    input_only has one group."""
    sp, rep = report
    by = {r["config"]: r["per_step"] for r in rep["rounds"]}
    assert by["input_only"] == {"slot_mappings": 1.0, "metadata_builds": 1.0}, by
    assert by["evs"] == {"slot_mappings": 1.0, "metadata_builds": 1.0}, by
    assert by["full"] == {"slot_mappings": 1.0, "metadata_builds": 4.0}, by
    assert "full 1.00 / 4.00" in sp.markdown(rep, "test machine")


def test_layers_see_the_stage_rows(report):
    """--layers: one entry per decoder layer of the prefill step; input_only runs every layer
    on the whole step (both prompts), full mode starts there too and drops rows at each stage
    start, with one selection per boundary (the select_layer_stage calls timed inside it);
    attention + MLP fit inside their layer."""
    _sp, rep = report
    for r in rep["rounds"]:
        lay = r["layers"]
        rows = [n for n, _t in lay["layer"]]
        assert len(rows) == 4, rows  # the tiny preset's LLM
        assert rows[0] == round(2 * r["prompt_tokens_mean"]), (rows, r["prompt_tokens_mean"])
        for (n, t), (na, ta), (nm, tm) in zip(lay["layer"], lay["attention"], lay["mlp"]):
            assert n == na == nm and 0 < ta + tm <= t * 1.001, (n, t, ta, tm)
        if r["config"] != "full":
            assert len(set(rows)) == 1 and "selection" not in lay
        else:
            assert all(a > b for a, b in zip(rows, rows[1:])), rows  # stages at 0, 1, 2, 3
            assert len(lay["selection"]) == 3
            # the selections proper (one select_layer_stage_many for all videos) inside each boundary
            assert len(lay["selection_calls"]) == 3
            for (_n, outer), (_m, inner) in zip(lay["selection"], lay["selection_calls"]):
                assert 0 < inner <= outer, (inner, outer)


def test_timers_hold_hieravids_hooks_once():
    """The timers wrap HieraVid's runner hook (so _build_attention_metadata's time includes the
    per-stage plan), and HieraVid's plugin loading in the engine does not wrap it again."""
    from vllm.v1.worker import gpu_model_runner as rm

    from hieravid_vllm.patches import apply_all, is_wrapped
    from hieravid_vllm.plugin import register

    sp = _load()
    register()
    name = "_build_attention_metadata"
    saved = rm.GPUModelRunner.__dict__[name]
    try:
        sp._time_calls(rm.GPUModelRunner, name, lambda a, k, sec: None)
        timer = rm.GPUModelRunner.__dict__[name]
        assert timer is not saved and is_wrapped(timer)
        apply_all()  # what vLLM's plugin loading does in the engine process
        assert rm.GPUModelRunner.__dict__[name] is timer
    finally:
        setattr(rm.GPUModelRunner, name, saved)


def test_markdown_reports_both_phases(report):
    sp, rep = report
    md = sp.markdown(rep, "test machine")
    for cfg in ("input_only", "full", "evs"):
        assert f"| {cfg} | first |" in md and f"| {cfg} | decode |" in md
    for pair in ("full / input_only", "full / evs", "input_only / evs"):
        assert "| decode |" in md.split(pair)[1], pair
    assert "| all |" in md and "in-LLM selections per boundary" in md


def test_run_isolated_reports_a_child_that_died_without_a_result():
    """A child that cannot even unpickle its function (here: it lives in a module only the
    parent has) is an error at once, not a wait for the whole timeout."""
    import time
    import types

    from _common import run_isolated  # benchmarks/ (on sys.path through _load)

    _load()
    mod = types.ModuleType("hv_parent_only_module")

    def fn():
        return {"ok": True}

    fn.__module__ = mod.__name__
    fn.__qualname__ = "fn"
    mod.fn = fn
    sys.modules[mod.__name__] = mod
    try:
        t0 = time.monotonic()
        res = run_isolated(fn, timeout=300)
        took = time.monotonic() - t0
    finally:
        del sys.modules[mod.__name__]
    assert "error" in res and "exited with code" in res["error"], res
    assert took < 60, took
