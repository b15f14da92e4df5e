"""The serving path goes through the kernel dispatch (issue 8: "the plugin calls only the
dispatch").

``hieravid_vllm.models.common.prune_video`` -- what the vLLM workers run on every video -- is
called directly (no vLLM engine) on a real decoded clip's patch features. With
``HIERAVID_KERNELS_BACKEND=triton`` the dispatch must route the similarity map, the static-token
merging and (``input_only``) the frame-level DPP to the Triton kernels -- here, on CPU tensors,
under Triton's interpreter -- and the kept tokens must equal the pure-PyTorch reference pipeline
(``prune_input_stage`` with its default ``ops``). The Triton entry points are wrapped by
counting spies that call the real kernels, so the test fails if any step bypasses the dispatch.
"""
import numpy as np
import pytest
import torch

import hieravid_kernels as hk
from hieravid_kernels import dpp as hk_dpp
from hieravid_kernels import merge as hk_merge
from hieravid_kernels import similarity as hk_sim
from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.pipeline import prune_input_stage

pytestmark = pytest.mark.interpreter

NUM_LAYERS = 28


@pytest.fixture(scope="module")
def video_features(tmp_path_factory):
    """(T, H', W', C) bf16 features of a real 3-scene clip: 12 frames of 64 x 96 pixels,
    downsampled 2x, cut into 8 x 8 patches -> 12 x 4 x 6 tokens of 192 channels (static
    backgrounds -> static tokens to merge, cuts -> segments, moving shapes -> dynamic tokens)."""
    from hieravid_vllm.testing.video import read_video_frames, write_scene_video
    clip = write_scene_video(tmp_path_factory.mktemp("serving") / "scenes.mp4", num_frames=12,
                             width=96, height=64, num_scenes=3, seed=5)
    frames = read_video_frames(clip.path).astype(np.float32) / 255.0     # (12, 64, 96, 3)
    T, H, W, _ = frames.shape
    x = torch.from_numpy(frames).reshape(T, H // 2, 2, W // 2, 2, 3).mean((2, 4))
    p = 8
    x = x.reshape(T, H // 2 // p, p, W // 2 // p, p, 3).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(T, H // 2 // p, W // 2 // p, p * p * 3) - 0.5
    return x.to(torch.bfloat16).contiguous()


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture
def triton_calls(monkeypatch):
    calls = {}
    _spy(monkeypatch, hk_sim, "similarity_map_triton", calls)
    _spy(monkeypatch, hk_merge, "merge_static_tokens_triton", calls)
    _spy(monkeypatch, hk_dpp, "greedy_map_batched_triton", calls)
    return calls


@pytest.mark.parametrize("mode", ["full", "input_only"])
def test_prune_video_runs_the_triton_kernels(mode, video_features, triton_calls, monkeypatch):
    from hieravid_vllm.models.common import prune_video
    from hieravid_vllm.options import ServingOptions

    cfg = HieraVidConfig(budget=0.3, mode=mode)
    want = prune_input_stage(video_features, None, cfg, num_layers=NUM_LAYERS)
    assert not triton_calls                         # the default ops: the core reference
    assert want.num_segments >= 2 and want.merge.run_length.max() > 1   # cuts and merges

    monkeypatch.setenv("HIERAVID_KERNELS_BACKEND", "triton")
    with hk.poisoned_outputs():
        got = prune_video(video_features, ServingOptions(config=cfg), NUM_LAYERS)
    expected = {"similarity_map_triton": 1, "merge_static_tokens_triton": 1}
    if mode == "input_only":
        expected["greedy_map_batched_triton"] = 1
    assert triton_calls == expected

    assert got.kept_indices.numel() == want.schedule.input_target
    assert torch.equal(got.kept_indices, want.kept_indices)
    assert torch.equal(got.segment_ids, want.segment_ids)
    assert torch.equal(got.thw, want.thw)
    assert torch.equal(got.frame_segment_ids, want.frame_segment_ids)
    # merging is bit-exact on CPU (same fp32 summation order, round to nearest even)
    assert torch.equal(got.features, want.features)


def test_prune_video_reference_backends(video_features, triton_calls, monkeypatch):
    """CPU tensors with backend auto (the default) or torch: the dispatch takes the reference."""
    from hieravid_vllm.models.common import prune_video
    from hieravid_vllm.options import ServingOptions

    cfg = HieraVidConfig(budget=0.3, mode="input_only")
    want = prune_input_stage(video_features, None, cfg, num_layers=NUM_LAYERS)
    for backend in ("auto", "torch"):
        monkeypatch.setenv("HIERAVID_KERNELS_BACKEND", backend)
        got = prune_video(video_features, ServingOptions(config=cfg), NUM_LAYERS)
        assert torch.equal(got.kept_indices, want.kept_indices)
    assert not triton_calls


def test_select_layer_stage_ops(triton_calls, monkeypatch, gen):
    """The layer-level entry point takes the same ``ops``."""
    from hieravid_vllm.core.pipeline import select_layer_stage

    n, C = 60, 40
    hidden = torch.randn(n, C, generator=gen).to(torch.bfloat16)
    query = torch.randn(C, generator=gen)
    seg = torch.sort(torch.randint(0, 3, (n,), generator=gen)).values
    want = select_layer_stage(hidden, query, seg, 21, HieraVidConfig())
    monkeypatch.setenv("HIERAVID_KERNELS_BACKEND", "triton")
    got = select_layer_stage(hidden, query, seg, 21, HieraVidConfig(), ops=hk.OPS)
    assert triton_calls == {"greedy_map_batched_triton": 1}
    assert torch.equal(got, want)


def test_select_layer_stage_many_ops(triton_calls, monkeypatch, gen):
    """The stage boundary's entry point (all videos at once) takes the same ``ops``: one
    Triton greedy per DPP video, launched without a flag read-back, and each video keeps what
    ``select_layer_stage`` keeps alone."""
    from hieravid_vllm.core.pipeline import StageInput, select_layer_stage, select_layer_stage_many

    flags = []
    real = hk_dpp.greedy_map_batched_triton
    monkeypatch.setattr(hk_dpp, "greedy_map_batched_triton",
                        lambda *a, **k: flags.append(k.get("read_flag", True)) or real(*a, **k))
    inputs = []
    for n, M, target, use_dpp in ((60, 3, 21, True), (35, 2, 11, False), (44, 4, 30, True)):
        seg = torch.sort(torch.randint(0, M, (n,), generator=gen)).values
        inputs.append(StageInput(torch.randn(n, 40, generator=gen).to(torch.bfloat16),
                                 torch.randn(40, generator=gen), seg, target, HieraVidConfig(),
                                 use_dpp, M, torch.bincount(seg, minlength=M)))
    want = [select_layer_stage(i.hidden, i.query, i.segment_ids, i.target, i.config,
                               use_dpp=i.use_dpp) for i in inputs]
    monkeypatch.setenv("HIERAVID_KERNELS_BACKEND", "triton")
    got = select_layer_stage_many(inputs, ops=hk.OPS)
    assert flags == [False, False]
    for (keep, _counts), w in zip(got, want):
        assert torch.equal(keep, w)


def test_select_layer_stage_many_device_counts(triton_calls, monkeypatch, gen):
    """The sync-free boundary through the dispatch: the Triton greedy gets the device counts
    with a host width bound (``k_max``) and no validation read (``check=False``), and every
    video keeps what the host-counts path keeps, with the same per-segment counts."""
    from hieravid_vllm.core.pipeline import StageInput, select_layer_stage_many

    kws = []
    real = hk_dpp.greedy_map_batched_triton
    monkeypatch.setattr(hk_dpp, "greedy_map_batched_triton",
                        lambda *a, **k: kws.append(k) or real(*a, **k))
    inputs = []
    for n, M, target, use_dpp in ((60, 3, 21, True), (35, 2, 11, False), (44, 4, 30, True),
                                  (50, 5, 7, True)):
        seg = torch.sort(torch.randint(0, M, (n,), generator=gen)).values
        inputs.append(StageInput(torch.randn(n, 40, generator=gen).to(torch.bfloat16),
                                 torch.randn(40, generator=gen), seg, target, HieraVidConfig(),
                                 use_dpp, M, torch.bincount(seg, minlength=M)))
    want = select_layer_stage_many(inputs)
    dev_inputs = [StageInput(i.hidden, i.query, i.segment_ids, i.target, i.config, i.use_dpp,
                             i.num_segments, i.lengths.clone(), max_length=int(i.lengths.max()))
                  for i in inputs]
    monkeypatch.setenv("HIERAVID_KERNELS_BACKEND", "triton")
    got = select_layer_stage_many(dev_inputs, ops=hk.OPS, device_counts=True)
    assert [(k["k_max"], k["check"], k["read_flag"]) for k in kws] == [
        (min(int(i.lengths.max()), i.target), False, False) for i in inputs if i.use_dpp]
    for (keep, counts), (w_keep, w_counts) in zip(got, want):
        assert torch.equal(keep, w_keep)
        assert torch.equal(counts, w_counts)
