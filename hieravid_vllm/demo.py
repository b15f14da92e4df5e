"""HieraVid demo: serve a video model with vLLM's OpenAI server, unpruned and with HieraVid,
and show side by side what pruning buys.

    python -m hieravid_vllm.demo                      # tiny random Qwen2.5-VL + sample clips
    python -m hieravid_vllm.demo --arch llava_onevision
    python -m hieravid_vllm.demo --model /models/Qwen2.5-VL-7B-Instruct --video clip.mp4

Without ``--model`` it builds a tiny random-weight model whose language model dominates the
cost as in real VideoLLMs (the ``bench`` preset: LM hidden 512 x 8 layers, small vision
tower; cached) and synthetic multi-scene mp4s (64 frames of 224x224 at 8 fps, every frame
sampled: 2048 video tokens), so it runs anywhere with nothing downloaded; answers are
meaningless text from random weights, but they come from a real vLLM server through the
official ``openai`` client. With ``--model`` it serves that checkpoint instead (on a GPU
node: dtype ``auto``, CUDA graphs on).

For every entry of :data:`SERVER_CONFIGS` it starts
``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the ``hieravid`` plugin is an
installed ``vllm.general_plugins`` entry point, so vLLM loads it in every process), sends
``--warmup`` warm-up requests and then ``--requests`` measured ones, one after another
(streamed, ``ignore_eos``), stops the server, and finally prints the configurations side by
side (medians over the measured requests):

* prompt tokens entering the LLM, and the visual tokens every LLM stage sees with their
  layer average, from the core schedule (:func:`hieravid_vllm.core.schedule.build_schedule`
  on the clip's grid; for a ``--model`` checkpoint on the video-token count the server
  reports in ``hieravid_visual_tokens_before_total``), cross-checked against the served
  prompt lengths (HieraVid prompt = unpruned prompt - video tokens + stage-1 count);
* the KV cache a request holds right after prefill (``vllm:kv_cache_usage_perc`` scraped
  from ``/metrics`` after the first streamed token, while the request is still decoding,
  times the KV cache the server was given). Compared in bytes: in full mode every LLM stage
  has its own KV cache group, so one block covers fewer layers than an unpruned block;
* time to first token (client side) and prefill time (``vllm:request_prefill_time_seconds``,
  from scheduling to the first token in the engine), with ratios to the first configuration.

Every request gets its own clip (same size, another seed; both servers get the same clips
in the same order) and prefix caching and the processor cache are off, so no request is
served from vLLM's prefix, encoder or processor caches. A ``--video`` may be given several
times; with fewer videos than requests they repeat (then vLLM's encoder cache may serve the
repeats, on both servers alike).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hieravid_vllm.testing.server import _cuda_available, parse_metrics


@dataclass(frozen=True)
class ServerConfig:
    """One server run of the demo: a name and the extra vLLM CLI flags / env it needs."""

    name: str
    extra_args: Sequence[str] = ()
    env: dict = field(default_factory=dict)
    description: str = ""


# =========================================================================================
# SERVER CONFIGURATIONS compared side by side (one server each, started one after another).
# The first is the baseline of every ratio in the summary.
SERVER_CONFIGS: list[ServerConfig] = [
    ServerConfig("unpruned", (), description="plain vLLM, every video token kept"),
    ServerConfig("hieravid", ("--hieravid-budget", "0.3"),
                 description="HieraVid at a 30% relative token budget"),
]
# =========================================================================================

DEFAULT_QUESTION = "Describe what happens in this video."
#: vLLM flags every demo server gets, so that no request is served from a cache
NO_CACHE_ARGS = ("--no-enable-prefix-caching", "--mm-processor-cache-gb", "0")
MiB = 1024 * 1024


@dataclass
class RequestResult:
    """One streamed request and what ``/metrics`` said about it."""

    clip: int                              # index into the demo's video list
    ok: bool = False
    warmup: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answer: str = ""
    ttft_s: float | None = None         # client side, to the first generated token
    total_s: float | None = None
    prefill_s: float | None = None      # delta of vllm:request_prefill_time_seconds_sum
    kv_usage: float | None = None       # vllm:kv_cache_usage_perc after the first token
    kv_blocks: int | None = None        # blocks held then
    kv_bytes: int | None = None         # bytes held then
    visual_tokens: int | None = None    # hieravid_visual_tokens_before_total delta
    visual_tokens_kept: int | None = None  # hieravid_visual_tokens_after_total delta
    prune_s: float | None = None        # hieravid_prune_seconds_sum delta (worker)
    error: str = ""


@dataclass
class RunResult:
    """One server configuration: its requests and the KV cache it was given."""

    config: ServerConfig
    ok: bool = False
    requests: list = field(default_factory=list)   # measured RequestResults
    warmups: list = field(default_factory=list)    # warm-up RequestResults
    startup_s: float | None = None
    kv_cache_bytes: int | None = None
    kv_cache_bytes_source: str = ""
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    hieravid: object | None = None              # the HieraVidConfig the server ran
    schedule: object | None = None              # StageSchedule of the first measured clip
    error: str = ""
    log_path: str = ""

    def median(self, attr: str) -> float | None:
        vals = [getattr(r, attr) for r in self.requests if r.ok and getattr(r, attr) is not None]
        return statistics.median(vals) if vals else None

    @property
    def first(self) -> RequestResult | None:
        return next((r for r in self.requests if r.ok), None)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hieravid_vllm.demo",
        description="Serve a video LLM with vLLM (HieraVid plugin installed), unpruned and "
                    "with HieraVid, send the same video requests to both through the OpenAI "
                    "API and print prompt tokens, visual tokens per LLM stage, KV cache held, "
                    "TTFT and prefill time side by side.")
    p.add_argument("--model", help="checkpoint directory or hub id to serve (default: build a "
                                   "tiny random-weight model)")
    p.add_argument("--arch", default="qwen2_5_vl",
                   choices=["qwen2_vl", "qwen2_5_vl", "llava_onevision"],
                   help="tiny model architecture when no --model is given (default %(default)s)")
    p.add_argument("--preset", default="bench", choices=["tiny", "bench", "bench_large"],
                   help="tiny model size preset (default %(default)s: LM hidden 512 x 8 layers, "
                        "the LM dominates the cost as in real VideoLLMs)")
    p.add_argument("--video", action="append", default=[], metavar="VIDEO",
                   help="video file, http(s) URL or data: URL (repeatable: requests cycle "
                        "over the videos; default: one synthetic multi-scene mp4 per request)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--requests", type=int, default=5,
                   help="measured requests per configuration (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up requests per configuration, not measured (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens generated per request (ignore_eos; default %(default)s)")
    p.add_argument("--fps", type=float, default=None,
                   help="frames per second vLLM samples from the video (default: every frame "
                        "of the sample video; vLLM's default for other videos)")
    p.add_argument("--frames", type=int, default=64, help="sample video length (frames)")
    p.add_argument("--size", type=int, default=224, help="sample video width = height (px)")
    p.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's per-step token budget; HieraVid's full mode needs a video and "
                        "its question in one step (default: max(max-model-len, 8192) for the "
                        "tiny model, 32768 for --model)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size in bytes (default on CPU: room for 4 prompts of "
                        "max-num-batched-tokens tokens; on CUDA: vLLM's memory share)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM memory fraction (CUDA only; on CPU size the KV cache with "
                        "--kv-cache-memory-bytes)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra argument passed to every vLLM server (repeatable; use "
                        "--vllm-arg=--flag for dashes)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these server configurations "
                        f"(of: {', '.join(c.name for c in SERVER_CONFIGS)})")
    p.add_argument("--log-dir", default=None, help="where server logs go (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        p.error("--requests must be >= 1 and --warmup >= 0")
    if args.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (the KV cache is read while the request decodes)")
    return args


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


# -----------------------------------------------------------------------------------------
# what the schedule says
# -----------------------------------------------------------------------------------------
def hieravid_config(server_args: Sequence[str]):
    """The :class:`~hieravid_vllm.core.config.HieraVidConfig` a server started with these
    vLLM flags runs (``--hieravid-budget/-mode/-config``), or None when HieraVid is off."""
    from hieravid_vllm.options import ServingOptions, add_cli_args, options_from_cli

    parser = argparse.ArgumentParser(add_help=False)
    add_cli_args(parser)
    known, _ = parser.parse_known_args(list(server_args))
    opts = options_from_cli(known)
    return None if opts is None else ServingOptions.from_dict(opts).config


def num_llm_layers(model: str | os.PathLike) -> int | None:
    """LLM depth from the checkpoint's ``config.json`` (``text_config.num_hidden_layers`` or
    ``num_hidden_layers``); None when it cannot be read here (e.g. a hub id)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") or {}
    n = text.get("num_hidden_layers", cfg.get("num_hidden_layers"))
    return int(n) if n else None


