"""The greedy MAP rule shared by the core reference and the Triton kernels (hieravid_vllm.core.dpp
module docstring): tie band, stop rule, fallback with non-finite gains and scores.

* Outside the band the rule is exact greedy: on well-conditioned fp32 inputs the core (fp32
  state, band 1e-5 x max L_ii) and the kernel pick what a brute-force float64 log-det greedy
  picks.
* Inside the band it deliberately is not: a gain smaller by less than the band at a lower index
  wins. Checked on designed gaps just inside and just outside the band against a float64
  brute force that applies the documented band rule.
* Fallback: with -inf / NaN / +inf gains or fallback scores no already selected (or padding)
  index is ever returned; the order is the documented one (unselected, score descending, NaN as
  -inf, ties lowest index), checked against a plain Python sort.
"""
import math

import numpy as np
import pytest
import torch

import hieravid_kernels as hk
from hieravid_vllm.core import dpp as ref

interp = pytest.mark.interpreter
REL = ref.default_rel_eps(torch.float32)


# ------------------------------------------------------------------------------------------
# float64 brute force (log det over subsets, no Cholesky)
# ------------------------------------------------------------------------------------------
def _gains64(L, sel):
    """exp(log det L_{S+i} - log det L_S) for every i not in S (the greedy's d_i^2)."""
    L = np.asarray(L, dtype=np.float64)
    base = np.linalg.slogdet(L[np.ix_(sel, sel)])[1] if sel else 0.0
    out = {}
    for i in range(L.shape[0]):
        if i in sel:
            continue
        s, v = np.linalg.slogdet(L[np.ix_(sel + [i], sel + [i])])
        out[i] = math.exp(v - base) if s > 0 else 0.0
    return out


def brute_greedy64(L, k, band=0.0):
    """Greedy on log det in float64: each step the lowest index whose gain is >= max - band
    (band 0: exact greedy). Also returns the smallest gap, over the steps, between the max
    gain and the largest gain outside [max - band, max] (how well conditioned the input is)."""
    sel, min_gap = [], math.inf
    for _ in range(k):
        g = _gains64(L, sel)
        mx = max(g.values())
        j = min(i for i, v in g.items() if v >= mx - band)
        rest = [v for i, v in g.items() if v < mx - band]
        if rest:
            min_gap = min(min_gap, mx - band - max(rest))
        sel.append(j)
    return sel, min_gap


def _well_conditioned(n, C, k, gen, tries=20):
    """fp32 features H (n, C) with weights whose float64 greedy (k steps) never has a runner-up
    gain within 10 bands of the max: redrawn until so (C > n: full rank)."""
    for _ in range(tries):
        H = torch.randn(n, C, generator=gen)
        w = torch.rand(n, generator=gen) * 0.8 + 0.2
        L64 = ref.dpp_kernel(H.double(), w.double()).numpy()
        band = REL * float(np.diag(L64).max())
        sel, gap = brute_greedy64(L64, k)
        if gap > 10 * band and min(_gains64(L64, sel[:-1]).values()) >= 0:
            return H, w, sel
    raise AssertionError("no well-conditioned draw")


# ------------------------------------------------------------------------------------------
# band: exact greedy outside it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,C,k", [(16, 40, 10), (23, 64, 12)])
def test_core_fp32_band_matches_float64_exact_greedy(n, C, k, gen):
    H, w, want = _well_conditioned(n, C, k, gen)
    L32 = ref.dpp_kernel(H, w)
    assert L32.dtype == torch.float32
    assert ref.greedy_map(L32, k).tolist() == want
    # the batched reference (kernel rows from the features) on the same segment
    sel = ref.greedy_map_batched(H.unsqueeze(0), torch.tensor([n]), torch.tensor([k]),
                                 weights=w.unsqueeze(0))
    assert sel[0].tolist() == want


@interp
@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "on_the_fly"])
def test_kernel_band_matches_float64_exact_greedy(materialize, gen):
    n, C, k = 19, 48, 11
    H, w, want = _well_conditioned(n, C, k, gen)
    with hk.poisoned_outputs():
        sel = hk.greedy_map_batched(H.unsqueeze(0), torch.tensor([n]), torch.tensor([k]),
                                    weights=w.unsqueeze(0), materialize=materialize,
                                    backend="triton")
    assert sel[0].tolist() == want


