"""The test/benchmark builders: tiny models (tokenizer, configs, processors, weights) and
synthetic videos. No vLLM here; transformers runs offline."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hieravid_vllm.testing import models as M
from hieravid_vllm.testing.hf_reference import expected_video_tokens, hf_video_prompt
from hieravid_vllm.testing.tokenizer import LLAVA_EXTRA_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS
from hieravid_vllm.testing.video import (detect_cuts, frame_difference, read_video_frames,
                                         video_data_url, write_scene_video,
                                         write_single_frame_video, write_static_video)

ARCHS = M.ARCHS


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return request.param, M.build_tiny_model(request.param)


# ----------------------------------------------------------------------------- tokenizer
ROUND_TRIP = [
    "Describe the video in detail.",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed",
    "Ünïcödé wörds, 中文字符, emoji 🎬🙂 and symbols ∑ ≠ ✓",
    "numbers 0123456789 3.14159 -42 1e-9",
    "code: def f(x): return {'a': [1, 2]}  # comment",
    "",
]


def test_tokenizer_round_trips_text(tiny):
    from transformers import AutoTokenizer

    _, path = tiny
    tok = AutoTokenizer.from_pretrained(path)
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # the trained merges compress ordinary English below one token per character
    words = "What happens in this video? The red circle moves to the left."
    assert len(tok(words)["input_ids"]) < len(words) / 2


def test_special_tokens_are_single_ids(tiny):
    from transformers import AutoTokenizer

    arch, path = tiny
    tok = AutoTokenizer.from_pretrained(path)
    specials = list(QWEN_SPECIAL_TOKENS)
    if arch == "llava_onevision":
        specials += list(LLAVA_EXTRA_SPECIAL_TOKENS)
    ids = [tok.convert_tokens_to_ids(t) for t in specials]
    assert len(set(ids)) == len(ids) and all(0 <= i < len(tok) for i in ids)
    for token, tid in zip(specials, ids):
        # alone, glued to text, and repeated: always exactly one id per occurrence
        assert tok(token, add_special_tokens=False)["input_ids"] == [tid]
        glued = tok(f"abc{token}def{token}{token}", add_special_tokens=False)["input_ids"]
        assert glued.count(tid) == 3
        assert tok.decode(glued) == f"abc{token}def{token}{token}"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert type(tok).__name__ == "Qwen2Tokenizer"


# ----------------------------------------------------------------------------- models
def test_config_processor_and_files(tiny):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    arch, path = tiny
    names = {p.name for p in path.iterdir()}
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "preprocessor_config.json", "video_preprocessor_config.json",
              "generation_config.json", M.MARKER):
        assert f in names, f
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.architectures == [M.ARCH_CLASSES[arch]]
    tok = AutoTokenizer.from_pretrained(path)
    text = cfg.text_config
    assert text.vocab_size == len(tok)
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim in (32, 64, 128) and text.num_hidden_layers % 4 == 0
    proc = AutoProcessor.from_pretrained(path)
    if arch == "llava_onevision":
        assert cfg.video_token_index == tok.convert_tokens_to_ids("<video>")
        assert cfg.image_token_index == tok.convert_tokens_to_ids("<image>")
        assert type(proc).__name__ == "LlavaOnevisionProcessor"
        assert cfg.vision_config.model_type == "siglip_vision_model"
    else:
        assert sum(text.rope_parameters["mrope_section"]) * 2 == head_dim
        assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
        assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert type(proc.video_processor).__name__ == "Qwen2VLVideoProcessor"
    info = M.model_info(path)
    assert info["arch"] == arch and info["key"] == path.name


def test_chat_template_matches_real_checkpoints(tiny):
    from transformers import AutoProcessor

    arch, path = tiny
    proc = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "video"},
                                         {"type": "text", "text": "What happens?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if arch == "llava_onevision":
        assert text == "<|im_start|>user <video>\nWhat happens?<|im_end|><|im_start|>assistant\n"
        img = [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image"}]}]
        assert proc.apply_chat_template(img, tokenize=False).startswith(
            "<|im_start|>user <image>\nQ")
    else:
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
                        "What happens?<|im_end|>\n<|im_start|>assistant\n")
        img = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
        assert "<|vision_start|><|image_pad|><|vision_end|>Q" in proc.apply_chat_template(
            img, tokenize=False)
    # plain-string content works too
    plain = proc.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True, tokenize=False)
    assert "hi<|im_end|>" in plain


def test_model_loads_and_forward_runs(tiny, tmp_path):
    import torch
    import transformers

    arch, path = tiny
    cls = getattr(transformers, M.ARCH_CLASSES[arch])
    model, loading = cls.from_pretrained(path, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing / unexpected / mismatched keys
    assert next(model.parameters()).dtype == torch.float32
    clip = write_scene_video(tmp_path / "c.mp4", num_frames=4, width=112, height=112, fps=4,
                             num_scenes=2)
    frames = read_video_frames(clip.path)
    ref = hf_video_prompt(path, frames, "Describe the video.")
    info = M.model_info(path)
    assert ref.video_tokens == expected_video_tokens(arch, 4, 112, 112,
                                                     info["llava_tokens_per_frame"])
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    inputs = proc(text=[ref.text], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**inputs)
    assert out.logits.shape == (1, ref.prompt_tokens, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # greedy decoding of the random model yields printable word pieces, never a special token
    next_id = int(out.logits[0, -1].argmax())
    assert next_id not in proc.tokenizer.all_special_ids


def test_cache_reuse_copy_and_keys(tmp_path):
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    p1 = M.build_tiny_model("qwen2_vl", cache_dir=cache)
    build_s = time.monotonic() - t0
    t0 = time.monotonic()
    p2 = M.build_tiny_model("qwen2_vl", cache_dir=cache)
    assert p1 == p2 and time.monotonic() - t0 < max(0.5, build_s / 4)
    assert M.cache_key("qwen2_vl", seed=1) != M.cache_key("qwen2_vl", seed=0)
    assert M.cache_key("qwen2_vl", preset="bench") != M.cache_key("qwen2_vl")
    out = M.build_tiny_model("qwen2_vl", out_dir=tmp_path / "copy", cache_dir=cache)
    assert out == tmp_path / "copy" and M.is_built(out, p1.name)
    assert (out / "model.safetensors").read_bytes() == (p1 / "model.safetensors").read_bytes()
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers
    # same seed -> same weights (a rebuild elsewhere is byte-identical in its tensors)
    from safetensors.torch import load_file

    p3 = M.build_tiny_model("qwen2_vl", cache_dir=tmp_path / "other")
    a, b = load_file(p1 / "model.safetensors"), load_file(p3 / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_concurrent_builders_share_one_build(tmp_path):
    code = ("import sys; from hieravid_vllm.testing.models import build_tiny_model; "
            "print(build_tiny_model('llava_onevision', cache_dir=sys.argv[1]))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    built = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and M.is_built(built[0])


def test_presets_resolve_and_validate():
    for arch in ARCHS:
        for preset in M.PRESETS:
            spec = M.resolve_spec(arch, preset)
            lm = spec["lm"]
            assert lm["num_hidden_layers"] % 4 == 0
            assert lm["hidden_size"] // lm["num_attention_heads"] in (64, 128)
        bench = M.resolve_spec(arch, "bench")["lm"]
        assert 512 <= bench["hidden_size"] <= 1024 and bench["num_hidden_layers"] >= 8
    with pytest.raises(ValueError, match="multiple of 4"):
        M.resolve_spec("qwen2_vl", overrides={"lm": {"num_hidden_layers": 6}})
    with pytest.raises(ValueError, match="mrope_section"):
        M.resolve_spec("qwen2_vl", overrides={"lm": {"mrope_section": [8, 8, 8]}})
    with pytest.raises(ValueError, match="head_dim"):
        M.resolve_spec("llava_onevision", overrides={"lm": {"num_attention_heads": 4,
                                                               "hidden_size": 176}})
    with pytest.raises(ValueError):
        M.build_tiny_model("qwen3_vl")


# ----------------------------------------------------------------------------- videos
@pytest.mark.parametrize("num_frames,width,height,fps,num_scenes", [
    (48, 224, 224, 8.0, 3),
    (17, 160, 96, 4.0, 4),
    (64, 336, 336, 2.0, 5),
    (8, 112, 112, 8.0, 1),
])
def test_scene_video_decodes_and_cuts_match(tmp_path, num_frames, width, height, fps,
                                            num_scenes):
    import cv2

    clip = write_scene_video(tmp_path / "v.mp4", num_frames=num_frames, width=width,
                             height=height, fps=fps, num_scenes=num_scenes, seed=num_frames)
    frames = read_video_frames(clip.path)
    assert frames.shape == (num_frames, height, width, 3) and frames.dtype == np.uint8
    cap = cv2.VideoCapture(str(clip.path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == num_frames
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(fps)
    cap.release()
    # planted cuts: scenes partition the clip, and frame differences jump exactly there
    assert len(clip.boundaries) == num_scenes - 1
    assert clip.scenes[0][0] == 0 and clip.scenes[-1][1] == num_frames
    assert [s for s, _ in clip.scenes[1:]] == clip.boundaries
    assert detect_cuts(frames) == clip.boundaries
    diffs = frame_difference(frames)
    cut_idx = [b - 1 for b in clip.boundaries]
    within = np.delete(diffs, cut_idx)
    if cut_idx:
        assert diffs[cut_idx].min() > 5 * max(within.max(), 1.0)
    # objects move inside every scene (the background alone would give zero differences)
    assert within.size == 0 or (within > 0.2).mean() > 0.9


def test_scene_lengths_and_validation(tmp_path):
    clip = write_scene_video(tmp_path / "v.mp4", num_frames=20, width=64, height=64, fps=5,
                             scene_lengths=[3, 12, 5])
    assert clip.boundaries == [3, 15]
    assert detect_cuts(read_video_frames(clip.path)) == [3, 15]
    with pytest.raises(ValueError):
        write_scene_video(tmp_path / "x.mp4", num_frames=20, scene_lengths=[10, 5])
    with pytest.raises(ValueError):
        write_scene_video(tmp_path / "x.mp4", width=65)


def test_static_and_single_frame_clips(tmp_path):
    for seed in range(3):
        clip = write_static_video(tmp_path / f"s{seed}.mp4", num_frames=24, width=224,
                                  height=160, fps=8, seed=seed)
        frames = read_video_frames(clip.path)
        assert frames.shape == (24, 160, 224, 3)
        assert all(np.array_equal(f, frames[0]) for f in frames)  # bit-identical decode
        assert clip.boundaries == [] and detect_cuts(frames) == []
        assert frames.std() > 5  # textured, not blank
    one = write_single_frame_video(tmp_path / "one.mp4", width=128, height=96)
    assert read_video_frames(one.path).shape == (1, 96, 128, 3)


def test_data_url_round_trip(tmp_path):
    clip = write_scene_video(tmp_path / "v.mp4", num_frames=8, width=64, height=64)
    url = video_data_url(clip.path)
    assert url.startswith("data:video/mp4;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == clip.path.read_bytes()
    assert clip.data_url() == url
    # the marker/info is JSON-serialisable metadata, not a second copy of the video
    assert json.dumps({"n": clip.num_frames, "b": clip.boundaries})