def clip_grid(arch: str, num_frames: int, width: int, height: int,
              llava_tokens_per_frame: int | None = None) -> tuple[int | None, int | None]:
    """``(T, tokens per frame)`` of the visual tokens HieraVid sees for a clip whose every
    frame is sampled: Qwen2-VL family T = ceil(frames / 2) temporal patches of
    (H/28) x (W/28) tokens (sizes that are multiples of 28, which the processor keeps);
    LLaVA-OneVision: T unknown here (vLLM's generic loader caps the frame count), tokens per
    frame from the model. None where unknown."""
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        if width % 28 or height % 28:
            return None, None
        return (num_frames + 1) // 2, (height // 28) * (width // 28)
    return None, llava_tokens_per_frame


def schedule_for(config, num_visual: int, num_layers: int, frames: int | None = None):
    """:func:`~hieravid_vllm.core.schedule.build_schedule` for one video: ``max_merge`` =
    (T - 1) x tokens per frame when the grid's T is known, else uncapped."""
    from hieravid_vllm.core.schedule import build_schedule

    max_merge = None
    if frames:
        max_merge = (frames - 1) * (num_visual // frames)
    return build_schedule(config, num_visual, num_layers, max_merge=max_merge)


# -----------------------------------------------------------------------------------------
# /metrics
# -----------------------------------------------------------------------------------------
_PREFILL = "vllm:request_prefill_time_seconds"
_COUNTERS = (f"{_PREFILL}_sum", f"{_PREFILL}_count", "hieravid_visual_tokens_before_total",
             "hieravid_visual_tokens_after_total", "hieravid_prune_seconds_sum")


def cache_config_labels(text: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (``num_gpu_blocks``, ``block_size``, ...)."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    return {}


def _log_kv_bytes(log_path: Path) -> int | None:
    """KV cache bytes from vLLM's GPU worker log line (``Available KV cache memory: X GiB``)."""
    try:
        m = re.search(r"Available KV cache memory: ([\d.]+) GiB", log_path.read_text(
            errors="replace"))
    except OSError:
        return None
    return int(float(m.group(1)) * 1024 ** 3) if m else None


# -----------------------------------------------------------------------------------------
# requests
# -----------------------------------------------------------------------------------------
def _stream_request(server, video_url: str, question: str, max_tokens: int,
                    run: RunResult, res: RequestResult) -> RequestResult:
    """Send one streamed video chat request and fill ``res`` (raises on failure).

    ``/metrics`` is read before the request, right after the first generated token (the
    request is still decoding: its prompt's KV cache is held) and once the engine has
    recorded the request's prefill time."""
    before = parse_metrics(server.metrics_text(), _COUNTERS)
    client = server.client(max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url}},
        {"type": "text", "text": question},
    ]}]
    t0 = time.perf_counter()
    parts: list[str] = []
    usage = None
    kv_text = None
    stream = client.chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True})
    try:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            text = "".join(c.delta.content or "" for c in chunk.choices if c.delta is not None)
            parts.append(text)
            generated = text or (usage is not None and (usage.completion_tokens or 0) > 0)
            if generated and res.ttft_s is None:
                res.ttft_s = time.perf_counter() - t0
                kv_text = server.metrics_text()
    finally:
        stream.close()
    res.total_s = time.perf_counter() - t0
    if usage is None or res.ttft_s is None:
        raise RuntimeError("the stream carried no usage or no generated token")
    res.prompt_tokens, res.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    res.answer = "".join(parts)
    # KV held after prefill (the request is still running when kv_text was read)
    gauges = parse_metrics(kv_text, ("vllm:kv_cache_usage_perc", "vllm:num_requests_running"))
    if gauges.get("vllm:num_requests_running", 0) >= 1 and "vllm:kv_cache_usage_perc" in gauges:
        res.kv_usage = gauges["vllm:kv_cache_usage_perc"]
        if run.num_gpu_blocks:  # usage = used / (blocks - 1): vLLM's null block excluded
            res.kv_blocks = round(res.kv_usage * (run.num_gpu_blocks - 1))
            if run.kv_cache_bytes:
                res.kv_bytes = round(res.kv_blocks * run.kv_cache_bytes / run.num_gpu_blocks)
    # the engine records the prefill time when the request finishes: wait for it
    deadline = time.monotonic() + 10.0
    while True:
        after = parse_metrics(server.metrics_text(), _COUNTERS)
        count = f"{_PREFILL}_count"
        if after.get(count, 0) > before.get(count, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    if delta.get(f"{_PREFILL}_count", 0) == 1:
        res.prefill_s = delta[f"{_PREFILL}_sum"]
    if "hieravid_visual_tokens_before_total" in delta:
        res.visual_tokens = round(delta["hieravid_visual_tokens_before_total"])
        res.visual_tokens_kept = round(delta["hieravid_visual_tokens_after_total"])
    if "hieravid_prune_seconds_sum" in delta:
        res.prune_s = delta["hieravid_prune_seconds_sum"]
    res.ok = True
    return res


def _reference_line(model: str, arch: str, clip, question: str) -> str | None:
    """Unpruned token count from transformers' processor for a sample clip (vLLM samples
    every frame of it: written at the server's fps, even count; the generic loader that
    LLaVA-OneVision uses takes at most 32 frames)."""
    if clip.num_frames % 2 or (arch == "llava_onevision" and clip.num_frames > 32):
        return None
    try:
        from hieravid_vllm.testing.hf_reference import hf_video_prompt
        from hieravid_vllm.testing.video import read_video_frames

        ref = hf_video_prompt(model, read_video_frames(clip.path), question)
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"(transformers reference unavailable: {exc})"
    return (f"transformers' processor makes {ref.prompt_tokens} prompt tokens unpruned "
            f"({ref.video_tokens} video + {ref.text_tokens} text)")


def _plugin_status() -> str:
    from importlib.metadata import entry_points

    names = [e.name for e in entry_points(group="vllm.general_plugins")]
    if "hieravid" in names:
        return "hieravid (vllm.general_plugins entry point; vLLM loads it in every process)"
    return "NOT INSTALLED (pip install -e . registers the 'hieravid' entry point)"


# -----------------------------------------------------------------------------------------
# report
# -----------------------------------------------------------------------------------------
def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:.2f} MiB"


