"""HieraVid demo: serve a video model with vLLM's OpenAI server and ask it about a video.

    python -m hieravid_vllm.demo                      # tiny random Qwen2.5-VL + sample video
    python -m hieravid_vllm.demo --arch llava_onevision
    python -m hieravid_vllm.demo --model /models/Qwen2.5-VL-7B-Instruct --video clip.mp4

Without ``--model`` it builds a tiny random-weight model (cached) and a synthetic multi-scene
mp4, so it runs anywhere with nothing downloaded; the answer is then meaningless text from
random weights, but it comes from a real vLLM server through the official ``openai``
client. With ``--model`` it serves that checkpoint instead (on a GPU node: dtype ``auto``,
CUDA graphs on). For every entry of :data:`SERVER_CONFIGS` it starts
``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the ``hieravid`` plugin is an
installed ``vllm.general_plugins`` entry point, so vLLM loads it in every process), sends the
same streamed video chat request, records the answer, prompt tokens and time to first token,
stops the server, and finally prints the runs side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class ServerConfig:
    """One server run of the demo: a name and the extra vLLM CLI flags / env it needs."""

    name: str
    extra_args: Sequence[str] = ()
    env: dict = field(default_factory=dict)
    description: str = ""


# =========================================================================================
# SERVER CONFIGURATIONS compared side by side (one server each, started one after another).
# The summary shows their prompt-token counts side by side.
SERVER_CONFIGS: list[ServerConfig] = [
    ServerConfig("unpruned", (), description="plain vLLM, every video token kept"),
    ServerConfig("hieravid", ("--hieravid-budget", "0.3"),
                 description="HieraVid at a 30% relative token budget"),
]
# =========================================================================================

DEFAULT_QUESTION = "Describe what happens in this video."


@dataclass
class RunResult:
    config: ServerConfig
    ok: bool
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answer: str = ""
    ttft_s: float | None = None
    total_s: float | None = None
    startup_s: float | None = None
    error: str = ""
    log_path: str = ""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hieravid_vllm.demo",
        description="Serve a video LLM with vLLM (HieraVid plugin installed) and ask about a "
                    "video through the OpenAI API.")
    p.add_argument("--model", help="checkpoint directory or hub id to serve (default: build a "
                                   "tiny random-weight model)")
    p.add_argument("--arch", default="qwen2_5_vl",
                   choices=["qwen2_vl", "qwen2_5_vl", "llava_onevision"],
                   help="tiny model architecture when no --model is given (default %(default)s)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "bench", "bench_large"],
                   help="tiny model size preset (default %(default)s)")
    p.add_argument("--video", help="video file, http(s) URL or data: URL (default: a "
                                   "synthetic multi-scene mp4)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--fps", type=float, default=None,
                   help="frames per second vLLM samples from the video (default: every frame "
                        "of the sample video; vLLM's default for other videos)")
    p.add_argument("--frames", type=int, default=32, help="sample video length (frames)")
    p.add_argument("--size", type=int, default=336, help="sample video width = height (px)")
    p.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM memory fraction (on CPU: of host memory, for the KV cache)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra argument passed to every vLLM server (repeatable; use "
                        "--vllm-arg=--flag for dashes)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these server configurations "
                        f"(of: {', '.join(c.name for c in SERVER_CONFIGS)})")
    p.add_argument("--log-dir", default=None, help="where server logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    return p.parse_args(argv)


def _video_url(video: str, allowed: list[Path]) -> str:
    if video.startswith(("http://", "https://", "data:", "file://")):
        if video.startswith("file://"):
            allowed.append(Path(video[len("file://"):]).parent)
        return video
    path = Path(video).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"--video: no such file: {path}")
    allowed.append(path.parent)
    return path.as_uri()


def _stream_chat(server, video_url: str, question: str, max_tokens: int) -> RunResult:
    client = server.client()
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url}},
        {"type": "text", "text": question},
    ]}]
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content or ""
            if text and ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(text)
    total = time.perf_counter() - t0
    return RunResult(config=None, ok=True, prompt_tokens=usage.prompt_tokens if usage else None,
                     completion_tokens=usage.completion_tokens if usage else None,
                     answer="".join(parts), ttft_s=ttft, total_s=total)


def _reference_line(model: str, clip, question: str) -> str | None:
    """Unpruned token count from transformers' processor for the sample clip (vLLM samples
    every frame of it: written at the server's fps, <= 32 frames, even count)."""
    if clip.num_frames > 32 or clip.num_frames % 2:
        return None
    try:
        from hieravid_vllm.testing.hf_reference import hf_video_prompt
        from hieravid_vllm.testing.video import read_video_frames

        ref = hf_video_prompt(model, read_video_frames(clip.path), question)
    except Exception as exc:  # informative only
        return f"(transformers reference unavailable: {exc})"
    return (f"transformers' processor makes {ref.prompt_tokens} prompt tokens unpruned "
            f"({ref.video_tokens} video + {ref.text_tokens} text)")


