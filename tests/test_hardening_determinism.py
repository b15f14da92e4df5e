"""Tensor parallelism needs every rank to make the same selection (issue #7).

Under tensor parallelism every rank runs the HieraVid selection on the same replicated
features and hidden states; if two ranks kept different tokens their shards would compute on
different sequences. The selection must therefore be a deterministic function of its input:
independent of the number of intra-op threads (which changes how reductions are split), of
the order in which videos are processed, and of which other segments share a batched DPP
call (padding included). Checked here on CPU with the core entry points
(:func:`prune_input_stage`, :func:`select_layer_stage`, :func:`greedy_map_batched`), on
features with structure (scenes, static regions, exact duplicates: ties) and without.
The server-side counterpart (a video's kept tokens are the same alone and batched with
another video in one prompt) is in ``test_hardening_input.py``.

Found and fixed: the per-segment feature sums of Eq. 4-5 (``core.schedule.segment_counts``,
also run by every in-LLM stage) used ``index_add_``, which on CUDA adds with atomics in a
run-dependent order, so two ranks could round differently and allocate different per-segment
counts; on CUDA they are now a one-hot matrix product (``segment_sums``), on CPU
``index_add_`` stays (sequential, deterministic, same numbers as before). Not checked here:
anything on a GPU (no GPU on this machine).
"""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.dpp import greedy_map_batched
from hieravid_vllm.core.pipeline import prune_input_stage, select_layer_stage

LAYERS = 28
THREADS = (1, 2)