def _fmt_bytes(x: float) -> str:
    return _fmt_mib(x) if x >= MiB else f"{x / 1024:.0f} KiB"


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def _config_stats(run: RunResult, num_visual: int | None, num_layers: int | None) -> dict:
    """Per-config numbers for the table and the JSON."""
    sched = run.schedule
    out = {"prompt_tokens": run.first.prompt_tokens if run.first else None,
           "ttft_median_s": run.median("ttft_s"), "prefill_median_s": run.median("prefill_s"),
           "kv_bytes_median": run.median("kv_bytes"), "kv_blocks_median": run.median("kv_blocks"),
           "total_median_s": run.median("total_s"), "prune_median_s": run.median("prune_s"),
           "visual_tokens": num_visual}
    if num_visual is not None and num_layers:
        if sched is not None:
            out["stage_counts"] = list(sched.counts)
            out["layers_per_stage"] = list(sched.layers_per_stage)
            out["tokens_per_layer"] = sched.tokens_per_layer()
            out["layer_mean_share"] = sched.layer_mean_share()
        else:  # unpruned: every layer sees every video token
            out["tokens_per_layer"] = [num_visual] * num_layers
            out["layer_mean_share"] = 1.0
    out["layer_mean_tokens"] = (statistics.fmean(out["tokens_per_layer"])
                                if out.get("tokens_per_layer") else None)
    return out


