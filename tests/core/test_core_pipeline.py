"""End to end: kept counts equal the schedule's targets; budget 1.0 changes nothing."""
import random

import pytest
import torch

from hieravid_vllm.core import (HieraVidConfig, build_schedule, prune_input_stage,
                                select_layer_stage)
from hieravid_vllm.core.schedule import segment_counts


def _video(rnd, g):
    T, Hh, Ww, C = rnd.randint(1, 12), rnd.randint(1, 5), rnd.randint(1, 5), rnd.choice([8, 16])
    F = torch.randn(T, Hh, Ww, C, generator=g)
    # some static content so that merging and segmentation have structure
    for t in range(1, T):
        if rnd.random() < 0.6:
            F[t] = F[t - 1] + 0.05 * torch.randn(Hh, Ww, C, generator=g)
    return F


def test_counts_equal_schedule_targets_random():
    rnd = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for it in range(40):
        F = _video(rnd, g)
        T, Hh, Ww, C = F.shape
        N = T * Hh * Ww
        cfg = HieraVidConfig(
            budget=rnd.choice([0.1, 0.2, 0.3, rnd.uniform(0.02, 1.0)]),
            num_stages=rnd.randint(1, 5),
            segmentation=rnd.choice(["merge_ratio", "none", "avg_pool"]),
            mode=rnd.choice(["full", "input_only"]),
            r_var=rnd.choice([0.0, 0.1, 0.3]),
            relevance_sign=rnd.choice([1, -1]),
            relevance_source=rnd.choice(["last", "mean"]))
        query = torch.randn(rnd.randint(1, 3), C, generator=g) if rnd.random() < 0.7 else None
        res = prune_input_stage(F, query, cfg)
        sched = build_schedule(cfg, N, 28, max_merge=(T - 1) * Hh * Ww)
        assert res.schedule == sched
        n0 = res.kept_indices.numel()
        assert n0 == sched.counts[0] == sched.input_target
        assert res.features.shape == (n0, C) and res.segment_ids.shape == (n0,)
        assert torch.equal(res.kept_indices, torch.sort(res.kept_indices).values)
        assert len(set(res.kept_indices.tolist())) == n0
        t, i, j = res.thw.unbind(-1)
        assert torch.equal((t * Hh + i) * Ww + j, res.kept_indices)
        if n0:
            assert int(res.segment_ids.max()) + 1 == len(torch.unique(res.segment_ids))
        if cfg.mode == "input_only":
            continue
        # in-LLM stages on fake hidden states, reusing the segment layout
        hid = torch.randn(n0, 12, generator=g)
        seg = res.segment_ids
        pos = torch.arange(n0)
        for s in range(1, len(sched.counts)):
            target = sched.counts[s]
            ks = segment_counts(hid, seg, target, cfg)
            keep = select_layer_stage(hid, torch.randn(12, generator=g), seg, target, cfg,
                                      use_dpp=sched.uses_dpp[s])
            assert keep.numel() == target
            assert torch.equal(keep, torch.sort(keep).values) and len(set(keep.tolist())) == target
            # per-segment counts are the Eq. 4-5 allocation
            assert torch.bincount(seg[keep], minlength=ks.numel()).tolist() == ks.tolist()
            hid, seg, pos = hid[keep], seg[keep], pos[keep]


def test_budget_one_keeps_everything_unchanged():
    g = torch.Generator().manual_seed(1)
    F = torch.randn(6, 4, 4, 16, generator=g).to(torch.bfloat16)
    F[3] = F[2]                              # identical frames must not be merged at b = 1
    for mode in ("full", "input_only"):
        cfg = HieraVidConfig(budget=1.0, mode=mode)
        res = prune_input_stage(F, torch.randn(16, generator=g), cfg)
        N = F.shape[0] * 16
        assert res.kept_indices.tolist() == list(range(N))
        assert torch.equal(res.features, F.reshape(N, 16))
        assert res.schedule.counts == (N,) * 4
    hid = torch.randn(10, 8, generator=g)
    keep = select_layer_stage(hid, torch.randn(8), torch.zeros(10, dtype=torch.long), 10,
                              HieraVidConfig(budget=1.0), use_dpp=True)
    assert keep.tolist() == list(range(10))


def test_input_only_without_instruction_and_full_mode_merge_only():
    g = torch.Generator().manual_seed(2)
    F = torch.randn(8, 3, 3, 8, generator=g)
    F[1:4] = F[0] + 0.01 * torch.randn(3, 3, 3, 8, generator=g)
    full = prune_input_stage(F, None, HieraVidConfig(budget=0.3))
    assert full.kept_indices.numel() == 72 - full.schedule.merge_count
    assert torch.equal(full.kept_indices, full.merge.flat_indices)
    io = prune_input_stage(F, None, HieraVidConfig(budget=0.3, mode="input_only"))
    assert io.kept_indices.numel() == round(0.3 * 72)
    # kept tokens are a subset of the merged tokens, with their merged features
    pos = {int(v): k for k, v in enumerate(io.merge.flat_indices)}
    for k, idx in enumerate(io.kept_indices.tolist()):
        assert torch.equal(io.features[k], io.merge.features[pos[idx]])
    # deterministic
    io2 = prune_input_stage(F, None, HieraVidConfig(budget=0.3, mode="input_only"))
    assert torch.equal(io.kept_indices, io2.kept_indices)


def test_bad_inputs():
    with pytest.raises(ValueError):
        prune_input_stage(torch.randn(4, 4, 8), None, HieraVidConfig())
    with pytest.raises(ValueError):
        select_layer_stage(torch.randn(5, 4), None, torch.zeros(5, dtype=torch.long), 6,
                           HieraVidConfig())