# ------------------------------------------------------------------------------------------
# band: the documented deviation inside it
# ------------------------------------------------------------------------------------------
def _band_case(frac):
    """Explicit fp32 kernel of 5 orthogonal-ish tokens where token 3's gain exceeds token 1's by
    ``frac`` bands at the first step (all other gains far lower)."""
    d = np.array([0.2, 1.0, 0.3, 0.0, 0.5])
    d[3] = 1.0 / (1.0 - frac * REL)          # max L_ii = d[3]; gap d[3] - d[1] = frac * band
    L = np.diag(d).astype(np.float32)
    L[0, 2] = L[2, 0] = 0.05
    return torch.from_numpy(L)


@pytest.mark.parametrize("frac,first", [(0.5, 1), (2.0, 3)], ids=["inside", "outside"])
def test_band_rule_lowest_index_inside_band(frac, first):
    L = _band_case(frac)
    L64 = L.double().numpy()
    band = REL * float(L64.diagonal().max())
    exact, _ = brute_greedy64(L64, 5)
    banded, _ = brute_greedy64(L64, 5, band=band)
    assert exact[0] == 3                              # exact greedy: the larger gain
    assert banded[0] == first                         # documented rule
    assert ref.greedy_map(L, 5).tolist() == banded
    sel = ref.greedy_map_batched(torch.from_numpy(np.linalg.cholesky(L64 + 0.0)).float()
                                 .unsqueeze(0), torch.tensor([5]), torch.tensor([5]), scale=1.0)
    assert sel[0, 0].item() == first


@interp
@pytest.mark.parametrize("frac,first", [(0.5, 1), (2.0, 3)], ids=["inside", "outside"])
def test_kernel_band_rule(frac, first):
    L = _band_case(frac)
    with hk.poisoned_outputs():
        got = hk.greedy_map(L, 5, backend="triton")
    assert got.tolist() == ref.greedy_map(L, 5).tolist()
    assert got[0].item() == first


# ------------------------------------------------------------------------------------------
# fallback with non-finite gains / scores
# ------------------------------------------------------------------------------------------
def _python_fallback(scores, taken, n):
    """Documented fallback order: unselected, score descending (NaN as -inf), lowest index."""
    key = [(-(s if s == s else -math.inf), i) for i, s in enumerate(scores[:n])]
    return [i for _, i in sorted(key) if i not in taken]


def _assert_valid(sel, n, k):
    sel = sel.tolist()
    assert len(sel) == k and len(set(sel)) == k, sel
    assert all(0 <= i < n for i in sel), sel


NONFINITE_SCORES = {
    "nan": [float("nan")] * 6,
    "-inf": [float("-inf")] * 6,
    "mixed": [float("nan"), 0.3, float("-inf"), float("inf"), float("nan"), 0.3],
}


def _rank1(n=6):
    v = torch.tensor([0.5, 1.0, 0.7, 2.0, 0.1, 0.9])[:n]
    return torch.outer(v, v)          # rank 1: one greedy pick (token 3), then the fallback


@pytest.mark.parametrize("kind", list(NONFINITE_SCORES))
def test_core_fallback_nonfinite_scores_never_repeat(kind):
    L = _rank1()
    fb = torch.tensor(NONFINITE_SCORES[kind])
    got = ref.greedy_map(L, 6, fallback_scores=fb)
    _assert_valid(got, 6, 6)
    assert got[0].item() == 3
    assert got[1:].tolist() == _python_fallback(fb.tolist(), {3}, 6)


@pytest.mark.parametrize("kind", list(NONFINITE_SCORES))
def test_core_batched_fallback_nonfinite_scores(kind, gen):
    """Padding tokens must not be picked either (their weight is 0, their score anything)."""
    S, n_max, C = 3, 6, 1
    H = torch.rand(S, n_max, C, generator=gen) + 0.5         # C = 1: rank 1 per segment
    lengths, ks = torch.tensor([6, 4, 5]), torch.tensor([6, 4, 3])
    fb = torch.tensor(NONFINITE_SCORES[kind]).repeat(S, 1)
    sel = ref.greedy_map_batched(H, lengths, ks, fallback_scores=fb)
    for s in range(S):
        n, k = int(lengths[s]), int(ks[s])
        _assert_valid(sel[s, :k], n, k)
        first = sel[s, 0].item()
        assert sel[s, 1:k].tolist() == _python_fallback(fb[s].tolist(), {first}, n)[: k - 1]


