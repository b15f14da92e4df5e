"""Segment level (Sec. 3.1.1) against independent loop references and hand-made cases."""
import numpy as np
import pytest
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.segment import (frame_segments, merge_static_tokens, overlap_ratio,
                                        segments_from_overlap, similarity_map, static_topk)


def sim_ref(F):
    """Eq. 1 by explicit loops in float64; zero vector -> 0."""
    F = F.double().numpy()
    T, H, W, _ = F.shape
    S = np.zeros((T - 1, H, W))
    for t in range(1, T):
        for i in range(H):
            for j in range(W):
                a, b = F[t, i, j], F[t - 1, i, j]
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                S[t - 1, i, j] = 0.0 if na == 0 or nb == 0 else a @ b / (na * nb)
    return S


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-6),
                                        (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_similarity_map_vs_loop(dtype, atol):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(5, 3, 4, 16, generator=g).to(dtype)
    F[2, 1, 1] = 0      # zero vector
    F[3, 0, 2] = F[2, 0, 2] * 3
    S = similarity_map(F)
    assert S.dtype == torch.float32 and S.shape == (4, 3, 4)
    assert torch.isfinite(S).all()
    np.testing.assert_allclose(S.numpy(), sim_ref(F), atol=atol)
    assert S[1, 1, 1] == 0 and S[2, 1, 1] == 0
    assert abs(float(S[2, 0, 2]) - 1.0) < 1e-5


def test_static_topk_tie_break():
    S = torch.tensor([[[0.5, 0.9], [0.9, 0.1]], [[0.9, 0.5], [0.2, 0.5]]])
    m = static_topk(S, 4)
    # values desc, then flat index asc: 0.9 @1, 0.9 @2, 0.9 @4, then 0.5 @0 (before 0.5 @5, @7)
    exp = torch.zeros(8, dtype=torch.bool)
    exp[[1, 2, 4, 0]] = True
    assert torch.equal(m.reshape(-1), exp)
    assert static_topk(S, 0).sum() == 0 and static_topk(S, 100).all()


def test_overlap_and_boundaries():
    mask = torch.zeros(4, 2, 5, dtype=torch.bool)
    mask[0] = True                      # O_1 = 1
    mask[1, 0, :3] = True               # O_2 = 0.3
    mask[2, :, :] = True                # O_3 = 1
    mask[3, 1, :] = True                # O_4 = 0.5
    O = overlap_ratio(mask)
    assert torch.allclose(O, torch.tensor([1.0, 0.3, 1.0, 0.5]))
    assert segments_from_overlap(O, 0.4).tolist() == [0, 0, 1, 1, 1]
    assert segments_from_overlap(O, 0.6).tolist() == [0, 0, 1, 1, 2]


def _planted_video(seed, T_min=2, T_max=7, M=6, P=(6, 6), C=32, noise=0.15):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(T_min, T_max + 1, (M,), generator=g).tolist()
    frames, ids = [], []
    for m, L in enumerate(lens):
        base = torch.randn(*P, C, generator=g)
        for _ in range(L):
            frames.append(base + noise * torch.randn(*P, C, generator=g))
            ids.append(m)
    return torch.stack(frames), torch.tensor(ids)


@pytest.mark.parametrize("seed", range(5))
def test_segmentation_finds_planted_boundaries(seed):
    F, truth = _planted_video(seed)
    T, Hh, Ww, _ = F.shape
    M = int(truth.max()) + 1
    N = T * Hh * Ww
    # K fills 80% of the within-segment transitions: boundary frames get O_t ~ 0, others ~0.8
    K = int(0.8 * (T - M) * Hh * Ww)
    cfg = HieraVidConfig()
    seg = frame_segments(F, cfg, K_seg=K)
    assert seg.tolist() == truth.tolist()
    assert K < N
    # average-pool ablation finds them too (different content per segment)
    assert frame_segments(F, cfg.model_copy(update={"segmentation": "avg_pool"})).tolist() \
        == truth.tolist()
    assert frame_segments(F, cfg.model_copy(update={"segmentation": "none"})).tolist() == [0] * T
    assert frame_segments(F, cfg, K_seg=0).tolist() == [0] * T


def merge_ref(F, static):
    """Eq. 3 by loops: for each position walk t, open a run at every non-static token."""
    F = F.double().numpy()
    T, H, W, C = F.shape
    runs = {}   # head flat index -> list of member flat indices
    for i in range(H):
        for j in range(W):
            head = None
            for t in range(T):
                flat = (t * H + i) * W + j
                if t == 0 or not bool(static[t - 1, i, j]):
                    head = flat
                    runs[head] = []
                runs[head].append(flat)
    heads = sorted(runs)
    Ff = F.reshape(-1, C)
    return heads, [Ff[runs[h]].mean(0) for h in heads], [len(runs[h]) for h in heads], runs


def test_merge_hand_made():
    # T = 4 frames, 1 x 3 positions, C = 2; F[t, 0, p] = [10 t + p, -(10 t + p)]
    T, P = 4, 3
    F = torch.zeros(T, 1, P, 2)
    for t in range(T):
        for p in range(P):
            F[t, 0, p] = torch.tensor([10.0 * t + p, -(10.0 * t + p)])
    static = torch.tensor([[[1, 0, 1]],     # t = 1
                           [[1, 0, 0]],     # t = 2
                           [[0, 0, 1]]],    # t = 3
                          dtype=torch.bool)
    frame_seg = torch.tensor([0, 0, 1, 1])
    r = merge_static_tokens(F, static, frame_seg)
    # p0: {0, 3, 6} -> head 0, then 9 alone; p1: 1, 4, 7, 10; p2: {2, 5} -> 2, {8, 11} -> 8
    assert r.flat_indices.tolist() == [0, 1, 2, 4, 7, 8, 9, 10]
    assert r.run_length.tolist() == [3, 1, 2, 1, 1, 2, 1, 1]
    exp_first = [10.0, 1.0, 7.0, 11.0, 21.0, 27.0, 30.0, 31.0]
    # p0 run: (0 + 10 + 20) / 3 = 10; p2 run t0..1: (2 + 12) / 2 = 7; p2 t2..3: (22 + 32) / 2 = 27
    assert r.features[:, 0].tolist() == exp_first
    assert r.features[:, 1].tolist() == [-x for x in exp_first]
    assert r.thw.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 0, 1], [2, 0, 1],
                              [2, 0, 2], [3, 0, 0], [3, 0, 1]]
    assert r.segment_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.source_to_kept.tolist() == [0, 1, 2, 0, 3, 2, 0, 4, 5, 6, 7, 5]
    assert r.features.shape[0] == T * P - int(static.sum())


