"""python -m hieravid_vllm.visualize: the PNG is written, and the segment boundaries it draws
fall at the scene cuts planted in the synthetic clip (SyntheticVideo.boundaries, known from
how the clip was written, and also found by a plain frame-difference detector); one run with
a real (tiny, random-weight) Qwen2.5-VL checkpoint's vision features and LM hidden states."""
from __future__ import annotations

import json
import struct


from hieravid_vllm import visualize
from hieravid_vllm.testing.video import detect_cuts, read_video_frames, write_scene_video


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h, len(data)


def _check_stages(d):
    counts, kept = d["stage_counts"], d["stage_kept"]
    assert counts == [len(k) for k in kept]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    for a, b in zip(kept, kept[1:]):  # every stage keeps a subset of the previous one
        assert set(b) <= set(a)
    assert all(0 <= i < d["num_visual"] for i in kept[0])


def test_png_and_boundaries_at_planted_cuts(tmp_path):
    video = write_scene_video(tmp_path / "scenes.mp4", num_frames=24, width=112, height=112,
                              scene_lengths=[5, 8, 11], seed=1)
    assert video.boundaries == [5, 13]
    assert detect_cuts(read_video_frames(video.path)) == video.boundaries  # the clip is sane
    out, js = tmp_path / "fig.png", tmp_path / "fig.json"
    assert visualize.main([str(video.path), "-o", str(out), "--json", str(js),
                           "--num-frames", "0", "--budget", "0.3"]) == 0
    w, h, size = _png_size(out)
    assert 400 <= w <= 4000 and 300 <= h <= 4000 and size > 10_000
    d = json.loads(js.read_text())
    assert d["frame_indices"] == list(range(24))
    assert d["boundary_frames"] == video.boundaries
    # the bars: O_t below beta exactly at the boundaries
    assert [t for t, o in enumerate(d["overlap"], 1) if o < d["beta"]] == d["boundaries"]
    assert d["grid"] == [4, 4] and d["num_visual"] == 24 * 16
    assert "pixel-patch feature, no model" in d["feature_source"]
    _check_stages(d)
    assert len(d["stage_counts"]) == 4


def test_sampled_frames_boundaries_follow_cuts(tmp_path):
    video = write_scene_video(tmp_path / "long.mp4", num_frames=48, width=224, height=224,
                              num_scenes=3, seed=0)
    out, js = tmp_path / "s.png", tmp_path / "s.json"
    assert visualize.main([str(video.path), "-o", str(out), "--json", str(js),
                           "--num-frames", "12", "--mode", "input_only"]) == 0
    d = json.loads(js.read_text())
    idx = d["frame_indices"]
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 47
    # a new segment starts at the first sampled frame of every planted scene
    assert d["boundary_frames"] == [min(i for i in idx if i >= c) for c in video.boundaries]
    assert d["stage_counts"][1] == round(0.3 * d["num_visual"])  # input_only: b * N kept
    _check_stages(d)
    _png_size(out)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert visualize.main([str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not found" in capsys.readouterr().err
    video = write_scene_video(tmp_path / "v.mp4", num_frames=8, width=64, height=64, seed=2)
    assert visualize.main([str(video.path), "-o", str(tmp_path / "x.png"),
                           "--budget", "1.5"]) == 2
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_with_tiny_qwen25_checkpoint(tmp_path):
    from hieravid_vllm.testing.hf_reference import expected_video_tokens
    from hieravid_vllm.testing.models import build_tiny_model

    model = build_tiny_model("qwen2_5_vl")
    video = write_scene_video(tmp_path / "q.mp4", num_frames=16, width=112, height=112,
                              num_scenes=2, seed=3)
    out, js = tmp_path / "q.png", tmp_path / "q.json"
    assert visualize.main([str(video.path), "--model", str(model), "-o", str(out),
                           "--json", str(js), "--num-frames", "16"]) == 0
    _png_size(out)
    d = json.loads(js.read_text())
    # 16 frames of 112x112: temporal patch 2, 2x2 merge of 14 px patches -> 8 x 4 x 4
    assert d["num_visual"] == expected_video_tokens("qwen2_5_vl", 16, 112, 112) == 128
    assert d["grid"] == [4, 4] and d["frame_indices"] == list(range(0, 16, 2))
    assert "qwen2_5_vl vision tower + projector" in d["feature_source"]
    assert "staged forward of hieravid_vllm.reference" in d["stage_source"]
    _check_stages(d)
    # the tiny LM has 4 layers, one per stage; counts are the schedule's (Eq. 11)
    from hieravid_vllm.core import HieraVidConfig
    from hieravid_vllm.core.schedule import build_schedule

    sched = build_schedule(HieraVidConfig(budget=0.3), 128, 4, max_merge=7 * 16)
    assert d["stage_counts"] == list(sched.counts)
