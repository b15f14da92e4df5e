"""Helpers shared by the benchmark scripts: one vLLM engine per child process (reaped with
its whole process group), and a marker-delimited section of ``benchmarks/RESULTS.md``."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from pathlib import Path


def _child(q, fn, args):
    os.setpgrp()  # the engine's processes join this group: the parent can always reap them
    try:
        q.put(fn(*args))
    except Exception as e:  # reported, not hidden
        import traceback

        q.put({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


def run_isolated(fn, *args, timeout: float = 900) -> dict:
    """``fn(*args)`` in a fresh spawned process; its result dict, or ``{"error": ...}``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args))
    p.start()
    deadline = time.monotonic() + timeout
    try:
        # poll, so that a child that died without a result (e.g. it could not unpickle
        # ``fn``) is an error now, not after ``timeout``
        while True:
            try:
                return q.get(timeout=min(5.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return {"error": f"no result within {timeout:g} s"}
                if not p.is_alive():
                    try:
                        return q.get(timeout=1.0)
                    except queue.Empty:
                        return {"error": f"no result: the child exited with code {p.exitcode}"}
    finally:
        p.join(timeout=120)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_section(path: Path, begin: str, end: str, title: str, text: str) -> None:
    """Replace the ``begin``..``end`` block of ``path`` (or append it under ``title``)."""
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + block + old[b:]
    else:
        new = old.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(new)