def _features(kind: str, seed: int, T: int = 12, H: int = 10, W: int = 10,
              C: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(T, H, W, C, generator=g)
    if kind == "static":  # every frame identical: exact ties everywhere
        return torch.randn(1, H, W, C, generator=g).expand(T, H, W, C).contiguous()
    if kind == "scenes":  # 3 scenes with static backgrounds, a moving blob, small noise
        x = torch.empty(T, H, W, C)
        bounds = [0, T // 3, 2 * T // 3, T]
        for s in range(3):
            bg = torch.randn(1, H, W, C, generator=g)
            x[bounds[s]:bounds[s + 1]] = bg
        blob = torch.randn(C, generator=g) * 3
        for t in range(T):
            i, j = (t * 2) % (H - 2), (t * 3) % (W - 2)
            x[t, i:i + 2, j:j + 2] += blob
        # half of the frames get noise, the other half stay exact copies of their scene
        noise = torch.randn(T, H, W, C, generator=g) * 1e-3
        noise[::2] = 0
        return x + noise
    if kind == "bf16":
        return torch.randn(T, H, W, C, generator=g).to(torch.bfloat16)
    raise ValueError(kind)


def _with_threads(n: int, fn, *args, **kwargs):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(old)


def _same_result(a, b):
    assert torch.equal(a.kept_indices, b.kept_indices)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.thw, b.thw)
    assert torch.equal(a.segment_ids, b.segment_ids)
    assert torch.equal(a.frame_segment_ids, b.frame_segment_ids)


CONFIGS = {
    "input_only_0.3": HieraVidConfig(budget=0.3, mode="input_only"),
    "input_only_0.15": HieraVidConfig(budget=0.15, mode="input_only"),
    "full_0.3": HieraVidConfig(budget=0.3, mode="full"),
}


@pytest.mark.parametrize("kind", ["random", "static", "scenes", "bf16"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_input_stage_independent_of_thread_count(kind, cfg_name):
    feats = _features(kind, seed=len(kind))
    cfg = CONFIGS[cfg_name]
    results = [_with_threads(n, prune_input_stage, feats, None, cfg, num_layers=LAYERS)
               for n in THREADS]
    assert results[0].kept_indices.numel() == results[0].schedule.counts[0]
    for r in results[1:]:
        _same_result(results[0], r)
    # and run to run in one process
    _same_result(results[0], prune_input_stage(feats, None, cfg, num_layers=LAYERS))


def test_input_stage_independent_of_video_order():
    """Several videos (different grids and configs) in one process, in two orders: each
    video's result is the one it gets alone (no state carried between calls)."""
    videos = [(_features("scenes", 1), CONFIGS["input_only_0.3"]),
              (_features("random", 2, T=8, H=6, W=14), CONFIGS["input_only_0.15"]),
              (_features("static", 3, T=6), CONFIGS["input_only_0.3"]),
              (_features("scenes", 4, T=16, H=8, W=8), CONFIGS["full_0.3"])]
    alone = [prune_input_stage(f, None, c, num_layers=LAYERS) for f, c in videos]
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        for i in order:
            f, c = videos[i]
            _same_result(alone[i], _with_threads(2, prune_input_stage, f, None, c,
                                                 num_layers=LAYERS))


@pytest.mark.parametrize("use_dpp", [True, False])
@pytest.mark.parametrize("kind", ["random", "scenes"])
def test_layer_stage_independent_of_thread_count(kind, use_dpp):
    cfg = CONFIGS["full_0.3"]
    inp = prune_input_stage(_features(kind, 7), None, cfg, num_layers=LAYERS)
    g = torch.Generator().manual_seed(11)
    hidden = inp.features + 0.1 * torch.randn(inp.features.shape, generator=g)
    query = torch.randn(hidden.shape[1], generator=g)
    target = max(1, inp.kept_indices.numel() // 2)
    kept = [_with_threads(n, select_layer_stage, hidden, query, inp.segment_ids, target, cfg,
                          use_dpp=use_dpp) for n in THREADS]
    assert kept[0].numel() == target
    for k in kept[1:]:
        assert torch.equal(kept[0], k)


def _batched(feats, lengths, ks, **kw):
    if "per_segment" in inspect.signature(greedy_map_batched).parameters:
        kw.setdefault("per_segment", False)  # the batched path (what a GPU runs)
    return greedy_map_batched(feats, lengths, ks, **kw)


@pytest.mark.parametrize("materialize", [False, True])
def test_batched_dpp_independent_of_segment_order_and_padding(materialize):
    """The same segment gets the same picks whatever else is in the batched call: segments
    permuted, extra padding, other segments added, other thread counts."""
    g = torch.Generator().manual_seed(5)
    C = 64
    lens = [37, 12, 50, 25]
    segs = [torch.randn(n, C, generator=g) for n in lens]
    segs[3][5:10] = segs[3][0]  # exact duplicates inside a segment (ties)
    ks = [9, 4, 15, 8]

    def run(order, n_max, threads=1, extra=()):
        items = [(segs[i], ks[i]) for i in order] + list(extra)
        feats = torch.zeros(len(items), n_max, C)
        for s, (x, _) in enumerate(items):
            feats[s, : x.shape[0]] = x
        lengths = torch.tensor([x.shape[0] for x, _ in items])
        kk = torch.tensor([k for _, k in items])
        sel = _with_threads(threads, _batched, feats, lengths, kk, materialize=materialize)
        return {i: sel[s][: ks[i]].tolist() for s, i in enumerate(order)}

    ref = run([0, 1, 2, 3], 50)
    assert all(len(set(v)) == ks[i] for i, v in ref.items())
    for order in itertools.islice(itertools.permutations(range(4)), 1, None, 5):
        assert run(list(order), 50) == ref
    assert run([2, 0, 3, 1], 64) == ref  # more padding
    assert run([3, 1, 0, 2], 80, threads=2) == ref
    other = (torch.randn(70, C, generator=g), 20)
    assert run([1, 3, 2, 0], 70, extra=[other]) == ref  # a longer segment in the batch


def test_segment_sums_deterministic_formulation():
    """``segment_sums``: the one-hot product CUDA uses (no atomics) equals the ``index_add_``
    sums CPU uses (float64 reference), and the CPU path is exactly ``index_add_``."""
    from hieravid_vllm.core.schedule import segment_sums

    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 64, generator=g)
    seg = torch.sort(torch.randint(0, 7, (500,), generator=g)).values
    ref = torch.zeros(7, 64, dtype=torch.float64).index_add_(0, seg, x.double())
    cpu = segment_sums(x, seg, 7)
    assert torch.equal(cpu, torch.zeros(7, 64).index_add_(0, seg, x))
    for threads in THREADS:
        # (on CPU a GEMM's reduction split depends on the thread count, which is why CPU
        # keeps index_add_; CUDA's GEMM is reproducible on the same GPU model)
        cpu_t = _with_threads(threads, segment_sums, x, seg, 7)
        assert torch.equal(cpu_t, cpu)
        mm = _with_threads(threads, segment_sums, x, seg, 7, matmul=True)
        torch.testing.assert_close(mm.double(), ref, rtol=1e-5, atol=1e-4)
        assert torch.equal(mm, _with_threads(threads, segment_sums, x, seg, 7, matmul=True))
    assert torch.equal(segment_sums(x.to(torch.bfloat16), seg, 7),
                       segment_sums(x.to(torch.bfloat16).float(), seg, 7))
