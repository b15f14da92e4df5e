"""Adjacent-frame cosine similarity map (Eq. 1): Triton kernel vs core reference."""
import pytest
import torch

import hieravid_kernels as hk
from hieravid_vllm.core.segment import similarity_map as ref_similarity_map

pytestmark = pytest.mark.interpreter


def _run(F, **kw):
    with hk.poisoned_outputs():
        return hk.similarity_map(F, backend="triton", **kw)


@pytest.mark.parametrize("shape,dtype", [
    ((2, 1, 1, 1), torch.float32),
    ((5, 3, 7, 37), torch.float32),      # non-powers of two, tiles cut at every edge
    ((9, 4, 5, 70), torch.bfloat16),
    ((4, 2, 3, 130), torch.float16),     # two channel blocks
    ((7, 13, 1, 24), torch.bfloat16),
])
def test_similarity_matches_reference(shape, dtype, gen):
    F = torch.randn(shape, generator=gen).to(dtype)
    got = _run(F)
    want = ref_similarity_map(F)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_similarity_static_and_zero_tokens(gen):
    F = torch.randn(6, 3, 3, 16, generator=gen)
    F[2] = F[1]                 # static frame: S = 1
    F[4, 1, 1] = 0.0            # zero token: S = 0 on both sides, never NaN
    F[5, 0, 2] = -F[4, 0, 2]    # opposite: S = -1
    got = _run(F)
    torch.testing.assert_close(got, ref_similarity_map(F), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], torch.ones(3, 3), rtol=0, atol=1e-6)
    assert got[3, 1, 1] == 0 and got[4, 1, 1] == 0
    assert abs(float(got[4, 0, 2]) + 1.0) < 1e-6


def test_similarity_block_sizes_and_single_frame(gen):
    F = torch.randn(6, 5, 3, 50, generator=gen, dtype=torch.float32)
    with hk.poisoned_outputs():
        got = hk.similarity_map_triton(F, block_t=2, block_p=4, block_c=16)
    torch.testing.assert_close(got, ref_similarity_map(F), rtol=1e-5, atol=1e-6)
    one = _run(F[:1])
    assert one.shape == (0, 5, 3)


def test_similarity_dispatch_cpu_uses_reference(gen):
    F = torch.randn(3, 2, 2, 8, generator=gen)
    assert torch.equal(hk.similarity_map(F), ref_similarity_map(F))
    assert torch.equal(hk.similarity_map(F, backend="torch"), ref_similarity_map(F))
    with pytest.raises(ValueError):
        hk.similarity_map(F, backend="cuda")
