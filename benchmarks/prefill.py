"""LLM prefill time with and without HieraVid, side by side in one run (vLLM offline engine).

Each configuration runs in its own process (one vLLM engine at a time): unpruned, and
HieraVid at the given budgets in full mode (in-LLM stages) and input-only mode. For every
video the first request encodes it (vision tower + input stage, then cached by vLLM's
encoder cache); the following requests with prefix caching off time the LLM prefill of the
whole prompt (+ one sampled token): ``prefill_ms`` is their median. The KV blocks a request
needs are reported from the schedule (sum over stages of kept tokens, what per-stage KV
groups would hold) next to what the single block table holds today.

    python benchmarks/prefill.py [--arch qwen2_5_vl] [--preset bench] [--frames 64]
        [--budgets 0.3,0.2,0.1] [--reps 5] [--json out.json] [--results benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_isolated, write_section  # noqa: E402

MARK_BEGIN = "<!-- prefill:begin -->"
MARK_END = "<!-- prefill:end -->"


def _run_config(model: str, arch: str, video: str, hv: dict | None, reps: int,
                fps: float, max_len: int) -> dict:
    llm = None
    try:
        from vllm import LLM, SamplingParams

        from hieravid_vllm.testing.server import kv_cache_bytes
        from hieravid_vllm.testing.video import video_data_url

        # KV in bytes (one prompt of max_len, twice over), never a share of the machine
        kw = dict(dtype="float32", max_model_len=max_len,
                  kv_cache_memory_bytes=kv_cache_bytes(model, 2 * max_len),
                  enforce_eager=True, enable_prefix_caching=False,
                  max_num_batched_tokens=max_len, limit_mm_per_prompt={"video": 1},
                  disable_log_stats=True)
        if arch != "llava_onevision":
            kw["media_io_kwargs"] = {"video": {"fps": fps}}
        if hv:
            kw["additional_config"] = {"hieravid": hv}
        llm = LLM(model, **kw)
        msgs = [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_data_url(video)}},
            {"type": "text", "text": "Describe what happens in this video."}]}]
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        t0 = time.perf_counter()
        out = llm.chat(msgs, sp, use_tqdm=False)
        cold = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            llm.chat(msgs, sp, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        return {"prompt_tokens": len(out[0].prompt_token_ids), "cold_ms": cold * 1e3,
                "prefill_ms": statistics.median(times) * 1e3,
                "prefill_min_ms": min(times) * 1e3}
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def run(args) -> dict:
    from hieravid_vllm.core import HieraVidConfig
    from hieravid_vllm.testing.models import build_tiny_model
    from hieravid_vllm.testing.video import write_scene_video

    model = args.model or str(build_tiny_model(args.arch, preset=args.preset))
    tmp = Path(tempfile.mkdtemp(prefix="hv-prefill-"))
    vid = write_scene_video(tmp / "v.mp4", num_frames=args.frames, width=args.size,
                            height=args.size, fps=args.fps, num_scenes=4, seed=3).path
    configs = [("unpruned", None)]
    for b in args.budgets:
        configs.append((f"hieravid {b} full", {"budget": b}))
        configs.append((f"hieravid {b} input_only", {"budget": b, "mode": "input_only"}))
    rows = []
    for name, hv in configs:
        res = run_isolated(_run_config, model, args.arch, str(vid), hv, args.reps, args.fps,
                           args.max_len, timeout=args.timeout)
        res["config"] = name
        if hv:
            cfg = HieraVidConfig.coerce(hv)
            res["budget"] = cfg.budget
            res["mode"] = cfg.mode
        rows.append(res)
        print(f"{name}: {res.get('prefill_ms', res.get('error'))}", file=sys.stderr, flush=True)
    base = rows[0].get("prefill_ms")
    for r in rows:
        if base and "prefill_ms" in r:
            r["ratio"] = r["prefill_ms"] / base
    return {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "model": f"tiny {args.arch} preset={args.preset}" if not args.model else args.model,
            "frames": args.frames, "size": args.size, "reps": args.reps, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"LLM prefill, {res['model']}, {res['frames']}-frame {res['size']}px clip, "
             f"median of {res['reps']} warm requests (video encoder output cached, prefix "
             f"cache off), machine: {res['machine']}.", "",
             "| config | prompt tokens | prefill ms | ratio to unpruned | cold first request ms |",
             "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['config']} | {r['prompt_tokens']} | {r['prefill_ms']:.1f} | "
                     f"{r.get('ratio', float('nan')):.2f} | {r['cold_ms']:.0f} |")
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    write_section(path, MARK_BEGIN, MARK_END, "LLM prefill (in-LLM stages)", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--model", default=None, help="checkpoint path (default: tiny model)")
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--budgets", default="0.3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results", default=None, help="write the table into this markdown file")
    args = ap.parse_args(argv)
    args.budgets = [float(b) for b in str(args.budgets).split(",") if b]
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
