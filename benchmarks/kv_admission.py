"""KV cache footprint and admission with and without HieraVid, side by side in one run.

With a fixed KV cache size (bytes), ``R`` identical-shape video requests (``--frames``-frame
clips) are submitted at once to vLLM's engine (in-process engine core, so the scheduler's
state can be read while it runs). Reported per configuration:

* ``blocks/request``: KV blocks a request holds right after its prefill, per KV cache group
  (full mode: one group per stage, each holding that stage's kept tokens; a block of one of
  S groups holds 1/S of the layers), and its memory relative to unpruned;
* ``peak running``: the most requests the scheduler ran at once (admission under the fixed
  KV cache), and its ratio to unpruned.

    python benchmarks/kv_admission.py [--arch qwen2_5_vl] [--frames 64] [--requests 24]
        [--kv-mb 5] [--budget 0.3] [--json out.json] [--results benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_isolated, write_section  # noqa: E402

MARK_BEGIN = "<!-- kv:begin -->"
MARK_END = "<!-- kv:end -->"


def measure(model: str, arch: str, video: str, hv: dict | None, requests: int, kv_bytes: int,
            block_size: int, fps: float, max_model_len: int = 1024,
            max_tokens: int = 8) -> dict:
    """Run in a fresh process: blocks per request after prefill and peak running requests."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
    from vllm import LLM, SamplingParams

    from hieravid_vllm.testing.video import video_data_url

    kw = dict(dtype="float32", max_model_len=max_model_len, enforce_eager=True,
              enable_prefix_caching=False, kv_cache_memory_bytes=kv_bytes,
              block_size=block_size, max_num_seqs=256, max_num_batched_tokens=65536,
              limit_mm_per_prompt={"video": 1},
              disable_log_stats=True)
    if arch != "llava_onevision":
        kw["media_io_kwargs"] = {"video": {"fps": fps}}
    if hv:
        kw["additional_config"] = {"hieravid": hv}
    llm = LLM(model, **kw)
    try:
        core = llm.llm_engine.engine_core.engine_core
        sched = core.scheduler
        managers = sched.kv_cache_manager.coordinator.single_type_managers
        msgs = [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_data_url(video)}},
            {"type": "text", "text": "Describe what happens in this video."}]}]
        state = {"peak": 0, "blocks": None, "stop": False, "groups": len(managers)}

        def sample():
            while not state["stop"]:
                running = list(sched.running)
                state["peak"] = max(state["peak"], len(running))
                for r in running:
                    if state["blocks"] is None and r.num_computed_tokens >= r.num_prompt_tokens:
                        state["blocks"] = [len(m.req_to_blocks.get(r.request_id, ()))
                                           for m in managers]
                        state["tokens"] = r.num_computed_tokens
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        outs = llm.chat([msgs] * requests, SamplingParams(max_tokens=max_tokens,
                                                          temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
        state["stop"] = True
        th.join()
        return {"prompt_tokens": len(outs[0].prompt_token_ids),
                "blocks_per_group": state["blocks"], "tokens_at_sample": state.get("tokens"),
                "blocks_per_request": sum(state["blocks"] or [0]),
                "groups": state["groups"], "peak_running": state["peak"],
                "num_blocks": sched.kv_cache_config.num_blocks,
                "completed": sum(1 for o in outs if o.outputs and o.outputs[0].token_ids)}
    finally:
        llm.llm_engine.engine_core.shutdown()


def run_config(*args, timeout: float = 900) -> dict:
    return run_isolated(measure, *args, timeout=timeout)


def run(args) -> dict:
    from hieravid_vllm.testing.models import build_tiny_model
    from hieravid_vllm.testing.video import write_scene_video

    model = args.model or str(build_tiny_model(args.arch, preset=args.preset))
    tmp = Path(tempfile.mkdtemp(prefix="hv-kv-"))
    vid = str(write_scene_video(tmp / "v.mp4", num_frames=args.frames, width=args.size,
                                height=args.size, fps=args.fps, num_scenes=4, seed=4).path)
    configs = [("unpruned", None), (f"hieravid {args.budget} full", {"budget": args.budget}),
               (f"hieravid {args.budget} input_only",
                {"budget": args.budget, "mode": "input_only"})]
    rows = []
    for name, hv in configs:
        r = run_config(model, args.arch, vid, hv, args.requests, int(args.kv_mb * 2**20),
                       args.block_size, args.fps, args.max_model_len)
        r["config"] = name
        rows.append(r)
        print(f"{name}: {r.get('peak_running', r.get('error'))}", file=sys.stderr, flush=True)
    base = rows[0]
    for r in rows:
        if "peak_running" in r and base.get("peak_running"):
            r["admission_ratio"] = r["peak_running"] / base["peak_running"]
            # bytes: a block of a group holds that group's layers only
            r["memory_ratio"] = (r["blocks_per_request"] / r["groups"]) / \
                (base["blocks_per_request"] / base["groups"])
    return {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "model": args.model or f"tiny {args.arch} preset={args.preset}",
            "frames": args.frames, "size": args.size, "kv_mb": args.kv_mb,
            "block_size": args.block_size, "requests": args.requests, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"KV cache of a fixed {res['kv_mb']} MiB (blocks of {res['block_size']} tokens), "
             f"{res['requests']} concurrent {res['frames']}-frame "
             f"{res['size']}px video requests, {res['model']}, machine: {res['machine']}.", "",
             "| config | prompt tokens | KV groups | blocks/request after prefill "
             "(per group) | memory vs unpruned | peak running | admission vs unpruned |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | | | |")
            continue
        # a block of one group holds 1/groups of the layers of a single-group block
        mem = r.get("memory_ratio", float("nan"))
        lines.append(f"| {r['config']} | {r['prompt_tokens']} | {r['groups']} | "
                     f"{r['blocks_per_request']} ({r['blocks_per_group']}) | "
                     f"{mem:.2f} | {r['peak_running']} | "
                     f"{r.get('admission_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    write_section(path, MARK_BEGIN, MARK_END,
                  "KV cache footprint and admission (in-LLM stages)", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--kv-mb", type=float, default=5.0, help="KV cache size (MiB)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    res = run(args)
    md = markdown(res)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.results:
        write_results(Path(args.results), md)
    return 0 if all("error" not in r for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