def _plugin_status() -> str:
    from importlib.metadata import entry_points

    names = [e.name for e in entry_points(group="vllm.general_plugins")]
    if "hieravid" in names:
        return "hieravid (vllm.general_plugins entry point; vLLM loads it in every process)"
    return "NOT INSTALLED (pip install -e . registers the 'hieravid' entry point)"


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _print_summary(results: list[RunResult]) -> None:
    base = next((r.prompt_tokens for r in results if r.ok and r.prompt_tokens), None)
    print("\n=== Summary " + "=" * 68)
    header = f"{'config':<12} {'prompt tokens':>13} {'vs first':>9} {'TTFT':>9} " \
             f"{'total':>9}  answer"
    print(header)
    print("-" * len(header))
    for r in results:
        if not r.ok:
            print(f"{r.config.name:<12} {'FAILED':>13}  {r.error.splitlines()[0][:60]}")
            continue
        rel = "-" if not base or r.prompt_tokens is None else f"{r.prompt_tokens / base:.0%}"
        answer = r.answer.replace("\n", " ")
        answer = answer if len(answer) <= 40 else answer[:37] + "..."
        print(f"{r.config.name:<12} {r.prompt_tokens!s:>13} {rel:>9} {_fmt_s(r.ttft_s):>9} "
              f"{_fmt_s(r.total_s):>9}  {answer!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    configs = [c for c in SERVER_CONFIGS if not args.only or c.name in args.only]
    if not configs:
        raise SystemExit(f"--only matched no configuration of "
                         f"{[c.name for c in SERVER_CONFIGS]}")
    if not args.model:  # everything is local: never reach for a model hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hieravid_vllm.testing.server import VLLMServer

    work = Path(tempfile.mkdtemp(prefix="hieravid-demo-"))
    log_dir = Path(args.log_dir) if args.log_dir else work
    allowed: list[Path] = []
    fps = args.fps

    print("=== HieraVid demo " + "=" * 62)
    if args.model:
        model = args.model
        print(f"model        : {model}")
        max_model_len = args.max_model_len  # let vLLM use the checkpoint's own limit
    else:
        from hieravid_vllm.testing.models import build_tiny_model, model_info

        t0 = time.perf_counter()
        model = str(build_tiny_model(args.arch, preset=args.preset))
        info = model_info(model)
        lm = info["spec"]["lm"]
        print(f"model        : tiny random-weight {info['architecture']} ({args.preset}: LM "
              f"hidden {lm['hidden_size']} x {lm['num_hidden_layers']} layers, "
              f"{info['num_parameters'] / 1e6:.1f} M params; ready in "
              f"{time.perf_counter() - t0:.1f} s)")
        print(f"               {model}")
        max_model_len = args.max_model_len or 16384

    if args.video:
        video_url = _video_url(args.video, allowed)
        print(f"video        : {args.video}")
    else:
        from hieravid_vllm.testing.video import write_scene_video

        sample_fps = fps or 8.0
        clip = write_scene_video(work / "sample_scenes.mp4", num_frames=args.frames,
                                 width=args.size, height=args.size, fps=sample_fps,
                                 num_scenes=4, seed=0)
        fps = sample_fps  # sample exactly the frames that were written
        video_url = _video_url(str(clip.path), allowed)
        print(f"video        : synthetic {clip.num_frames} frames {clip.width}x{clip.height} "
              f"@ {clip.fps:g} fps, {len(clip.scenes)} scenes (cuts at frames "
              f"{', '.join(map(str, clip.boundaries))}); {clip.path}")
        if not args.model:
            reference = _reference_line(model, clip, args.question)
            if reference:
                print(f"reference    : {reference}")
    print(f"frame rate   : {'%g fps' % fps if fps else 'vLLM default'} "
          f"(--media-io-kwargs video.fps)")
    print(f"plugin       : {_plugin_status()}")
    print(f"question     : {args.question!r}  (max_tokens={args.max_tokens}, greedy)")

    results: list[RunResult] = []
    for cfg in configs:
        print(f"\n--- [{cfg.name}] {cfg.description}")
        server = VLLMServer(
            model, extra_args=[*cfg.extra_args, *args.vllm_arg], port=args.port,
            video_fps=fps, allowed_local_media_path=allowed[0] if allowed else None,
            max_model_len=max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
            env=cfg.env, log_path=log_dir / f"vllm-{cfg.name}.log",
            startup_timeout=args.startup_timeout)
        print(f"$ {shlex.join(server.command)}")
        print(f"  log: {server.log_path}")
        try:
            t0 = time.perf_counter()
            with server:
                print(f"  server ready on {server.url} after {time.perf_counter() - t0:.1f} s")
                res = _stream_chat(server, video_url, args.question, args.max_tokens)
                res.startup_s = server.startup_seconds
            print("  server stopped")
        except Exception as exc:  # report (log tail included) and go on with the next config
            res = RunResult(config=cfg, ok=False, error=f"{type(exc).__name__}: {exc}")
            print(f"  FAILED: {res.error}", file=sys.stderr)
        res.config, res.log_path = cfg, str(server.log_path)
        if res.ok:
            print(f"  200 OK: prompt_tokens={res.prompt_tokens} "
                  f"completion_tokens={res.completion_tokens} TTFT={_fmt_s(res.ttft_s)} "
                  f"total={_fmt_s(res.total_s)}")
            print(f"  answer: {res.answer!r}")
        results.append(res)

    _print_summary(results)
    if args.json:
        print(json.dumps([{
            "config": r.config.name, "ok": r.ok, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "answer": r.answer, "ttft_s": r.ttft_s,
            "total_s": r.total_s, "startup_s": r.startup_s, "error": r.error,
            "log": r.log_path} for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
