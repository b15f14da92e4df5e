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

from hieravid_vllm.testing.expect import expected_schedule, qwen_video_grid
from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import kv_cache_bytes
from hieravid_vllm.testing.video import write_scene_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kv_admission  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.vllm033]  # vllm033: also run on vLLM 0.33

BS = 32
FPS = 8.0


def test_stage_groups_hold_kept_tokens_and_admit_more(tmp_path):
    model = str(build_tiny_model("qwen2_5_vl"))
    video = write_scene_video(tmp_path / "v.mp4", num_frames=48, width=112, height=112,
                              fps=FPS, seed=4).path
    # room for 1536 tokens of the model's KV spec (3 MiB): about 3 unpruned requests
    kv_bytes = kv_cache_bytes(model, 1536)
    base = kv_admission.run_config(model, "qwen2_5_vl", str(video), None, 10, kv_bytes, BS,
                                   FPS, 1024)
    full = kv_admission.run_config(model, "qwen2_5_vl", str(video), {"budget": 0.3}, 10,
                                   kv_bytes, BS, FPS, 1024)
    assert "error" not in base and "error" not in full, (base, full)
    assert base["completed"] == full["completed"] == 10

    # independent expectation from the core schedule
    t, per_frame = qwen_video_grid(video)
    n = t * per_frame
    sched = expected_schedule(t, per_frame, 0.3)
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