def _print_summary(results: list[RunResult], stats: list[dict], num_layers: int | None,
                   checks: list[tuple[str, bool]], notes: list[str]) -> None:
    """The side-by-side table: one column per configuration, then each configuration's
    ratio to the first."""
    ok = [(r, s) for r, s in zip(results, stats) if r.ok]
    n_req = max((len(r.requests) for r, _ in ok), default=0)
    print(f"\n=== Summary: {' vs '.join(r.config.name for r in results)} "
          f"(medians of {n_req} measured request{'s' if n_req != 1 else ''} each) " + "=" * 10)
    for r in results:
        if not r.ok:
            print(f"{r.config.name}: FAILED  {r.error.splitlines()[0][:100] if r.error else ''}")
    if not ok:
        return
    names = [r.config.name for r, _ in ok]
    ratio_names = [f"{n}/{names[0]}" for n in names[1:]]
    rows: list[tuple[str, list[str], list[str]]] = []

    def add(label: str, values: list, fmt=None, ratio: bool = True) -> None:
        fmt = fmt or (lambda v: "-" if v is None else f"{v:g}" if isinstance(v, float)
                      else str(v))
        rats = [] if not ratio else [
            "-" if _ratio(v, values[0]) is None else f"{_ratio(v, values[0]):.2f}"
            for v in values[1:]]
        rows.append((label, [fmt(v) for v in values], rats))

    add("prompt tokens entering the LLM", [s["prompt_tokens"] for _, s in ok])
    n_vis = ok[0][1]["visual_tokens"]
    if n_vis and num_layers and all(s.get("tokens_per_layer") for _, s in ok):
        add("  of them video tokens", [s["stage_counts"][0] if s.get("stage_counts")
                                        else s["visual_tokens"] for _, s in ok])
        ref = next((s for _, s in ok if s.get("stage_counts")), None)
        rows.append((f"video tokens per LLM stage (of {n_vis})", [], []))
        first = 0
        for i, lp in enumerate(ref["layers_per_stage"] if ref else [num_layers]):
            vals = [s["tokens_per_layer"][first] for _, s in ok]
            layers = f"layer {first}" if lp == 1 else f"layers {first}-{first + lp - 1}"
            add(f"  stage {i + 1} ({layers})", vals,
                lambda v: f"{v} ({v / n_vis:.0%})")
            first += lp
        add(f"  layer average ({num_layers} layers)", [s["layer_mean_tokens"] for _, s in ok],
            lambda v: f"{v:.1f} ({v / n_vis:.1%})")
    add("KV cache held after prefill", [s["kv_bytes_median"] for _, s in ok], _fmt_mib)
    rows.append(("  blocks x block size", [
        f"{s['kv_blocks_median']:g} x {_fmt_bytes(r.kv_cache_bytes / r.num_gpu_blocks)}"
        if s["kv_blocks_median"] is not None and r.kv_cache_bytes and r.num_gpu_blocks
        else "-" for r, s in ok], []))
    add("TTFT (client, streamed)", [s["ttft_median_s"] for _, s in ok], _fmt_s)
    add("prefill time (engine)", [s["prefill_median_s"] for _, s in ok], _fmt_s)
    if any(s["prune_median_s"] is not None for _, s in ok):
        add("  of it HieraVid input-stage pruning", [s["prune_median_s"] for _, s in ok],
            lambda v: "-" if v is None else f"{v * 1e3:.1f} ms", ratio=False)
    add("request total (incl. decoding)", [s["total_median_s"] for _, s in ok], _fmt_s)

    w0 = max(len(label) for label, _, _ in rows) + 2
    w = max([len(n) for n in names + ratio_names] +
            [len(c) for _, cells, rats in rows for c in cells + rats]) + 2
    header = f"{'':<{w0}}" + "".join(f"{n:>{w}}" for n in names + ratio_names)
    print(header)
    print("-" * len(header))
    for label, cells, rats in rows:
        print((f"{label:<{w0}}" + "".join(f"{c:>{w}}" for c in cells + rats)).rstrip())
    for text, good in checks:
        print(f"check: {text}: {'OK' if good else 'MISMATCH'}")
    base_r, base_s = ok[0]
    for r, s in ok[1:]:
        if base_r.hieravid is not None or r.hieravid is None or r.schedule is None:
            continue
        sched, cfg = r.schedule, r.hieravid
        kv = _ratio(s["kv_bytes_median"], base_s["kv_bytes_median"])
        ttft = _ratio(s["ttft_median_s"], base_s["ttft_median_s"])
        print(f"reading: {r.config.name} at budget {cfg.budget:g} ({cfg.mode} mode) keeps "
              f"{sched.layer_mean_share():.1%} of the {sched.num_visual} video tokens per LLM "
              f"layer on average ({sched.counts[0]} enter the LLM, {sched.counts[-1]} reach its "
              f"last stage); a request held " + ("-" if kv is None else f"{kv:.2f}x") +
              " the KV cache and got its first token in " +
              ("-" if ttft is None else f"{ttft:.2f}x") + f" the time of {base_r.config.name}")
    for line in notes:
        print(f"note: {line}")
    for r, _ in ok:
        if r.first is not None:
            answer = r.first.answer.replace("\n", " ")
            answer = answer if len(answer) <= 60 else answer[:57] + "..."
            print(f"answer [{r.config.name}]: {answer!r}")


