"""benchmarks/selection_host.py: the CPU selection-cost table (issue #14) on small videos.

What the table rests on: one row per stage boundary of the 0.3 schedule, the stage and count
timings are positive numbers, the DPP rows time both greedy variants, and the batched greedy
(every video's segments in one call) picked exactly what the per-video calls picked (the
script asserts it before timing; here on videos of several sizes)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_selection_host_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import selection_host

    args = selection_host.argparse.Namespace(videos=3, hidden=64, segments=5, scale=15,
                                             reps=1, seed=3)
    text = selection_host.run(args)
    rows = [ln for ln in text.splitlines() if re.match(r"\| \d \(", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["1 (relevance)", "2 (DPP)", "3 (DPP)"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        n_in, kept = map(int, cells[1].split(" / "))
        assert 0 < kept < n_in
        assert float(cells[2]) > 0 and float(cells[3]) > 0
        if "DPP" in cells[0]:
            assert float(cells[4]) > 0 and float(cells[5]) > 0
        else:
            assert cells[4] == cells[5] == "-"
