"""Batched greedy MAP (Chen et al. 2018): Triton kernels vs core reference.

Selections must be identical (same stop rule, fallback, lowest-index tie-break) on these
well-conditioned random inputs, including rank-deficient kernels (C < n, duplicated tokens, an
all-zero segment) where the stop rule and the fallback order decide.
"""
import warnings

import pytest
import torch

import hieravid_kernels as hk
from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core import dpp as ref

pytestmark = pytest.mark.interpreter


def _segments(S, n_max, gen, one_token=True):
    lengths = torch.randint(1, n_max + 1, (S,), generator=gen)
    lengths[0] = n_max
    if one_token and S > 2:
        lengths[2] = 1
    ks = (torch.rand(S, generator=gen) * (lengths + 1)).long().clamp(max=lengths)
    ks[0] = lengths[0]                  # k = n
    if S > 1:
        ks[1] = 0                       # k = 0
    return lengths, ks


def _valid(sel, lengths, ks):
    for s in range(sel.shape[0]):
        k = int(ks[s])
        row = sel[s]
        assert (row[k:] == -1).all()
        picks = row[:k]
        assert ((picks >= 0) & (picks < lengths[s])).all()
        assert picks.unique().numel() == k


def _compare(H, lengths, ks, materialize, **kw):
    block_n = kw.pop("block_n", None)
    with hk.poisoned_outputs():
        got = hk.greedy_map_batched(H, lengths, ks, materialize=materialize, backend="triton",
                                    block_n=block_n, **kw)
    want = ref.greedy_map_batched(H, lengths, ks, materialize=materialize, **kw)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), f"\n{got}\n{want}\nlengths={lengths} ks={ks}"
    _valid(got, lengths, ks)
    return got


@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "on_the_fly"])
@pytest.mark.parametrize("S,n_max,C,dtype,weighted,block_n", [
    (3, 20, 24, torch.float32, True, None),
    (5, 37, 19, torch.bfloat16, True, 16),    # C < n: rank deficient -> stop rule + fallback
    (4, 45, 64, torch.float16, False, 16),    # three candidate chunks
    (6, 3, 5, torch.float32, True, None),     # tiny segments, one-token segments
])
def test_greedy_batched_matches_reference(S, n_max, C, dtype, weighted, block_n, materialize,
                                          gen):
    lengths, ks = _segments(S, n_max, gen)
    H = torch.randn(S, n_max, C, generator=gen).to(dtype)
    w = torch.rand(S, n_max, generator=gen) if weighted else None
    _compare(H, lengths, ks, materialize, weights=w, block_n=block_n)


@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "on_the_fly"])
def test_greedy_duplicated_tokens(materialize, gen):
    S, n_max, C = 3, 24, 40
    lengths, ks = _segments(S, n_max, gen, one_token=False)
    H = torch.randn(S, n_max, C, generator=gen)
    H[:, 1::2] = H[:, 0::2]            # every token twice: ties in d^2, rank n/2
    H[:, 7] = H[:, 3]
    w = torch.rand(S, n_max, generator=gen)
    w[:, 1::2] = w[:, 0::2]
    sel = _compare(H.to(torch.bfloat16), lengths, ks, materialize, weights=w, block_n=16)
    assert sel.shape[1] == n_max


