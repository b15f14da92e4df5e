"""Static-token merging (Eq. 3): Triton kernels vs core reference (every MergeResult field)."""
import pytest
import torch

import hieravid_kernels as hk
from hieravid_vllm.core.segment import merge_static_tokens as ref_merge
from hieravid_vllm.core.segment import similarity_map as ref_similarity_map
from hieravid_vllm.core.segment import static_topk

pytestmark = pytest.mark.interpreter

FIELDS = ("flat_indices", "thw", "segment_ids", "run_length", "source_to_kept")


def _check(got, want):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == torch.int64, name
        assert torch.equal(a, b), f"{name}: {a} != {b}"
    assert got.features.dtype == want.features.dtype
    assert got.features.shape == want.features.shape
    assert not torch.isnan(got.features.float()).any()
    # same summation order and rounding as the reference: equal bit for bit on CPU
    assert torch.equal(got.features, want.features)


def _fseg(T, kind, gen):
    if kind is None:
        return None
    if kind == "monotone":
        return torch.cumsum((torch.rand(T, generator=gen) < 0.4).long(), 0)
    return torch.randint(0, 3, (T,), generator=gen)   # not monotone: renumbering by changes


@pytest.mark.parametrize("shape,dtype,p_static,fseg_kind", [
    ((5, 3, 7, 37), torch.float32, 0.5, "monotone"),
    ((9, 4, 5, 70), torch.bfloat16, 0.7, "monotone"),
    ((6, 1, 3, 5), torch.float32, 1.0, None),            # everything static: one run per position
    ((6, 2, 3, 9), torch.float16, 0.0, "monotone"),       # nothing static
    ((7, 3, 3, 20), torch.float32, 0.6, "shuffled"),
    ((1, 2, 2, 3), torch.float16, 0.5, "monotone"),       # one frame
    ((8, 5, 4, 150), torch.bfloat16, 0.5, None),          # two channel blocks, two position blocks
])
def test_merge_matches_reference(shape, dtype, p_static, fseg_kind, gen):
    T, H, W, C = shape
    F = torch.randn(shape, generator=gen).to(dtype)
    static = torch.rand(max(T - 1, 0), H, W, generator=gen) < p_static
    fseg = _fseg(T, fseg_kind, gen)
    with hk.poisoned_outputs():
        got = hk.merge_static_tokens(F, static, fseg, backend="triton")
    _check(got, ref_merge(F, static, fseg))


@pytest.mark.parametrize("block_t", [1, 2, 4])
@pytest.mark.parametrize("fseg_kind", ["monotone", "shuffled"])
def test_merge_with_num_kept_and_small_blocks(block_t, fseg_kind, gen):
    """Runs and segment changes carried across the index kernel's frame blocks."""
    T, H, W, C = 11, 3, 5, 33
    F = torch.randn(T, H, W, C, generator=gen)
    static = torch.rand(T - 1, H, W, generator=gen) < 0.6
    static[4] = True                    # a frame without kept tokens (segment change skipped)
    fseg = _fseg(T, fseg_kind, gen)
    n = T * H * W - int(static.sum())
    with hk.poisoned_outputs():
        got = hk.merge_static_tokens_triton(F, static, fseg, num_kept=n, block_p=4, block_c=16,
                                            block_t=block_t)
    _check(got, ref_merge(F, static, fseg))


def test_merge_duplicated_runs_average_exactly(gen):
    """A static run of identical tokens merges into exactly that token."""
    T, H, W, C = 6, 2, 2, 12
    F = torch.randn(T, H, W, C, generator=gen).to(torch.bfloat16)
    F[1:4, 0, 1] = F[1, 0, 1]
    static = torch.zeros(T - 1, H, W, dtype=torch.bool)
    static[1:3, 0, 1] = True          # tokens t = 2, 3 merge into t = 1
    with hk.poisoned_outputs():
        got = hk.merge_static_tokens(F, static, None, backend="triton")
    want = ref_merge(F, static, None)
    _check(got, want)
    row = int((got.flat_indices == 1 * H * W + 1).nonzero())
    assert int(got.run_length[row]) == 3 and torch.equal(got.features[row], F[1, 0, 1])


def test_similarity_topk_merge_pipeline(gen):
    """Kernel similarity -> Top-K -> kernel merge equals the reference chain."""
    T, H, W, C = 8, 3, 4, 24
    base = torch.randn(1, H, W, C, generator=gen)
    F = (base + 0.3 * torch.randn(T, H, W, C, generator=gen)).to(torch.bfloat16)
    K = 40
    S = hk.similarity_map(F, backend="triton")
    S_ref = ref_similarity_map(F)
    static = static_topk(S, K)
    assert torch.equal(static, static_topk(S_ref, K))
    fseg = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    with hk.poisoned_outputs():
        got = hk.merge_static_tokens(F, static, fseg, num_kept=T * H * W - K, backend="triton")
    _check(got, ref_merge(F, static, fseg))


def test_merge_dispatch_cpu_uses_reference(gen):
    F = torch.randn(3, 2, 2, 4, generator=gen)
    static = torch.rand(2, 2, 2, generator=gen) < 0.5
    got, want = hk.merge_static_tokens(F, static), ref_merge(F, static)
    for name in FIELDS + ("features",):
        assert torch.equal(getattr(got, name), getattr(want, name))
