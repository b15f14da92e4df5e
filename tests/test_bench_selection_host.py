"""benchmarks/selection_host.py: the CPU selection-cost table (issue #14) on small videos.

What the table rests on: one row per stage boundary of the 0.3 schedule, the stage and count
timings are positive numbers, the DPP rows time both greedy variants, and the batched greedy
(every video's segments in one call) picked exactly what the per-video calls picked (the
script asserts it before timing; here on videos of several sizes). ``--replay``: the engine's
recorded stage inputs, written by the stage hook's own dump writer, reproduce the recorded
picks before they are timed, and a recorded pick the selection would not make is refused."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

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
        assert float(cells[6]) > 0 and float(cells[7]) > 0     # host / device counts


def _write_dump(path, seed=0):
    """A video's three boundaries written by the stage hook's own dump writer
    (``stages._dump_stages``), each entry filled as ``stages._select_rows`` fills it: the
    rows a boundary sees are the ones the previous one kept (positions from the video's first
    visual token), hidden states change between boundaries (a random layer stands in)."""
    import torch

    from hieravid_vllm import stages
    from hieravid_vllm.core import HieraVidConfig
    from hieravid_vllm.core.pipeline import select_layer_stage

    g = torch.Generator().manual_seed(seed)
    n, C, M = 150, 32, 4
    cfg = HieraVidConfig()
    seg = torch.repeat_interleave(torch.arange(M), torch.tensor([20, 55, 30, 45]))
    h = torch.randn(n, C, generator=g)
    pos = torch.arange(n)
    log = []
    for target, use_dpp in ((100, False), (66, True), (44, True)):
        q = torch.randn(C, generator=g)
        keep = select_layer_stage(h, q, seg, target, cfg, use_dpp=use_dpp, num_segments=M)
        log.append({"pos": pos[keep], "hidden_visual": h, "query": q, "segment_ids": seg,
                    "num_segments": M, "target": target, "use_dpp": use_dpp,
                    "config": cfg.model_dump(mode="json")})
        pos, seg = pos[keep], seg[keep]
        h = torch.tanh(h[keep] @ torch.randn(C, C, generator=g) / C ** 0.5)
    stages._dump_stages(str(path), {f"video{seed}": log},
                        {f"video{seed}": (None, M, torch.arange(n))})


def test_replay_reproduces_the_engines_picks(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import selection_host
    import torch

    for seed in (0, 1):
        _write_dump(tmp_path, seed)
    args = selection_host.argparse.Namespace(replay=str(tmp_path), reps=1)
    text = selection_host.replay(args)
    rows = [ln for ln in text.splitlines() if re.match(r"\| \d \|", ln)]
    assert [r.split("|")[2].strip() for r in rows] == ["no", "yes", "yes"]
    assert [r.split("|")[3].strip() for r in rows] == ["300 -> 200", "200 -> 132", "132 -> 88"]
    # a recorded pick the selection would not make: the replay refuses to time it
    f = sorted(tmp_path.glob("stages-*.pt"))[0]
    d = torch.load(f, weights_only=False)
    kept = d["boundaries"][2]["pos"]
    prev = d["boundaries"][1]["pos"]
    other = prev[~torch.isin(prev, kept)][0]
    d["boundaries"][2]["pos"] = torch.sort(torch.cat([kept[1:], other.view(1)])).values
    torch.save(d, f)
    with pytest.raises(AssertionError, match="boundary 3"):
        selection_host.replay(args)
