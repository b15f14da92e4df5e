"""Budget schedule (Eq. 11) and segment budget allocation (Eq. 4-5)."""
import random

import numpy as np
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.schedule import (_reconcile_shift, allocate_segment_counts, build_schedule,
                                         segment_counts, segment_scores, stage_retention)


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("layers", [[7, 7, 7, 7], [8, 8, 8, 8], [3, 10, 6, 13], [28], [14, 14]])
def test_retention_defining_properties(budget, layers):
    q = 0.65
    rho = stage_retention(budget, layers, q)
    w = np.array(layers) / sum(layers)
    assert abs(float(np.dot(w, rho)) - budget) < 1e-12       # layer-weighted mean = budget
    assert all(0 < r <= 1 for r in rho)
    assert all(b <= a + 1e-15 for a, b in zip(rho, rho[1:]))  # more early, fewer late
    for a, b in zip(rho, rho[1:]):                          # geometric where not capped
        if a < 1:
            assert abs(b / a - q) < 1e-12
    assert stage_retention(budget, layers, 1.0) == pytest.approx([budget] * len(layers))


def test_retention_explicit_merge_ratio():
    rho = stage_retention(0.3, [7, 7, 7, 7], 0.65, merge_ratio=0.5)
    assert rho[0] == 0.5 and abs(sum(rho) / 4 - 0.3) < 1e-12
    with pytest.raises(ValueError, match="merge_ratio"):
        stage_retention(0.3, [7, 7, 7, 7], 0.65, merge_ratio=0.8)   # keeps < budget
    with pytest.raises(ValueError, match="merge_ratio"):
        stage_retention(0.2, [7, 7, 7, 7], 0.65, merge_ratio=0.1)   # stage 1 alone > budget


