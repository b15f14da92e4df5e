"""What a test expects of a served video, computed independently of the plugin.

The plugin computes its placeholder counts in ``hieravid_vllm.models.common`` from the grid
vLLM's processor reports. The tests compute the same numbers here from the decoded frames of
the clip and the core schedule (``hieravid_vllm.core.schedule.build_schedule``, Eq. 11), so a
wrong grid or a wrong count on the vLLM side is caught, not copied:

* :func:`qwen_video_grid`: ``(temporal patches, merged tokens per frame)`` of a clip whose
  frames are multiples of 28 px (Qwen2-VL family: 2 frames per temporal patch, one token per
  28 x 28 px after the 2 x 2 merge);
* :func:`expected_schedule` / :func:`expected_kept`: the schedule of such a video and the
  visual tokens that enter the LLM (``counts[0]``; in ``input_only`` mode the budget's share).
"""
from __future__ import annotations

import os

import numpy as np

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.schedule import StageSchedule, build_schedule

#: LLM depth of the ``tiny`` preset of :func:`hieravid_vllm.testing.models.build_tiny_model`
TINY_LAYERS = 4


def qwen_video_grid(video: str | os.PathLike | np.ndarray) -> tuple[int, int]:
    """``(t, per_frame)`` of a clip (path or decoded ``(T, H, W, 3)`` frames) for the
    Qwen2-VL family: ``t = ceil(T / 2)`` temporal patches, ``per_frame = (H/28) * (W/28)``."""
    if not isinstance(video, np.ndarray):
        from hieravid_vllm.testing.video import read_video_frames

        video = read_video_frames(video)
    frames, height, width = video.shape[:3]
    return (frames + 1) // 2, (height // 28) * (width // 28)


def expected_schedule(t: int, per_frame: int, budget: float = 0.3,
                      num_layers: int = TINY_LAYERS, mode: str = "full",
                      config: HieraVidConfig | None = None) -> StageSchedule:
    """The core schedule of a ``t x per_frame`` video (``config`` overrides budget/mode's
    defaults; its mode is replaced by ``mode``)."""
    cfg = (config or HieraVidConfig(budget=budget)).model_copy(update={"mode": mode})
    return build_schedule(cfg, t * per_frame, num_layers, max_merge=max(t - 1, 0) * per_frame)


def expected_kept(t: int, per_frame: int, budget: float = 0.3, num_layers: int = TINY_LAYERS,
                  mode: str = "input_only", config: HieraVidConfig | None = None) -> int:
    """Visual tokens of one video that enter the LLM (the prompt-token count's video part)."""
    return int(expected_schedule(t, per_frame, budget, num_layers, mode, config).input_target)


def input_dumps(debug_dir: str | os.PathLike, exclude: set | frozenset = frozenset()) -> list:
    """The worker's input-stage dumps (``HIERAVID_DEBUG_DIR/video-<pid>-<n>.pt``) in file-name
    order, those named in ``exclude`` left out."""
    from pathlib import Path

    import torch

    paths = sorted(p for p in Path(debug_dir).glob("video-*.pt") if p.name not in exclude)
    return [torch.load(p) for p in paths]


def assert_input_dumps_match_core(debug_dir: str | os.PathLike, at_least: int = 1,
                                  exclude: set | frozenset = frozenset()) -> list:
    """Every input-stage dump's kept tokens are what the core selects on the dumped features
    with the dumped config (``prune_input_stage``), as many as its schedule says; returns
    the dumps (at least ``at_least`` of them)."""
    import torch

    from hieravid_vllm.core.pipeline import prune_input_stage

    dumps = input_dumps(debug_dir, exclude)
    assert len(dumps) >= at_least, (len(dumps), at_least)
    for d in dumps:
        cfg = HieraVidConfig.model_validate(d["config"])
        ref = prune_input_stage(d["features"], None, cfg, num_layers=d["num_layers"])
        assert torch.equal(ref.kept_indices, d["kept_indices"])
        assert ref.kept_indices.numel() == ref.schedule.input_target
    return dumps
