"""Prometheus metrics and counters of HieraVid.

Prompt-side counts (visual tokens before / after pruning per video) are recorded where
vLLM processes prompts, the API server process, so they appear on the server's
``/metrics`` next to vLLM's own. Pruning time is measured where pruning runs (the model
runner's process); it is logged at debug level and, when that process shares a Prometheus
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``), exported too.
"""
from __future__ import annotations

try:
    from prometheus_client import Counter, Histogram
except ImportError:  # pragma: no cover - prometheus_client ships with vLLM
    Counter = Histogram = None

_metrics = None


def _get():
    global _metrics
    if _metrics is None and Counter is not None:
        _metrics = {
            "videos": Counter("hieravid_videos", "Videos processed with HieraVid pruning"),
            "before": Counter("hieravid_visual_tokens_before",
                              "Video tokens before HieraVid pruning"),
            "after": Counter("hieravid_visual_tokens_after",
                             "Video tokens entering the LLM after HieraVid pruning"),
            "retention": Histogram("hieravid_visual_token_retention",
                                   "Share of video tokens kept per video",
                                   buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)),
            "seconds": Histogram("hieravid_prune_seconds",
                                 "Time spent in HieraVid pruning per video",
                                 buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5)),
        }
    return _metrics


def record_prompt(before: int, after: int) -> None:
    m = _get()
    if m is None:
        return
    m["videos"].inc()
    m["before"].inc(before)
    m["after"].inc(after)
    if before:
        m["retention"].observe(after / before)


def record_prune(before: int, after: int, seconds: float) -> None:
    m = _get()
    if m is not None:
        m["seconds"].observe(seconds)