def test_schedule_exact_counts_random():
    rnd = random.Random(0)
    for _ in range(300):
        b = rnd.choice([rnd.uniform(0.01, 1.0), 0.1, 0.2, 0.3, 1.0])
        n_stages = rnd.randint(1, 6)
        L = rnd.choice([28, 32, 24, 40])
        cfg = HieraVidConfig(budget=b, num_stages=n_stages, stage_decay=rnd.uniform(0.3, 1.0))
        N = rnd.randint(0, 20000)
        T = rnd.randint(1, 64)
        max_merge = (T - 1) * max(N // T, 1) if rnd.random() < 0.3 else None
        s = build_schedule(cfg, N, L, max_merge=max_merge)
        K = int(np.floor((1 - s.retention[0]) * N + 0.5))
        if max_merge is not None:
            K = min(K, max_merge)
        assert s.merge_count == K and s.counts[0] == N - K
        assert len(s.counts) == n_stages and sum(s.layers_per_stage) == L
        assert all(b2 <= a for a, b2 in zip(s.counts, s.counts[1:]))
        for r, c in zip(s.retention[1:], s.counts[1:]):
            assert abs(c - r * N) <= 1 or (N and c == 1 and r * N < 1)
        if max_merge is None and N:
            # within 1 token per stage of the budget
            assert abs(s.layer_mean_share() - b) <= 1.0 / N
        assert len(s.tokens_per_layer()) == L


def test_schedule_budget_one_and_input_only():
    s = build_schedule(HieraVidConfig(budget=1.0), 10816)
    assert s.counts == (10816,) * 4 and s.merge_count == 0
    s = build_schedule(HieraVidConfig(budget=0.3, mode="input_only"), 10816)
    assert s.counts == (3245,) * 4 and s.input_target == 3245
    assert 10816 - s.merge_count >= 3245
    s = build_schedule(HieraVidConfig(budget=0.3), 10816)
    assert s.boundaries == (0, 7, 14, 21)
    assert s.uses_dpp == (False, False, True, True)
    assert s.counts == (5530, 3594, 2336, 1519)


def _np_scores(g, lam):
    """Eq. 4 for interior segments as printed (sums of neighbour features)."""
    M = g.shape[0]
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    out = {}
    for m in range(1, M - 1):
        gl, gr = g[:m].sum(0), g[m + 1:].sum(0)
        out[m] = lam * cos(g[m], gr) + (1 - lam) * (1 - cos(g[m], gl))
    return out


def test_segment_scores_eq4():
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for lam in (0.0, 0.5, 1.0):
        b = segment_scores(g, lam, "zero")
        ref = _np_scores(g.numpy(), lam)
        for m, v in ref.items():
            assert abs(float(b[m]) - v) < 1e-12
        # zero: missing neighbour sum is the zero vector -> cosine 0
        gn = g.numpy()
        c = lambda a, bb: float(a @ bb / (np.linalg.norm(a) * np.linalg.norm(bb)))
        assert abs(float(b[0]) - (lam * c(gn[0], gn[1:].sum(0)) + (1 - lam))) < 1e-12
        assert abs(float(b[-1]) - (1 - lam) * (1 - c(gn[-1], gn[:-1].sum(0)))) < 1e-12
        bn = segment_scores(g, lam, "neutral")
        for m in ref:
            assert abs(float(bn[m]) - ref[m]) < 1e-12
    assert segment_scores(g[:1], 0.5).tolist() == [0.5]
    b2 = segment_scores(g[:2], 0.5, "neutral")
    assert abs(float(b2[0] - b2[1])) < 1e-12     # two segments: symmetric, no deviation


def _check_alloc(counts, lengths, target):
    assert int(counts.sum()) == target
    assert (counts >= 0).all() and (counts <= lengths).all()


def test_allocate_exact_random():
    rnd = random.Random(1)
    for _ in range(400):
        M = rnd.randint(1, 12)
        lengths = torch.tensor([rnd.randint(0, 50) for _ in range(M)])
        total = int(lengths.sum())
        target = rnd.randint(0, total)
        keep = torch.tensor([rnd.uniform(-0.5, 1.5) for _ in range(M)], dtype=torch.float64)
        c = allocate_segment_counts(lengths, keep, target)
        _check_alloc(c, lengths, target)
    # equal ratios, exact proportional split: 30% of (10, 20, 30) = (3, 6, 9)
    c = allocate_segment_counts(torch.tensor([10, 20, 30]), torch.full((3,), 0.3), 18)
    assert c.tolist() == [3, 6, 9]
    # largest remainder, ties by lower index: 1/3 of (1, 1, 1) -> 1 token to segment 0
    c = allocate_segment_counts(torch.tensor([1, 1, 1]), torch.full((3,), 1 / 3), 1)
    assert c.tolist() == [1, 0, 0]


def _shift_100_steps(lengths, keep, target):
    """The reconciliation shift as first written: 100 bisection steps, no early stop."""
    import numpy as np
    lf, kr = lengths.double().numpy(), keep.double().numpy()

    def tot(tau):
        return float(np.add.reduce(lf * np.clip(kr + tau, 0.0, 1.0)))
    lo, hi = -1.0 - float(kr.max()), 1.0 - float(kr.min())
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tot(mid) <= target else (lo, mid)
    return lo


def test_shift_estimate_lands_next_to_the_bisection():
    """The piecewise-linear estimate the bisection brackets first (so that it evaluates the
    sum near the crossing only) exists for every allocation here (integer lengths >= 1), lies
    within 1e-9 of the 100-step bisection's shift, and within 512 ulps of it in at least 90%
    of the cases; a wrong slope or piece would be off by far more."""
    from hieravid_vllm.core.schedule import _shift_estimate
    rnd = random.Random(11)
    close = 0
    for i in range(400):
        M = rnd.choice([2, 3, 7, 9, 40])
        lengths = torch.tensor([rnd.randint(1, 900) for _ in range(M)])
        total = int(lengths.sum())
        target = rnd.randint(1, total - 1)
        keep = torch.tensor([rnd.uniform(-0.3, 1.3) for _ in range(M)], dtype=torch.float64)
        tau = _shift_100_steps(lengths, keep, target)
        est = _shift_estimate(lengths.double().numpy(), keep.numpy(), target)
        assert est is not None, i   # integer lengths >= 1: every crossing piece has a slope
        assert abs(est - tau) <= 1e-9 * max(1.0, abs(tau)), (i, est, tau)
        close += abs(est - tau) <= 512 * np.spacing(max(abs(tau), 2.0 ** -20))
    assert close >= 360, close


def test_allocate_stops_bisection_early_with_the_same_shift():
    """The bisection stops once lo / hi are adjacent doubles: the shift is bit for bit the
    one of the full 100 steps, and the counts equal those (recomputed here from the shift of the original loop), for short and long
    segment lists (numpy's pairwise summation from 8 values on) and shifts near 0."""
    rnd = random.Random(5)
    for i in range(600):
        M = rnd.choice([1, 2, 3, 7, 8, 9, 16, 40, 130])
        lengths = torch.tensor([rnd.randint(0, 900) for _ in range(M)])
        total = int(lengths.sum())
        if total < 2:
            continue
        target = rnd.randint(1, total - 1)
        keep = torch.tensor([rnd.uniform(-0.3, 1.3) for _ in range(M)], dtype=torch.float64)
        if i % 5 == 0:       # exact proportional targets: the shift is (close to) 0
            keep = torch.full((M,), target / total, dtype=torch.float64)
        tau = _shift_100_steps(lengths, keep, target)
        assert _reconcile_shift(lengths.double().numpy(), keep.double().numpy(), target) \
            == tau, i                                     # bit for bit
        y = lengths.double() * (keep + tau).clamp(0.0, 1.0)
        base = torch.minimum(torch.floor(y).long(), lengths)
        c = allocate_segment_counts(lengths, keep, target)
        _check_alloc(c, lengths, target)
        # same floors; the remainder goes by the same fractional parts
        assert (c - base).min() >= 0 and (c - base).max() <= 1, (i, c, base)
        frac = (y - base.double())
        r = target - int(base.sum())
        elig = base < lengths
        key = torch.where(elig, -frac, torch.full_like(frac, float("inf")))
        want = base.clone()
        want[torch.sort(key, stable=True).indices[:min(max(r, 0), int(elig.sum()))]] += 1
        if int(want.sum()) == target:
            assert torch.equal(c, want), i


def test_segment_counts_direction_and_edge_cases():
    g = torch.Generator().manual_seed(2)
    C = 8
    # segment 1 repeats segment 0's content (redundant), segment 2 and 3 new content
    base = [torch.randn(C, generator=g) for _ in range(3)]
    contents = [base[0], base[0] + 0.01, base[1], base[2]]
    feats = torch.cat([c + 0.05 * torch.randn(20, C, generator=g) for c in contents])
    seg = torch.arange(4).repeat_interleave(20)
    cfg = HieraVidConfig(r_var=0.2)
    c_keep = segment_counts(feats, seg, 30, cfg)
    c_lit = segment_counts(feats, seg, 30, cfg.model_copy(update={"segment_score_keeps_more": False}))
    _check_alloc(c_keep, torch.full((4,), 20), 30)
    _check_alloc(c_lit, torch.full((4,), 20), 30)
    g_m = torch.stack([feats[seg == m].mean(0) for m in range(4)])
    b = segment_scores(g_m, 0.5)
    order = torch.argsort(b)
    # higher score keeps more (default), fewer with the literal Eq. 5 reading
    assert c_keep[order[-1]] > c_keep[order[0]]
    assert c_lit[order[-1]] < c_lit[order[0]]
    # single segment / no deviation / std = 0 / degenerate targets
    one = torch.zeros(50, dtype=torch.int64)
    assert segment_counts(feats[:50], one, 17, cfg).tolist() == [17]
    same = torch.ones(40, C)
    seg2 = torch.tensor([0] * 10 + [1] * 30)
    assert segment_counts(same, seg2, 20, cfg).tolist() == [5, 15]   # std = 0 -> proportional
    assert segment_counts(feats, seg, 0, cfg).tolist() == [0, 0, 0, 0]
    assert segment_counts(feats, seg, 80, cfg).tolist() == [20] * 4
    assert segment_counts(feats, seg, 30, cfg.model_copy(update={"r_var": 0.0})).tolist() == \
        allocate_segment_counts(torch.full((4,), 20), torch.full((4,), 30 / 80), 30).tolist()


def test_segment_counts_random_exact():
    rnd = random.Random(3)
    for _ in range(60):
        M = rnd.randint(1, 8)
        lens = [rnd.randint(0, 30) for _ in range(M)]
        n = sum(lens)
        if n == 0:
            continue
        seg = torch.repeat_interleave(torch.arange(M), torch.tensor(lens))
        feats = torch.randn(n, 6, generator=torch.Generator().manual_seed(rnd.randint(0, 99)))
        target = rnd.randint(0, n)
        cfg = HieraVidConfig(r_var=rnd.choice([0.0, 0.1, 0.5, 1.0]),
                             missing_neighbor=rnd.choice(["neutral", "zero"]))
        c = segment_counts(feats, seg, target, cfg, num_segments=M)
        _check_alloc(c, torch.tensor(lens), target)


def _torch_segment_counts(features, seg, target, cfg, M):
    """Eq. 4-5 and the reconciliation in torch ops, as first written (a second formulation of
    what ``segment_counts`` now computes in numpy on the host)."""
    lengths = torch.bincount(seg, minlength=M)[:M]
    n = seg.shape[0]
    z = torch.zeros(M, dtype=torch.float64)
    nonempty = lengths > 0
    if int(nonempty.sum()) > 1 and cfg.r_var > 0:
        sums = torch.zeros(M, features.shape[1]).index_add_(0, seg, features.float())
        g = (sums / lengths.clamp_min(1).float().unsqueeze(-1))[nonempty].double()
        csum = torch.cumsum(g, 0)
        g_l, g_r = csum - g, csum[-1:] - csum

        def cos(a, b):
            num, den = (a * b).sum(-1), a.norm(dim=-1) * b.norm(dim=-1)
            return torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.zeros_like(num))
        s_l, s_r = cos(g, g_l), cos(g, g_r)
        if cfg.missing_neighbor == "neutral":
            s_l[0], s_r[-1] = s_l[1:].mean(), s_r[:-1].mean()
        b = cfg.lam * s_r + (1 - cfg.lam) * (1 - s_l)
        std = b.std(correction=0)
        if float(std) > 1e-12:
            z[nonempty] = (b - b.mean()) / std
    keep = target / n + (1.0 if cfg.segment_score_keeps_more else -1.0) * cfg.r_var * z
    lf = lengths.double()
    lo, hi = -1.0 - float(keep.max()), 1.0 - float(keep.min())
    tot = lambda t: float((lf * (keep + t).clamp(0.0, 1.0)).sum())
    if 0 < target < int(lengths.sum()):
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if tot(mid) <= target else (lo, mid)
    else:
        return lengths.clone() if target else torch.zeros_like(lengths)
    y = lf * (keep + lo).clamp(0.0, 1.0)
    base = torch.minimum(torch.floor(y).long(), lengths)
    elig = base < lengths
    key = torch.where(elig, -(y - base.double()), torch.full_like(y, float("inf")))
    give = min(max(target - int(base.sum()), 0), int(elig.sum()))
    base[torch.sort(key, stable=True).indices[:give]] += 1
    return base


