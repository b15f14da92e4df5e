"""HieraVid metrics on the server's ``/metrics``, in particular the pruning time measured in
the engine process (``hieravid_prune_seconds``), and the per-request budget refused where the
operator did not allow it.

* unit: the worker-side recorder's files, merged by ``prometheus_client``'s
  ``MultiProcessCollector``, equal a plain ``prometheus_client`` ``Histogram`` fed the same
  observations (independent reference);
* server (tiny Qwen2.5-VL, ``--hieravid-budget 0.3 --hieravid-mode input_only
  --trust-request-mm-kwargs``): after N
  distinct videos, ``hieravid_prune_seconds_count`` == N with a positive sum, and the
  before / after counters equal the sums of the vLLM-side grid counts and the schedule's kept
  counts; a request sending ``mm_processor_kwargs.hieravid_budget`` gets a 400 naming
  ``hieravid_budget`` (not allowed by this operator) and the server keeps serving.
"""
from __future__ import annotations

import os

import openai
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from hieravid_vllm import metrics
from hieravid_vllm.testing.expect import expected_kept, qwen_video_grid

pytestmark = pytest.mark.vllm033  # also run on vLLM 0.33 (make test)
from hieravid_vllm.testing.server import chat, video_messages

BUDGET = 0.3


def _samples(registry, name):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in registry.collect() if fam.name == name for s in fam.samples
            if not s.name.endswith("_created")}


def test_recorder_files_merge_like_a_histogram(tmp_path, monkeypatch):
    values = [3e-5, 2e-4, 0.0007, 0.003, 0.02, 0.02, 0.3, 2.0, 40.0]
    ref_registry = CollectorRegistry()
    ref = Histogram(metrics.PRUNE_SECONDS, metrics.PRUNE_SECONDS_HELP,
                    buckets=metrics.PRUNE_BUCKETS, registry=ref_registry)
    # two worker processes: two files in the shared directory
    for pid, part in ((101, values[:4]), (202, values[4:])):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        rec = metrics.PruneTimeRecorder(str(tmp_path))
        for v in part:
            rec.observe(v)
            ref.observe(v)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["histogram_hieravid-101.db",
                                                          "histogram_hieravid-202.db"]
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))
    got, want = _samples(merged, metrics.PRUNE_SECONDS), _samples(ref_registry,
                                                                  metrics.PRUNE_SECONDS)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_recording_rank_and_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.PROMETHEUS_DIR_ENV, raising=False)
    monkeypatch.delenv(metrics.METRICS_DIR_ENV, raising=False)
    metrics.record_prune(10, 3, 0.01)  # no directory: nothing written, no error
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path / "hv"))
    (tmp_path / "hv").mkdir()
    metrics.record_prune(10, 3, 0.01)
    # vLLM's multiprocess directory (several API servers) takes precedence
    monkeypatch.setenv(metrics.PROMETHEUS_DIR_ENV, str(tmp_path / "prom"))
    (tmp_path / "prom").mkdir()
    metrics.record_prune(10, 3, 0.02)
    for d, total in (("hv", 0.01), ("prom", 0.02)):
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(tmp_path / d))
        s = _samples(reg, metrics.PRUNE_SECONDS)
        assert s[(metrics.PRUNE_SECONDS + "_count", ())] == 1
        assert s[(metrics.PRUNE_SECONDS + "_sum", ())] == pytest.approx(total)


# -------------------------------------------------------------------------------------------
def _metric_lines(server) -> dict:
    text = server.metrics_text()
    out = {}
    for line in text.splitlines():
        if line.startswith("hieravid_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _chat(server, path, **extra):
    return chat(server, video_messages(path, "What happens?"), max_tokens=2,
                extra_body=extra or None).usage.prompt_tokens


@pytest.mark.vllm
def test_server_exports_prune_time_and_counts(model, make_videos, start_server):
    vids = list(make_videos({
        i: dict(num_frames=n, width=w, height=h, num_scenes=2, seed=10 + i)
        for i, (n, w, h) in enumerate([(16, 112, 112), (12, 140, 112), (16, 112, 168)])
    }).values())
    server = start_server(model, "metrics", ["--hieravid-budget", str(BUDGET),
                                             "--hieravid-mode", "input_only",
                                             "--trust-request-mm-kwargs"])
    try:
        assert metrics.PRUNE_SECONDS + "_count" not in _metric_lines(server)
        before = after = 0
        for path in vids:
            _chat(server, path)
            t, per_frame = qwen_video_grid(path)
            before += t * per_frame
            after += expected_kept(t, per_frame, BUDGET)
        m = _metric_lines(server)
        assert m["hieravid_prune_seconds_count"] == len(vids)
        assert m['hieravid_prune_seconds_bucket{le="+Inf"}'] == len(vids)
        assert m["hieravid_prune_seconds_sum"] > 0
        assert m["hieravid_videos_total"] == len(vids)
        assert m["hieravid_visual_tokens_before_total"] == before
        assert m["hieravid_visual_tokens_after_total"] == after
        assert 0 < after < before

        # this operator did not allow per-request budgets: 400 naming the key, still serving
        with pytest.raises(openai.BadRequestError) as e:
            _chat(server, vids[0], mm_processor_kwargs={"hieravid_budget": 0.5})
        assert e.value.status_code == 400 and "hieravid_budget" in str(e.value)
        assert "--hieravid-allow-request-budget" in str(e.value)
        assert _chat(server, vids[1]) > 0
        assert _metric_lines(server)["hieravid_prune_seconds_count"] == len(vids)
    finally:
        server.stop()