def test_merge_run_crossing_segment_boundary_and_empty_segment():
    F = torch.arange(3 * 1 * 1 * 1, dtype=torch.float32).reshape(3, 1, 1, 1)
    static = torch.ones(2, 1, 1, dtype=torch.bool)
    r = merge_static_tokens(F, static, torch.tensor([0, 1, 2]))
    # one run over all frames, placed at t0 = 0, segment of frame 0; empty segments vanish
    assert r.flat_indices.tolist() == [0] and r.features.tolist() == [[1.0]]
    assert r.segment_ids.tolist() == [0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_random_vs_loop_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    T, H, W, C = int(torch.randint(1, 7, (1,), generator=g)), 3, 4, 5
    F = torch.randn(T, H, W, C, generator=g).to(dtype)
    S = similarity_map(F)
    K = int(torch.randint(0, S.numel() + 1, (1,), generator=g))
    static = static_topk(S, K)
    r = merge_static_tokens(F, static)
    heads, means, lens, runs = merge_ref(F, static)
    N = T * H * W
    assert r.features.shape == (N - K, C) and r.features.dtype == dtype
    assert r.flat_indices.tolist() == heads
    assert r.run_length.tolist() == lens
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(r.features.double().numpy(), np.stack(means), atol=tol)
    # indices map back: unmerged tokens are bit-identical to the original token
    flatF = F.reshape(N, C)
    single = r.run_length == 1
    assert torch.equal(r.features[single], flatF[r.flat_indices[single]])
    # (t, i, j) agrees with the flat index; every original token maps into its run's head
    t, i, j = r.thw.unbind(-1)
    assert torch.equal((t * H + i) * W + j, r.flat_indices)
    for h_rank, h in enumerate(heads):
        for member in runs[h]:
            assert int(r.source_to_kept[member]) == h_rank