def _json_entry(r: RunResult, s: dict) -> dict:
    first = r.first
    return {
        "config": r.config.name, "ok": r.ok, "extra_args": list(r.config.extra_args),
        "prompt_tokens": first.prompt_tokens if first else None,
        "completion_tokens": first.completion_tokens if first else None,
        "answer": first.answer if first else "",
        "ttft_s": s.get("ttft_median_s"), "total_s": s.get("total_median_s"),
        "prefill_s": s.get("prefill_median_s"), "kv_bytes": s.get("kv_bytes_median"),
        "kv_blocks": s.get("kv_blocks_median"), "kv_cache_bytes": r.kv_cache_bytes,
        "kv_cache_bytes_source": r.kv_cache_bytes_source,
        "num_gpu_blocks": r.num_gpu_blocks, "block_size": r.block_size,
        "hieravid": r.hieravid.model_dump(mode="json") if r.hieravid is not None else None,
        **{k: s.get(k) for k in ("visual_tokens", "stage_counts", "layers_per_stage",
                                 "tokens_per_layer", "layer_mean_tokens", "layer_mean_share")},
        "startup_s": r.startup_s, "error": r.error, "log": r.log_path,
        "requests": [asdict(x) for x in r.requests],
        "warmup": [asdict(x) for x in r.warmups],
    }


