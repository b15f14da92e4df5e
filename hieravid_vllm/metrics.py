"""Prometheus metrics of HieraVid, exported on the vLLM server's ``/metrics``.

Two kinds, recorded in two different vLLM processes:

* prompt-side counts (videos, visual tokens before / after pruning, retention) are known
  where vLLM processes prompts, the API server process: plain ``prometheus_client``
  counters in the default registry, which vLLM's ``/metrics`` serves (with several API
  servers vLLM switches ``prometheus_client`` to its multiprocess mode and they follow);
* the pruning time per video (``hieravid_prune_seconds``, a histogram) is measured where
  pruning runs: the model runner in the engine-core / worker process, which has no HTTP
  endpoint and whose registry vLLM's ``/metrics`` never reads.

The pruning time crosses the process boundary through files in ``prometheus_client``'s
multiprocess format (one mmap file per worker process, :class:`PruneTimeRecorder`):

* with one API server (vLLM's default) the API process creates a private directory at
  engine creation (:func:`setup_api_process`, called from the ``create_engine_config``
  patch), publishes it in ``HIERAVID_METRICS_DIR`` before vLLM starts the engine processes
  (they inherit the environment) and registers a ``MultiProcessCollector`` for that
  directory in its default registry;
* when ``PROMETHEUS_MULTIPROC_DIR`` is set (vLLM sets it for ``--api-server-count`` > 1)
  the workers write into that directory instead, which vLLM's own collector already reads.

Only one worker per model replica records (tensor-parallel rank 0 of the first pipeline
stage): every tensor-parallel rank prunes the same video. vLLM's start-up runs on dummy
videos (the API process's dummy prompts, the worker's memory profiling) are not counted
(:func:`not_counted`). Every pruning is also logged at
debug level (logger ``vllm.hieravid_vllm``) with its before / after counts and time.
Workers that cannot see the API server's file system (multi-node Ray) only log.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from typing import Optional

try:
    from prometheus_client import REGISTRY, Counter, Histogram
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.utils import floatToGoString
except ImportError:  # pragma: no cover - prometheus_client ships with vLLM
    Counter = Histogram = None

logger = logging.getLogger("vllm.hieravid_vllm")

#: Directory shared by the API process (reads) and the engine / worker processes (write).
METRICS_DIR_ENV = "HIERAVID_METRICS_DIR"
#: vLLM's (prometheus_client's) multiprocess directory, set for several API servers.
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

PRUNE_SECONDS = "hieravid_prune_seconds"
PRUNE_SECONDS_HELP = "Time spent in HieraVid pruning per video (worker process)"
PRUNE_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, float("inf"))

_metrics = None
_local = threading.local()


@contextlib.contextmanager
def not_counted():
    """Nothing recorded inside (in this thread): vLLM's profiling on dummy inputs."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def _counting() -> bool:
    return not getattr(_local, "depth", 0)


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
        }
    return _metrics


def record_prompt(before: int, after: int, budget: Optional[float] = None) -> None:
    """API process: one video's placeholder count was decided (before -> after tokens)."""
    logger.debug("HieraVid: video prompt: %d -> %d visual tokens (budget %s)", before, after,
                 budget)
    m = _get()
    if m is None or not _counting():
        return
    m["videos"].inc()
    m["before"].inc(before)
    m["after"].inc(after)
    if before:
        m["retention"].observe(after / before)


