"""benchmarks/prefill_gpu.py (the GPU machine's 7B-shaped prefill) at its tiny shapes on CPU.

Checks the token accounting of every row against the core schedule and Eq. 12 written out
independently here, and that full mode's layer loop really drops rows at the stage starts
(not only reports it): its last hidden row equals a second formulation, the unpruned sequence
with the dropped visual rows masked out of attention from the stage start on.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("hv_bench_prefill_gpu",
                                                  REPO / "benchmarks" / "prefill_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _eq12(tokens, d, m):
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens)


@pytest.fixture(scope="module")
def pg():
    return _load()


def test_rows_match_the_schedule_and_eq12(pg):
    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.schedule import build_schedule

    torch.set_grad_enabled(False)
    rows, N = pg.bench("tiny", [0.3, 0.1], 1, torch.device("cpu"), torch.float32)
    S = pg.SHAPES["tiny"]
    T, Hh, Ww = S["video"]
    assert N == T * Hh * Ww
    text = 44
    base = _eq12([N + text] * S["L"], S["d"], S["m"])
    by = {r["config"]: r for r in rows}
    assert set(by) == {"unpruned", "evs 0.3", "evs 0.1", "hieravid 0.3 input_only",
                       "hieravid 0.3 full", "hieravid 0.1 input_only", "hieravid 0.1 full",
                       "hieravid 0.3 full (sync-free)", "hieravid 0.1 full (sync-free)"}
    assert by["unpruned"]["tokens_layer0"] == N and by["unpruned"]["ratio"] == 1.0
    for b in (0.3, 0.1):
        n_evs = math.floor(b * N + 0.5)
        assert by[f"evs {b}"]["tokens_layer0"] == by[f"evs {b}"]["tokens_last"] == n_evs
        assert by[f"evs {b}"]["flops"] == pytest.approx(
            _eq12([n_evs + text] * S["L"], S["d"], S["m"]) / base)
        for mode in ("input_only", "full"):
            sched = build_schedule(HieraVidConfig(budget=b, mode=mode), N, S["L"],
                                   max_merge=(T - 1) * Hh * Ww)
            per_layer = ([sched.input_target] * S["L"] if mode == "input_only"
                         else [c for c, lp in zip(sched.counts, sched.layers_per_stage)
                               for _ in range(lp)])
            r = by[f"hieravid {b} {mode}"]
            assert (r["tokens_layer0"], r["tokens_last"]) == (per_layer[0], per_layer[-1])
            assert r["flops"] == pytest.approx(
                _eq12([c + text for c in per_layer], S["d"], S["m"]) / base)
            assert r["ms"] > 0 and r["input_ms"] > 0
            assert (r["select_ms"] > 0) == (mode == "full")
        sf = by[f"hieravid {b} full (sync-free)"]
        full = by[f"hieravid {b} full"]
        assert (sf["tokens_layer0"], sf["tokens_last"], sf["flops"]) == (
            full["tokens_layer0"], full["tokens_last"], full["flops"])
        assert sf["select_ms"] > 0


@pytest.mark.parametrize("device_counts", [False, True])
def test_full_mode_drops_rows_like_a_masked_unpruned_run(pg, device_counts):
    """Second formulation of the layer loop: all rows stay, and from the first layer of each
    stage on, the visual rows that stage dropped are masked out of every query's attention
    (the reference selection reads the counts back; ``device_counts``: the run under test
    uses the sync-free boundary, lengths kept on the device between stages)."""
    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.pipeline import prune_input_stage, select_layer_stage

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    S = pg.SHAPES["tiny"]
    dev = torch.device("cpu")
    dec = pg.Decoder(S["L"], S["d"], S["nh"], S["nkv"], S["m"], dev, torch.float64)
    T, Hh, Ww = S["video"]
    N = T * Hh * Ww
    feats = torch.randn(T, Hh, Ww, S["d"], dtype=torch.float64)
    pre, post = torch.randn(5, S["d"], dtype=torch.float64), torch.randn(7, S["d"],
                                                                        dtype=torch.float64)
    cfg = HieraVidConfig(budget=0.3)
    res = prune_input_stage(feats, None, cfg, S["L"])
    vis_pos = res.kept_indices + 5
    post_pos = torch.arange(7) + 5 + N
    got, counts = pg.run_prompt(dec, pre, res.features, post, vis_pos, post_pos,
                                seg=res.segment_ids, sched=res.schedule, cfg=cfg,
                                device_counts=device_counts)

    # second formulation: no gathers, a boolean "alive" mask over the input stage's rows
    h = torch.cat([pre, res.features, post])
    n0 = res.features.shape[0]
    pos = torch.cat([torch.arange(5), vis_pos, post_pos])
    cos, sin = dec.rope(pos)
    alive = torch.ones(h.shape[0], dtype=torch.bool)
    seg = res.segment_ids
    starts = dict(zip(res.schedule.boundaries[1:], range(1, len(res.schedule.counts))))
    want_counts = []
    for i in range(dec.L):
        if i in starts:
            st = starts[i]
            vis_rows = torch.nonzero(alive[5:5 + n0]).flatten() + 5
            keep = select_layer_stage(h[vis_rows], h[-1], seg, res.schedule.counts[st], cfg,
                                      use_dpp=res.schedule.uses_dpp[st])
            dropped = torch.ones(vis_rows.shape[0], dtype=torch.bool)
            dropped[keep] = False
            alive[vis_rows[dropped]] = False
            seg = seg[keep]
        want_counts.append(int(alive[5:5 + n0].sum()))
        h = _masked_layer(dec, i, h, cos, sin, alive)
    assert counts == want_counts
    assert torch.allclose(got, h[-1], rtol=1e-9, atol=1e-9)


def _masked_layer(dec, i, h, cos, sin, alive):
    """Decoder.layer with attention restricted to causal AND alive keys (explicit softmax)."""
    p, n, hd = dec.layers[i], h.shape[0], dec.hd
    qkv = torch.nn.functional.linear(dec._norm(h, p["n1"]), p["qkv"], p["qkv_b"])
    q, k, v = qkv.split([dec.nh * hd, dec.nkv * hd, dec.nkv * hd], -1)
    q, k, v = (t.view(n, -1, hd).transpose(0, 1) for t in (q, k, v))

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos[None] + torch.cat([-t2, t1], -1) * sin[None]
    q, k = rot(q), rot(k)
    rep = dec.nh // dec.nkv
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & alive[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = torch.softmax(scores, -1) @ v
    h = h + torch.nn.functional.linear(o.transpose(0, 1).reshape(n, -1), p["o"])
    g, u = torch.nn.functional.linear(dec._norm(h, p["n2"]), p["gu"]).chunk(2, -1)
    return h + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, p["down"])


def test_sync_count_wiring(pg, monkeypatch):
    """The GPU run's sync count (CUDA only, so its wiring is checked here): run_prompt turns
    torch's sync debug mode on around the layer loop only and off again, even when the loop
    raises; count_syncs counts the synchronisation warnings raised inside its call."""
    import warnings

    from hieravid_vllm.core.config import HieraVidConfig
    from hieravid_vllm.core.pipeline import prune_input_stage

    torch.set_grad_enabled(False)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    S = pg.SHAPES["tiny"]
    dec = pg.Decoder(S["L"], S["d"], S["nh"], S["nkv"], S["m"], torch.device("cpu"),
                     torch.float32)
    T, Hh, Ww = S["video"]
    N = T * Hh * Ww
    feats = torch.randn(T, Hh, Ww, S["d"])
    cfg = HieraVidConfig(budget=0.3)
    res = prune_input_stage(feats, None, cfg, S["L"])
    pre, post = torch.randn(3, S["d"]), torch.randn(4, S["d"])
    args = (dec, pre, res.features, post, res.kept_indices + 3, torch.arange(4) + 3 + N)
    pg.run_prompt(*args, seg=res.segment_ids, sched=res.schedule, cfg=cfg,
                  device_counts=True, sync_debug=True)
    assert modes == ["warn", "default"]
    monkeypatch.setattr(dec, "layer", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        pg.run_prompt(*args, seg=res.segment_ids, sched=res.schedule, cfg=cfg, sync_debug=True)
    assert modes == ["warn", "default"] * 2

    def two_syncs():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("something else", UserWarning)
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
    assert pg.count_syncs(two_syncs) == 2
