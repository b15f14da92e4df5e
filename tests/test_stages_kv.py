"""KV cache footprint of the in-LLM stages on a real engine (tiny Qwen2.5-VL, CPU).

Full mode puts every stage's layers in their own KV cache group. Checked against numbers
computed here from the core schedule (not from the plugin's bookkeeping):

* right after its prefill a video request holds, in the group of stage g, exactly
  ceil((text tokens + visual tokens of stage g) / block size) blocks, and the total is
  within 10% of what the kept counts need;
* with the same KV cache size in bytes, the engine runs at least 2x more of these video
  requests at once at budget 0.3 than unpruned.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.schedule import build_schedule
from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.video import read_video_frames, write_scene_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kv_admission  # noqa: E402

pytestmark = pytest.mark.vllm

BS = 32
FPS = 8.0


def test_stage_groups_hold_kept_tokens_and_admit_more(tmp_path):
    model = str(build_tiny_model("qwen2_5_vl"))
    video = write_scene_video(tmp_path / "v.mp4", num_frames=48, width=112, height=112,
                              fps=FPS, seed=4).path
    kv_bytes = 3 * 2**20  # 2 KB per token unpruned (4 layers): room for 3 requests
    base = kv_admission.run_config(model, "qwen2_5_vl", str(video), None, 10, kv_bytes, BS,
                                   FPS, 1024)
    full = kv_admission.run_config(model, "qwen2_5_vl", str(video), {"budget": 0.3}, 10,
                                   kv_bytes, BS, FPS, 1024)
    assert "error" not in base and "error" not in full, (base, full)
    assert base["completed"] == full["completed"] == 10

    # independent expectation from the core schedule
    frames = read_video_frames(video)
    t, per_frame = (frames.shape[0] + 1) // 2, (frames.shape[1] // 28) * (frames.shape[2] // 28)
    n = t * per_frame
    sched = build_schedule(HieraVidConfig(budget=0.3), n, 4, max_merge=(t - 1) * per_frame)
    text = base["prompt_tokens"] - n
    assert full["prompt_tokens"] == text + sched.counts[0]
    assert full["groups"] == len(sched.counts) == 4
    tokens = full["tokens_at_sample"]  # prompt (+ generated) tokens when sampled
    extra = tokens - full["prompt_tokens"]
    need = [text + c + extra for c in sched.counts]
    assert full["blocks_per_group"] == [math.ceil(x / BS) for x in need]
    assert sum(full["blocks_per_group"]) * BS <= 1.10 * sum(need)
    assert base["blocks_per_group"] == [math.ceil((text + n + (base["tokens_at_sample"] -
                                                                base["prompt_tokens"])) / BS)]

    # same bytes: 4 groups of 1 layer vs 1 group of 4 layers
    assert full["num_blocks"] == 4 * base["num_blocks"]
    assert full["peak_running"] >= 2 * base["peak_running"], (base, full)