# ---------------------------------------------------------------------------------------------
# pruning time: worker side
# ---------------------------------------------------------------------------------------------
class PruneTimeRecorder:
    """Histogram of pruning times in one process, kept in a ``prometheus_client``
    multiprocess file (``histogram_hieravid-<pid>.db``) in ``directory``.

    The file holds the same keys a multiprocess-mode ``Histogram`` writes (per-bucket
    counts and the sum), so ``MultiProcessCollector`` merges the files of all worker
    processes into one ``hieravid_prune_seconds`` histogram. The file name differs from
    ``prometheus_client``'s own (``histogram_<pid>.db``), so the two never share a file.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.pid = os.getpid()
        self._file = MmapedDict(os.path.join(directory, f"histogram_hieravid-{self.pid}.db"))
        self._counts = [0.0] * len(PRUNE_BUCKETS)
        self._sum = 0.0
        self._bucket_keys = [mmap_key(PRUNE_SECONDS, PRUNE_SECONDS + "_bucket", ("le",),
                                      (floatToGoString(b),), PRUNE_SECONDS_HELP)
                             for b in PRUNE_BUCKETS]
        self._sum_key = mmap_key(PRUNE_SECONDS, PRUNE_SECONDS + "_sum", (), (),
                                 PRUNE_SECONDS_HELP)
        for key in self._bucket_keys + [self._sum_key]:  # a scrape sees count 0, not nothing
            self._file.write_value(key, 0.0, 0.0)

    def observe(self, seconds: float) -> None:
        i = next(i for i, b in enumerate(PRUNE_BUCKETS) if seconds <= b)
        self._counts[i] += 1
        self._sum += seconds
        self._file.write_value(self._bucket_keys[i], self._counts[i], 0.0)
        self._file.write_value(self._sum_key, self._sum, 0.0)


_recorder: Optional[PruneTimeRecorder] = None
_recorder_lock = threading.Lock()


def _prune_dir() -> Optional[str]:
    return os.environ.get(PROMETHEUS_DIR_ENV) or os.environ.get(METRICS_DIR_ENV)


def _is_recording_rank() -> bool:
    """TP rank 0 of the first PP stage (or no distributed setup at all, e.g. a unit test)."""
    try:
        from vllm.distributed import parallel_state as ps

        if ps._TP is None:
            return True
        return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pp_group().is_first_rank
    except Exception:  # pragma: no cover - not inside a vLLM worker
        return True


def _get_recorder() -> Optional[PruneTimeRecorder]:
    global _recorder
    directory = _prune_dir()
    if Counter is None or not directory:
        return None
    with _recorder_lock:
        if _recorder is None or _recorder.pid != os.getpid() or \
                _recorder.directory != directory:
            try:
                _recorder = PruneTimeRecorder(directory)
            except OSError as e:  # e.g. a Ray worker on another node: log only
                logger.warning("HieraVid: cannot write pruning-time metrics to %s (%s)",
                               directory, e)
                return None
        return _recorder


def record_prune(before: int, after: int, seconds: float) -> None:
    """Worker process: one video was pruned from ``before`` to ``after`` tokens (the caller
    logs it at debug level)."""
    if not _counting() or not _is_recording_rank():
        return
    rec = _get_recorder()
    if rec is not None:
        rec.observe(seconds)


# ---------------------------------------------------------------------------------------------
# pruning time: API-process side
# ---------------------------------------------------------------------------------------------
_collector_dir: Optional[str] = None


def setup_api_process() -> Optional[str]:
    """Create the pruning-time directory and collect it on this process's ``/metrics``.

    Called in the process that creates the engine (vLLM's API server, or the user's process
    for offline ``LLM``), before the engine processes start; idempotent. Returns the
    directory, or None when vLLM's multiprocess directory is used instead.
    """
    global _collector_dir
    if Counter is None or os.environ.get(PROMETHEUS_DIR_ENV):
        return None
    if _collector_dir is not None:  # one collector per process
        os.environ[METRICS_DIR_ENV] = _collector_dir
        return _collector_dir
    directory = tempfile.mkdtemp(prefix="hieravid-metrics-")
    atexit.register(shutil.rmtree, directory, True)
    os.environ[METRICS_DIR_ENV] = directory
    MultiProcessCollector(REGISTRY, path=directory)
    _collector_dir = directory
    logger.debug("HieraVid: pruning-time metrics directory %s", directory)
    return directory