# -----------------------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    configs = [c for c in SERVER_CONFIGS if not args.only or c.name in args.only]
    if not configs:
        raise SystemExit(f"--only matched no configuration of "
                         f"{[c.name for c in SERVER_CONFIGS]}")
    if args.gpu_memory_utilization is not None and not _cuda_available():
        raise SystemExit("--gpu-memory-utilization needs CUDA: on CPU vLLM reads it as a share "
                         "of one NUMA node minus its own RSS, which differs between machines; "
                         "size the KV cache with --kv-cache-memory-bytes instead")
    if not args.model:  # everything is local: never reach for a model hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hieravid_vllm.testing.server import VLLMServer

    work = Path(tempfile.mkdtemp(prefix="hieravid-demo-"))
    log_dir = Path(args.log_dir) if args.log_dir else work
    allowed: list[Path] = []
    fps = args.fps
    n_clips = args.warmup + args.requests
    llava_tpf = None

    print("=== HieraVid demo " + "=" * 62)
    if args.model:
        model = args.model
        arch = None
        print(f"model        : {model}")
        max_model_len = args.max_model_len  # let vLLM use the checkpoint's own limit
        mnbt = args.max_num_batched_tokens or 32768
    else:
        from hieravid_vllm.testing.models import build_tiny_model, model_info

        t0 = time.perf_counter()
        arch = args.arch
        model = str(build_tiny_model(arch, preset=args.preset))
        info = model_info(model)
        llava_tpf = info.get("llava_tokens_per_frame")
        lm = info["spec"]["lm"]
        print(f"model        : tiny random-weight {info['architecture']} ({args.preset}: LM "
              f"hidden {lm['hidden_size']} x {lm['num_hidden_layers']} layers, "
              f"{info['num_parameters'] / 1e6:.1f} M params of which LM "
              f"{info['num_lm_parameters'] / 1e6:.1f} M; ready in "
              f"{time.perf_counter() - t0:.1f} s)")
        print(f"               {model}")
        max_model_len = args.max_model_len or 16384
        mnbt = args.max_num_batched_tokens or max(max_model_len, 8192)
    num_layers = num_llm_layers(model)

    grid_visual: dict[int, int] = {}   # clip index -> video tokens known from its grid
    grid_frames: dict[int, int] = {}   # clip index -> T (temporal positions) of its grid
    if args.video:
        urls = [_video_url(v, allowed) for v in args.video]
        video_urls = [urls[i % len(urls)] for i in range(n_clips)]
        print(f"video        : {', '.join(args.video)}")
        if len(urls) < n_clips:
            print(f"               {len(urls)} video(s) for {n_clips} requests: repeats may be "
                  f"served from vLLM's encoder cache (both servers alike); give "
                  f"{n_clips} videos to avoid it")
    else:
        from hieravid_vllm.testing.video import write_scene_video

        sample_fps = fps or 8.0
        clips = [write_scene_video(work / f"sample_scenes_{i}.mp4", num_frames=args.frames,
                                   width=args.size, height=args.size, fps=sample_fps,
                                   num_scenes=4, seed=i) for i in range(n_clips)]
        fps = sample_fps  # sample exactly the frames that were written
        video_urls = [_video_url(str(c.path), allowed) for c in clips]
        clip = clips[args.warmup]
        print(f"video        : {n_clips} synthetic clips (one per request, seeds 0-{n_clips - 1}),"
              f" each {clip.num_frames} frames {clip.width}x{clip.height} @ {clip.fps:g} fps, "
              f"{len(clip.scenes)} scenes; {work}")
        T, per_frame = clip_grid(arch, args.frames, args.size, args.size, llava_tpf)
        if T and per_frame:
            for i in range(n_clips):
                grid_visual[i], grid_frames[i] = T * per_frame, T
            print(f"               grid: {T} temporal positions x {per_frame} tokens = "
                  f"{T * per_frame} video tokens per clip")
        reference = None if args.model else _reference_line(model, arch, clip, args.question)
        if reference:
            print(f"reference    : {reference}")
    print(f"frame rate   : {f'{fps:g} fps' if fps else 'vLLM default'} "
          f"(--media-io-kwargs video.fps)")
    print(f"plugin       : {_plugin_status()}")
    print(f"question     : {args.question!r}")
    print(f"requests     : {args.warmup} warm-up + {args.requests} measured per server, one at "
          f"a time, max_tokens={args.max_tokens} (ignore_eos, greedy), streamed; "
          f"every server: {' '.join(NO_CACHE_ARGS)}")
    cuda = _cuda_available()

    results: list[RunResult] = []
    for cfg in configs:
        print(f"\n--- [{cfg.name}] {cfg.description}")
        server_args = [*cfg.extra_args, *NO_CACHE_ARGS, *args.vllm_arg]
        run = RunResult(config=cfg, hieravid=hieravid_config(server_args))
        server = VLLMServer(
            model, extra_args=server_args, port=args.port, video_fps=fps,
            allowed_local_media_path=allowed[0] if allowed else None,
            max_model_len=max_model_len, max_num_batched_tokens=mnbt,
            gpu_memory_utilization=args.gpu_memory_utilization if cuda else None,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            env=cfg.env, log_path=log_dir / f"vllm-{cfg.name}.log",
            startup_timeout=args.startup_timeout)
        run.log_path = str(server.log_path)
        print(f"$ {shlex.join(server.command)}")
        print(f"  log: {server.log_path}")
        try:
            t0 = time.perf_counter()
            with server:
                run.startup_s = server.startup_seconds
                print(f"  server ready on {server.url} after {time.perf_counter() - t0:.1f} s")
                labels = cache_config_labels(server.metrics_text())
                run.num_gpu_blocks = int(labels.get("num_gpu_blocks") or 0) or None
                run.block_size = int(labels.get("block_size") or 0) or None
                if server.kv_cache_memory_bytes:
                    run.kv_cache_bytes = int(server.kv_cache_memory_bytes)
                    run.kv_cache_bytes_source = "--kv-cache-memory-bytes"
                else:
                    run.kv_cache_bytes = _log_kv_bytes(server.log_path)
                    run.kv_cache_bytes_source = "server log (Available KV cache memory)"
                print(f"  KV cache: {_fmt_mib(run.kv_cache_bytes)} in {run.num_gpu_blocks} "
                      f"blocks of {run.block_size} tokens")
                for i in range(n_clips):
                    warm = i < args.warmup
                    res = RequestResult(clip=i, warmup=warm)
                    tag = (f"warm-up {i + 1}/{args.warmup}" if warm else
                           f"request {i - args.warmup + 1}/{args.requests}")
                    _stream_request(server, video_urls[i], args.question, args.max_tokens,
                                    run, res)
                    (run.warmups if warm else run.requests).append(res)
                    if res.kv_bytes is not None:
                        kv = f"{_fmt_mib(res.kv_bytes)} ({res.kv_blocks} blocks)"
                    elif res.kv_usage is not None:
                        kv = f"{res.kv_usage:.2%} of the KV cache (its size unknown)"
                    else:
                        kv = "- (the request ended before /metrics answered; raise --max-tokens)"
                    print(f"  {tag:<16} clip {i}: prompt {res.prompt_tokens} tokens, TTFT "
                          f"{_fmt_s(res.ttft_s)}, prefill {_fmt_s(res.prefill_s)}, KV held "
                          f"{kv}{' (not counted)' if warm else ''}")
            print("  server stopped")
            run.ok = True
        except Exception as exc:  # noqa: BLE001 - reported (log tail included); next config
            run.ok = False
            run.error = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED: {run.error}", file=sys.stderr)
        results.append(run)

    # what the schedule says, per configuration, on the first measured clip
    clip0 = args.warmup
    reported = {}  # clip -> video tokens reported by a HieraVid server
    for run in results:
        for r in run.requests + run.warmups:
            if r.visual_tokens is not None:
                reported.setdefault(r.clip, r.visual_tokens)
    checks: list[tuple[str, bool]] = []
    notes: list[str] = []
    for i, n in sorted(reported.items()):
        if i in grid_visual and grid_visual[i] != n:
            text = f"clip {i}: server reports {n} video tokens, the grid {grid_visual[i]}"
            checks.append((text, False))
    visual = {i: grid_visual.get(i, reported.get(i)) for i in range(n_clips)}
    if llava_tpf and not grid_frames:  # LLaVA-OV: T from the count the server reports
        grid_frames = {i: n // llava_tpf for i, n in visual.items() if n}
    num_visual = visual.get(clip0)
    if num_visual is not None and num_layers:
        for run in results:
            if run.hieravid is not None:
                run.schedule = schedule_for(run.hieravid, num_visual, num_layers,
                                            grid_frames.get(clip0))
    elif any(r.hieravid is not None for r in results):
        notes.append("visual tokens per stage unknown: " + (
            f"LLM depth not readable from {model}/config.json" if not num_layers else
            "no server reported the video-token count"))
    if num_visual is not None and not grid_frames and any(r.hieravid is not None for r in results):
        notes.append("schedule without the merge cap (the video's grid is unknown here: "
                     "max_merge = None); the server caps merging at (T-1) x tokens per frame")

    # cross-check the served prompt lengths against the schedule, clip by clip
    base = results[0] if results and results[0].ok and results[0].hieravid is None else None
    for run in results:
        if base is None or run is base or not run.ok or run.hieravid is None or not num_layers:
            continue
        seen: dict[str, int] = {}  # one line per distinct case (clips differ), with its count
        for a, b in zip(base.requests, run.requests):
            n = visual.get(a.clip)
            if n is None or not (a.ok and b.ok):
                continue
            k0 = schedule_for(run.hieravid, n, num_layers, grid_frames.get(a.clip)).counts[0]
            want = a.prompt_tokens - n + k0
            text = (f"{run.config.name} prompt tokens == {base.config.name} prompt tokens - "
                    f"video tokens + stage-1 count: {b.prompt_tokens} == {a.prompt_tokens} - "
                    f"{n} + {k0}")
            if b.prompt_tokens != want:
                checks.append((f"clip {a.clip}: {text}", False))
            else:
                seen[text] = seen.get(text, 0) + 1
        checks.extend((f"{t} ({k} of {len(run.requests)} requests)", True)
                      for t, k in seen.items())
    for run in results:
        read = sum(r.kv_bytes is not None for r in run.requests)
        if run.ok and read < len(run.requests):
            notes.append(f"{run.config.name}: KV cache read in {read} of {len(run.requests)} "
                         f"requests (the others ended before /metrics answered, e.g. on a "
                         f"loaded machine; raise --max-tokens); the median is over those read")
    if any(r.ok and r.hieravid is not None and r.hieravid.mode == "full" for r in results):
        notes.append("KV compared in bytes, not blocks: in full mode every LLM stage has its own "
                     "KV cache group, so a HieraVid block covers the layers of one stage, an "
                     "unpruned block all layers")
    notes.append("TTFT includes decoding the video and the vision encoder (same work on both "
                 "servers); prefill time is the engine's time from scheduling to the first "
                 "token")

    stats = [_config_stats(r, visual.get(clip0), num_layers) for r in results]
    _print_summary(results, stats, num_layers, checks, notes)
    if args.json:
        print(json.dumps([_json_entry(r, s) for r, s in zip(results, stats)], indent=2))
    failed = [text for text, good in checks if not good]
    if failed:
        print(f"CHECK FAILED: {failed[0]}", file=sys.stderr)
    return 0 if all(r.ok for r in results) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