@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "on_the_fly"])
def test_greedy_near_ties_across_chunks(materialize, gen):
    """Second half = first half scaled by (1 + 1e-6): every pick is a near-tie (within the
    rel_eps tolerance) between a token and its slightly larger copy in a later chunk; the
    lowest index must win (the kernel's rescan path), as in the reference."""
    S, half, C = 2, 20, 48
    n_max = 2 * half
    H = torch.randn(S, half, C, generator=gen)
    H = torch.cat([H, H * (1 + 1e-6)], dim=1)
    w = torch.rand(S, half, generator=gen) * 0.5 + 0.5
    w = torch.cat([w, w], dim=1)
    lengths = torch.tensor([n_max, n_max - 3])
    ks = torch.tensor([half + 4, half // 2])
    sel = _compare(H, lengths, ks, materialize, weights=w, block_n=16)
    assert (sel[0, :half] < half).all()          # originals before copies


def test_greedy_zero_segment_and_fallback_scores(gen):
    S, n_max, C = 4, 18, 12
    lengths = torch.tensor([18, 9, 13, 1])
    ks = torch.tensor([18, 9, 5, 1])
    H = torch.randn(S, n_max, C, generator=gen)
    H[1] = 0.0                          # all-zero kernel: no greedy pick, fallback only
    fb = torch.rand(S, n_max, generator=gen)
    fb[:, 4:8] = 0.5                    # ties in the fallback order: lowest index first
    w = torch.rand(S, n_max, generator=gen)
    _compare(H, lengths, ks, True, weights=w, fallback_scores=fb)
    _compare(H, lengths, ks, False, weights=w, fallback_scores=fb)
    _compare(H, lengths, ks, True, weights=w)        # default fallback: the diagonal
    _compare(H, lengths, ks, True, scale=0.37, eps=1e-3)


def test_greedy_all_k_zero_and_empty():
    H = torch.randn(3, 5, 4)
    out = hk.greedy_map_batched(H, torch.tensor([5, 2, 1]), torch.zeros(3, dtype=torch.long),
                                backend="triton")
    assert out.shape == (3, 0)
    with pytest.raises(ValueError):
        hk.greedy_map_batched(H, torch.tensor([5, 2, 1]), torch.tensor([1, 3, 0]),
                              backend="triton")


@pytest.mark.parametrize("n,rank", [(15, 15), (23, 6)])
def test_greedy_map_explicit_kernel(n, rank, gen):
    V = torch.randn(n, rank, generator=gen)
    L = V @ V.T / rank
    fb = torch.rand(n, generator=gen)
    for k in (0, 1, n // 2, n):
        with hk.poisoned_outputs():
            got = hk.greedy_map(L, k, backend="triton")
            got_fb = hk.greedy_map(L, k, fallback_scores=fb, backend="triton")
        assert torch.equal(got, ref.greedy_map(L, k)), (k, got, ref.greedy_map(L, k))
        assert torch.equal(got_fb, ref.greedy_map(L, k, fallback_scores=fb))
    sel = hk.greedy_map_explicit_triton(L.unsqueeze(0), torch.tensor([n]), torch.tensor([n]),
                                        block_n=16, block_s=4)
    assert torch.equal(sel[0], ref.greedy_map(L, n))


@pytest.mark.parametrize("kernel", ["dot", "cosine"])
@pytest.mark.parametrize("use_dpp", [True, False])
def test_frame_level_select_matches_core(kernel, use_dpp, gen):
    n, C = 70, 32
    hidden = torch.randn(n, C, generator=gen).to(torch.bfloat16)
    query = torch.randn(C, generator=gen)
    seg = torch.sort(torch.randint(0, 4, (n,), generator=gen)).values
    cfg = HieraVidConfig(dpp_kernel=kernel)
    for target in (0, 1, 23, n):
        got = hk.frame_level_select(hidden, query, seg, target, cfg, use_dpp=use_dpp,
                                    backend="triton")
        want = ref.frame_level_select(hidden, query, seg, target, cfg, use_dpp=use_dpp)
        assert torch.equal(got, want), (target, got, want)


def test_greedy_dispatch_cpu_uses_reference(gen):
    H = torch.randn(2, 6, 5, generator=gen)
    lengths, ks = torch.tensor([6, 4]), torch.tensor([3, 4])
    want = ref.greedy_map_batched(H, lengths, ks)
    assert torch.equal(hk.greedy_map_batched(H, lengths, ks), want)
    H64 = H.double()   # float64 state: always the reference
    assert torch.equal(hk.greedy_map_batched(H64, lengths, ks, backend="triton"),
                       ref.greedy_map_batched(H64, lengths, ks))


def test_greedy_many_dispatch(gen, monkeypatch):
    """``hk.greedy_map_batched_many``: each call gets what the reference gives it alone.
    Forced to Triton, a float32 call is one Triton launch and a float64 call goes to the
    reference; on CPU tensors by default every call goes to the reference's batched path
    (length buckets across calls) and no Triton launch happens."""
    import hieravid_kernels.dpp as kd
    launches = []
    real = kd.greedy_map_batched_triton
    monkeypatch.setattr(kd, "greedy_map_batched_triton",
                        lambda *a, **kw: launches.append(a[0].dtype) or real(*a, **kw))
    calls = []
    for i, (S, n_max, C, dt) in enumerate([(3, 12, 8, torch.float32), (2, 9, 8, torch.float64),
                                           (4, 15, 8, torch.float32)]):
        lengths, ks = _segments(S, n_max, gen)
        calls.append(ref.GreedyCall(torch.randn(S, n_max, C, generator=gen, dtype=dt),
                                    lengths, ks, torch.rand(S, n_max, generator=gen,
                                                            dtype=dt) + 0.5))
    want = [ref.greedy_map_batched(c.features, c.lengths, c.ks, c.weights) for c in calls]
    with hk.poisoned_outputs():
        got = hk.greedy_map_batched_many(calls, backend="triton")
    assert launches == [torch.float32, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    launches.clear()
    got = hk.greedy_map_batched_many(calls)
    assert launches == [] and all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------------------------------
# experimental multi-program kernel (``split``): each segment over several programs
# ------------------------------------------------------------------------------------------
def _split_case(kind, gen):
    S, n_max, C = 3, 40, 24
    lengths = torch.tensor([40, 23, 1])
    ks = torch.tensor([40, 9, 1])
    H = torch.randn(S, n_max, C, generator=gen)
    w = torch.rand(S, n_max, generator=gen) * 0.5 + 0.5
    fb = None
    if kind == "dup":                    # rank deficient: stop rule + fallback, exact ties
        H[:, 1::2] = H[:, 0::2]
        w[:, 1::2] = w[:, 0::2]
    elif kind == "near_tie":             # copies in another program's range, within the tie
        H[:, 20:] = H[:, :20] * (1 + 1e-6)
        w[:, 20:] = w[:, :20]
    elif kind == "zero_fb":
        H[1] = 0.0
        fb = torch.rand(S, n_max, generator=gen)
    return H, lengths, ks, w, fb


@pytest.mark.parametrize("kind", ["plain", "dup", "near_tie", "zero_fb"])
def test_greedy_split_single_program(kind, gen):
    """The multi-program kernel with one program per segment (barriers with one participant)."""
    H, lengths, ks, w, fb = _split_case(kind, gen)
    with hk.poisoned_outputs():
        got = hk.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                    backend="triton", split=1, block_n=16)
    want = ref.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb)
    assert torch.equal(got, want), f"\n{got}\n{want}"


@pytest.mark.parametrize("kind,split", [("plain", 3), ("dup", 2), ("near_tie", 2),
                                        ("zero_fb", 3)])
def test_greedy_split_concurrent_programs(kind, split, gen):
    """Several programs per segment, run concurrently (one thread each) under the interpreter:
    the per-step barrier, the published slots and the cross-program tie rule."""
    from _concurrent import available, concurrent_programs
    if not available():
        pytest.skip("interpreter internals changed")
    H, lengths, ks, w, fb = _split_case(kind, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no fallback allowed here
        with hk.poisoned_outputs(), concurrent_programs():
            got = hk.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                        backend="triton", split=split, block_n=16,
                                        max_spins=10 ** 8)
    want = ref.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb)
    assert torch.equal(got, want), f"\n{got}\n{want}"


def test_default_split_policy(monkeypatch):
    """No ``split`` given: the multi-program kernel on CUDA, one program per segment on CPU (the
    interpreter runs programs one after another); HIERAVID_DPP_SPLIT overrides, bad values
    raise naming it."""
    from hieravid_kernels.dpp import default_split
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("HIERAVID_DPP_SPLIT", raising=False)
    assert default_split(cuda) == "auto" and default_split(cpu) is None
    for raw, want in [("off", None), ("AUTO", "auto"), (" 3 ", 3), ("1", 1), ("", "auto")]:
        monkeypatch.setenv("HIERAVID_DPP_SPLIT", raw)
        assert default_split(cuda) == want, raw
    for raw in ("0", "-2", "fast", "2.5"):
        monkeypatch.setenv("HIERAVID_DPP_SPLIT", raw)
        with pytest.raises(ValueError, match="HIERAVID_DPP_SPLIT"):
            default_split(cpu)


def test_split_env_reaches_the_launch(gen, monkeypatch):
    """HIERAVID_DPP_SPLIT=2 on CPU tensors: the default launch is the multi-program kernel
    (under the interpreter its programs cannot all run, so the bounded spin falls back with a
    warning) and the result is still the reference's."""
    import hieravid_kernels.dpp_coop as coop
    H, lengths, ks, w, fb = _split_case("plain", gen)
    calls = []
    real = coop.launch_coop
    monkeypatch.setattr(coop, "launch_coop", lambda *a, **k: calls.append(a[8]) or real(
        *a, **{**k, "max_spins": 8}))
    monkeypatch.setenv("HIERAVID_DPP_SPLIT", "2")
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = hk.greedy_map_batched(H, lengths, ks, weights=w, backend="triton", block_n=16)
    assert calls == [2]
    assert torch.equal(got, ref.greedy_map_batched(H, lengths, ks, weights=w))


def test_greedy_split_timeout_falls_back(gen):
    """Programs that cannot all run at once (the interpreter runs them one after another):
    bounded spin, flag, warning, and the single-program result."""
    H, lengths, ks, w, fb = _split_case("plain", gen)
    with pytest.warns(RuntimeWarning, match="falling back"):
        with hk.poisoned_outputs():
            got = hk.greedy_map_batched(H, lengths, ks, weights=w, backend="triton", split=2,
                                        block_n=16, max_spins=8)
    assert torch.equal(got, ref.greedy_map_batched(H, lengths, ks, weights=w))


def test_frame_level_select_many_matches_core(gen):
    """The videos of a boundary through the Triton greedy (one read for all of them, the
    greedy launched without any read-back) keep what the core keeps for each alone."""
    from hieravid_vllm.core.dpp import StageInput
    inputs = []
    for i, (n, M, target) in enumerate([(70, 4, 23), (31, 2, 9), (12, 3, 12), (50, 1, 20)]):
        seg = torch.sort(torch.randint(0, M, (n,), generator=gen)).values
        inputs.append(StageInput(torch.randn(n, 32, generator=gen).to(torch.bfloat16),
                                 torch.randn(32, generator=gen), seg, target, HieraVidConfig(),
                                 use_dpp=i != 1, num_segments=M,
                                 lengths=torch.bincount(seg, minlength=M)))
    with hk.poisoned_outputs():
        got = hk.frame_level_select_many(inputs, backend="triton")
    for inp, (keep, counts) in zip(inputs, got):
        want = ref.frame_level_select(inp.hidden, inp.query, inp.segment_ids, inp.target,
                                      inp.config, use_dpp=inp.use_dpp,
                                      num_segments=inp.num_segments)
        assert torch.equal(keep, want)
        assert counts.tolist() == torch.bincount(inp.segment_ids[keep],
                                                 minlength=inp.num_segments).tolist()


@pytest.mark.parametrize("split,spins", [(2, 8), (1, 64)])
def test_greedy_split_without_flag_read(split, spins, gen):
    """``read_flag=False`` (the serving path's stages): the host never reads the
    multi-program kernel's flag. Programs that cannot all run at once (split 2 under the
    interpreter, bounded spin): the single-program fallback, launched behind it, runs on the
    device flag and gives the reference's picks, with no warning. Programs that can (split
    1): the fallback launch does nothing, the multi-program result stands."""
    import hieravid_kernels.dpp as kdpp
    H, lengths, ks, w, fb = _split_case("plain", gen)
    launches = []
    real = kdpp._launch_greedy
    kdpp_launch = lambda *a, **k: launches.append(k.get("run_if")) or real(*a, **k)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with hk.poisoned_outputs(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(kdpp, "_launch_greedy", kdpp_launch)
            got = hk.greedy_map_batched(H, lengths, ks, weights=w, fallback_scores=fb,
                                        backend="triton", split=split, block_n=16,
                                        max_spins=spins, read_flag=False)
    assert len(launches) == 1 and launches[0] is not None
    assert bool(launches[0].item()) == (split == 2)     # the flag, read here by the test
    assert torch.equal(got, ref.greedy_map_batched(H, lengths, ks, weights=w,
                                                   fallback_scores=fb))