def _nonfinite_gain_kernels():
    """Explicit kernels whose gains become non-finite: NaN / -inf / +inf on the diagonal
    (initial gains), NaN in a row (a gain turns NaN after the first pick)."""
    base = _rank1() + torch.eye(6) * 0.05
    out = {}
    L = base.clone()
    L[2, 2] = float("nan")
    out["nan_diag"] = L
    L = base.clone()
    L[4, 4] = float("-inf")
    out["-inf_diag"] = L
    L = base.clone()
    L[5, 5] = float("inf")
    out["+inf_diag"] = L
    L = base.clone()
    L[3, 1] = L[1, 3] = float("nan")           # token 3 is picked first: gain of 1 -> NaN
    out["nan_row"] = L
    return out


@pytest.mark.parametrize("case", list(_nonfinite_gain_kernels()))
def test_core_nonfinite_gains_stop_and_fall_back(case):
    L = _nonfinite_gain_kernels()[case]
    for k in (3, 6):
        got = ref.greedy_map(L, k)
        _assert_valid(got, 6, k)
        taken = got.tolist()
        if case == "nan_row":                  # greedy pick 3, then the NaN gain stops it
            assert taken[0] == 3
            assert taken[1:] == _python_fallback(torch.diagonal(L).tolist(), {3}, 6)[: k - 1]
        else:                                  # stops at once: fallback on the diagonal
            assert taken == _python_fallback(torch.diagonal(L).tolist(), set(), 6)[:k]


@interp
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("case", list(_nonfinite_gain_kernels()))
def test_kernel_nonfinite_gains_match_core(case):
    L = _nonfinite_gain_kernels()[case]
    fb = torch.tensor(NONFINITE_SCORES["mixed"])
    for k in (3, 6):
        with hk.poisoned_outputs():
            got = hk.greedy_map(L, k, backend="triton")
            got_fb = hk.greedy_map(L, k, fallback_scores=fb, backend="triton")
        _assert_valid(got, 6, k)
        _assert_valid(got_fb, 6, k)
        assert torch.equal(got, ref.greedy_map(L, k)), (got, ref.greedy_map(L, k))
        assert torch.equal(got_fb, ref.greedy_map(L, k, fallback_scores=fb))


@interp
@pytest.mark.parametrize("kind", list(NONFINITE_SCORES))
@pytest.mark.parametrize("split", [None, 1], ids=["single", "split"])
def test_kernel_batched_fallback_nonfinite_scores(kind, split, gen):
    S, n_max, C = 3, 6, 1
    H = torch.rand(S, n_max, C, generator=gen) + 0.5
    lengths, ks = torch.tensor([6, 4, 5]), torch.tensor([6, 4, 3])
    fb = torch.tensor(NONFINITE_SCORES[kind]).repeat(S, 1)
    kw = {} if split is None else {"split": split}
    with hk.poisoned_outputs():
        got = hk.greedy_map_batched(H, lengths, ks, fallback_scores=fb, backend="triton",
                                    block_n=16, **kw)
    assert torch.equal(got, ref.greedy_map_batched(H, lengths, ks, fallback_scores=fb))


# ------------------------------------------------------------------------------------------
# the reference's two CPU layouts: padded batch vs one segment at a time (the CPU default)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("materialize", [None, True, False])
def test_core_per_segment_equals_padded_batch(materialize, gen):
    S, n_max, C = 6, 33, 20
    lengths = torch.randint(1, n_max + 1, (S,), generator=gen)
    lengths[0], lengths[2] = n_max, 1
    ks = (torch.rand(S, generator=gen) * (lengths + 1)).long().clamp(max=lengths)
    ks[0], ks[1] = lengths[0], 0
    H = torch.randn(S, n_max, C, generator=gen).to(torch.bfloat16)
    w = torch.rand(S, n_max, generator=gen)
    fb = torch.rand(S, n_max, generator=gen)
    kw = dict(weights=w, fallback_scores=fb, materialize=materialize)
    padded = ref.greedy_map_batched(H, lengths, ks, per_segment=False, **kw)
    assert torch.equal(ref.greedy_map_batched(H, lengths, ks, per_segment=True, **kw), padded)
    assert torch.equal(ref.greedy_map_batched(H, lengths, ks, **kw), padded)   # CPU default
    for s in range(S):       # and each segment alone, against its explicit kernel
        n, k = int(lengths[s]), int(ks[s])
        L = ref.dpp_kernel(H[s, :n], w[s, :n])
        assert padded[s, :k].tolist() == ref.greedy_map(L, k, fallback_scores=fb[s, :n]).tolist()