def test_segment_counts_equal_the_torch_formulation():
    """The host (numpy) Eq. 4-5 + reconciliation give the counts of the torch formulation, on
    random videos: 1-40 segments (some empty), C 8 or 512, both neighbour rules, both signs."""
    rnd = random.Random(11)
    gen = torch.Generator().manual_seed(11)
    for i in range(300):
        M = rnd.choice([1, 2, 3, 5, 11, 24, 40])
        lens = [rnd.choice([0, 1, 3, 20, 70]) if rnd.random() < 0.3 else rnd.randint(1, 90)
                for _ in range(M)]
        n = sum(lens)
        if n == 0:
            continue
        C = rnd.choice([8, 512])
        seg = torch.repeat_interleave(torch.arange(M), torch.tensor(lens))
        # segment contents around a few shared directions: scores spread, as in a video
        centers = torch.randn(M, C, generator=gen)
        feats = centers[seg] + rnd.choice([0.1, 1.0]) * torch.randn(n, C, generator=gen)
        target = rnd.randint(0, n)
        cfg = HieraVidConfig(r_var=rnd.choice([0.0, 0.1, 0.3, 1.0]),
                             missing_neighbor=rnd.choice(["neutral", "zero"]),
                             segment_score_keeps_more=rnd.random() < 0.8)
        got = segment_counts(feats, seg, target, cfg, num_segments=M)
        want = _torch_segment_counts(feats, seg, target, cfg, M)
        assert torch.equal(got, want), (i, got, want)
