"""Tiny random-weight model directories for every architecture HieraVid supports.

``build_tiny_model(arch, out_dir=None, preset="tiny", seed=0, dtype="float32")`` returns a
directory that ``transformers`` (``AutoConfig`` / ``AutoProcessor`` / the model class) and vLLM
load offline (``HF_HUB_OFFLINE=1``): ``config.json`` + safetensors weights, a locally trained
byte-level BPE tokenizer (``Qwen2Tokenizer`` class), the chat template of the real checkpoints,
and the image/video processor configs.

Architectures (``arch``):
  ``qwen2_vl``         Qwen2VLForConditionalGeneration (Qwen2-VL-7B-Instruct layout)
  ``qwen2_5_vl``       Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL-7B-Instruct layout)
  ``llava_onevision``  LlavaOnevisionForConditionalGeneration, Qwen2 LM + SigLIP vision tower
                       (LLaVA-OneVision-7B and LLaVA-Video-7B-Qwen2 share this architecture)

Presets (``preset``): ``tiny`` (LM hidden 128, 4 layers, head_dim 64: fast tests), ``bench``
(LM hidden 512, 8 layers, head_dim 64: the LM dominates the cost, for CPU benchmarks) and
``bench_large`` (LM hidden 1024, 8 layers, head_dim 128, the 7B models' head layout). Vision
towers stay small (depth 2) in every preset. ``overrides`` (nested dict merged into the preset)
changes any size. LM layer counts are multiples of 4 (HieraVid prunes at 4 equal stages).

Built directories are cached under ``$HIERAVID_CACHE`` (default
``~/.cache/hieravid-vllm/models``) by a content key (arch, resolved preset, seed, dtype,
builder and transformers versions) and written atomically (temporary folder + rename, under
a file lock), so concurrent test workers share one build. ``model_info(dir)`` reads the
``hieravid_tiny_model.json`` marker (token ids, sizes, key) of a built directory.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from .tokenizer import LLAVA_EXTRA_SPECIAL_TOKENS, train_tokenizer

BUILDER_VERSION = 2  # bump whenever the files a build writes change
MARKER = "hieravid_tiny_model.json"
ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
PRESETS = ("tiny", "bench", "bench_large")

ARCH_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}

# The real Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct chat template (both identical).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-onevision-qwen2-7b-ov-hf's template (images, then videos, then text per
# message), extended to accept plain-string content as well.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Language-model sizes. mrope_section entries sum to head_dim / 2 (Qwen2-VL family).
_LM = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=256, mrope_section=[8, 12, 12]),
    "bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=1536, mrope_section=[8, 12, 12]),
    "bench_large": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=2816,
                        mrope_section=[16, 24, 24]),
}
# Small but valid vision towers (same in every preset), plus processor pixel limits.
_VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=4),
    "qwen2_5_vl": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                       window_size=112, fullatt_block_indexes=[1], tokens_per_second=2),
    "llava_onevision": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                            num_attention_heads=2, patch_size=14),
}
_PIXELS = {  # Qwen2-VL family processors (pixels per frame; 28x28 pixels per merged token)
    "tiny": dict(image_min_pixels=56 * 56, image_max_pixels=256 * 28 * 28,
                 video_min_pixels=56 * 56, video_max_pixels=256 * 28 * 28),
    "bench": dict(image_min_pixels=56 * 56, image_max_pixels=1280 * 28 * 28,
                  video_min_pixels=56 * 56, video_max_pixels=768 * 28 * 28),
}
_PIXELS["bench_large"] = _PIXELS["bench"]
_SIGLIP_IMAGE_SIZE = {"tiny": 224, "bench": 384, "bench_large": 384}  # 16x16 / 27x27 patches


def default_cache_dir() -> Path:
    env = os.environ.get("HIERAVID_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "hieravid-vllm"
    return base / "models"


def _deep_merge(base: dict, over: Mapping[str, Any] | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_spec(arch: str, preset: str = "tiny",
                 overrides: Mapping[str, Any] | None = None) -> dict:
    """The full size specification a build uses (what the cache key hashes)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    spec = {
        "lm": dict(_LM[preset], vocab_target=1024, rope_theta=1000000.0,
                   max_position_embeddings=32768, rms_norm_eps=1e-6),
        "vision": dict(_VISION[arch]),
        "processor": dict(_PIXELS[preset]) if arch != "llava_onevision" else
        {"image_size": _SIGLIP_IMAGE_SIZE[preset]},
    }
    spec = _deep_merge(spec, overrides)
    lm = spec["lm"]
    head_dim = lm["hidden_size"] // lm["num_attention_heads"]
    if lm["hidden_size"] % lm["num_attention_heads"]:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512):
        raise ValueError(f"head_dim {head_dim} is not supported by vLLM's CPU attention")
    if arch != "llava_onevision" and sum(lm["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section {lm['mrope_section']} must sum to head_dim/2 "
                         f"= {head_dim // 2}")
    if lm["num_hidden_layers"] % 4:
        raise ValueError("num_hidden_layers must be a multiple of 4 (4 pruning stages)")
    return spec


def cache_key(arch: str, preset: str = "tiny", seed: int = 0, dtype: str = "float32",
              overrides: Mapping[str, Any] | None = None) -> str:
    import transformers

    payload = {
        "arch": arch, "preset": preset, "seed": int(seed), "dtype": dtype,
        "spec": resolve_spec(arch, preset, overrides), "builder": BUILDER_VERSION,
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{arch}-{preset}-s{seed}-{dtype}-{digest}"


def model_info(model_dir: str | os.PathLike) -> dict:
    """The marker a builder wrote into ``model_dir`` (arch, key, token ids, sizes)."""
    return json.loads((Path(model_dir) / MARKER).read_text())


def is_built(model_dir: str | os.PathLike, key: str | None = None) -> bool:
    try:
        info = model_info(model_dir)
    except (OSError, ValueError):
        return False
    return key is None or info.get("key") == key


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place (replacing a stale one)."""
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    os.replace(tmp, final)


def build_tiny_model(arch: str, out_dir: str | os.PathLike | None = None, preset: str = "tiny",
                     seed: int = 0, dtype: str = "float32",
                     overrides: Mapping[str, Any] | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) a random-weight model directory and return its path.

    With ``out_dir=None`` the cached directory itself is returned (do not modify it);
    otherwise the cached build is copied to ``out_dir`` (skipped when ``out_dir`` already
    holds the same build).
    """
    key = cache_key(arch, preset, seed, dtype, overrides)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / key
    if not is_built(cached, key):
        with _file_lock(cache / f".{key}.lock"):
            if not is_built(cached, key):  # another worker may have finished meanwhile
                cache.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
                try:
                    _build(arch, tmp, preset, seed, dtype, overrides, key)
                    _publish(tmp, cached)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    if out_dir is None:
        return cached
    out = Path(out_dir)
    if is_built(out, key):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}") from None


def _build(arch: str, out: Path, preset: str, seed: int, dtype: str,
           overrides: Mapping[str, Any] | None, key: str) -> None:
    import torch
    import transformers

    spec = resolve_spec(arch, preset, overrides)
    lm, vis, proc = spec["lm"], spec["vision"], spec["processor"]
    torch_dtype = _torch_dtype(dtype)

    # 1. tokenizer (+ chat template)
    template = (LLAVA_ONEVISION_CHAT_TEMPLATE if arch == "llava_onevision"
                else QWEN2_VL_CHAT_TEMPLATE)
    extra = LLAVA_EXTRA_SPECIAL_TOKENS if arch == "llava_onevision" else ()
    tok = train_tokenizer(out, vocab_size=lm["vocab_target"], extra_special_tokens=extra,
                          chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    vocab_size = len(tok)  # exact: every id the LM can emit decodes
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text_kw = dict(
        vocab_size=vocab_size, hidden_size=lm["hidden_size"],
        intermediate_size=lm["intermediate_size"], num_hidden_layers=lm["num_hidden_layers"],
        num_attention_heads=lm["num_attention_heads"],
        num_key_value_heads=lm["num_key_value_heads"],
        max_position_embeddings=lm["max_position_embeddings"], rms_norm_eps=lm["rms_norm_eps"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=eos[0], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )

    # 2. config + processor
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        text_kw["rope_parameters"] = {"rope_type": "default", "rope_theta": lm["rope_theta"],
                                      "mrope_section": list(lm["mrope_section"])}
        if arch == "qwen2_vl":
            from transformers import Qwen2VLConfig as Cfg
            from transformers import Qwen2VLProcessor as Proc

            vision_cfg = dict(vis, hidden_size=lm["hidden_size"], patch_size=14,
                              spatial_merge_size=2, temporal_patch_size=2)
        else:
            from transformers import Qwen2_5_VLConfig as Cfg
            from transformers import Qwen2_5_VLProcessor as Proc

            vision_cfg = dict(vis, out_hidden_size=lm["hidden_size"], patch_size=14,
                              spatial_merge_size=2, temporal_patch_size=2)
        config = Cfg(text_config=text_kw, vision_config=vision_cfg,
                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image_processor = Qwen2VLImageProcessor(
            min_pixels=proc["image_min_pixels"], max_pixels=proc["image_max_pixels"],
            patch_size=14, temporal_patch_size=2, merge_size=2)
        video_processor = Qwen2VLVideoProcessor(
            min_pixels=proc["video_min_pixels"], max_pixels=proc["video_max_pixels"],
            patch_size=14, temporal_patch_size=2, merge_size=2, do_sample_frames=False,
            cap_pixels_per_frame=False)
        processor = Proc(image_processor=image_processor, tokenizer=tok,
                         video_processor=video_processor, chat_template=template)
        tokens_per_frame = None
    else:
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor,
                                  LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

        size = int(proc["image_size"])
        patches = size // vis["patch_size"]
        text_kw["rope_parameters"] = {"rope_type": "default", "rope_theta": lm["rope_theta"]}
        text_cfg = dict(text_kw, model_type="qwen2")
        vision_cfg = dict(vis, image_size=size, model_type="siglip_vision_model",
                          num_channels=3, vision_use_head=False)  # as llava-hf's configs
        pinpoints = [[size * a, size * b] for a in (1, 2) for b in (1, 2)]
        config = LlavaOnevisionConfig(
            text_config=text_cfg, vision_config=vision_cfg,
            image_token_index=ids["<image>"], video_token_index=ids["<video>"],
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
            multimodal_projector_bias=True, tie_word_embeddings=False)
        image_processor = LlavaOnevisionImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=pinpoints)
        video_processor = LlavaOnevisionVideoProcessor(size={"height": size, "width": size},
                                                       do_sample_frames=False)
        processor = LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
            num_image_tokens=patches * patches, vision_feature_select_strategy="full",
            chat_template=template, vision_aspect_ratio="anyres_max_9")
        tokens_per_frame = ((patches + 1) // 2) ** 2

    # 3. random weights
    model_cls = getattr(transformers, ARCH_CLASSES[arch])
    torch.manual_seed(seed)
    model = model_cls(config).to(torch_dtype).eval()
    _readable_greedy_output(model, tok)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.save_pretrained(str(out))
    if arch == "llava_onevision":
        _hub_layout_siglip_keys(out)
    processor.save_pretrained(str(out))
    # Stand-alone processor configs as in the real checkpoints' repos, too.
    image_processor.save_pretrained(str(out))  # preprocessor_config.json
    video_processor.save_pretrained(str(out))  # video_preprocessor_config.json
    tok.save_pretrained(str(out))  # tokenizer_config keeps the chat template too
    _fix_tokenizer_config(out)

    info = {
        "key": key, "arch": arch, "architecture": ARCH_CLASSES[arch], "preset": preset,
        "seed": seed, "dtype": dtype, "builder_version": BUILDER_VERSION,
        "transformers": transformers.__version__, "spec": spec,
        "vocab_size": vocab_size, "special_token_ids": ids,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "num_lm_parameters": int(sum(p.numel() for n, p in model.named_parameters()
                                     if "language_model" in n or "lm_head" in n)),
        "llava_tokens_per_frame": tokens_per_frame,
    }
    (out / MARKER).write_text(json.dumps(info, indent=2))  # last: marks the build complete


def _readable_greedy_output(model, tok) -> None:
    """Zero the output-embedding rows of special tokens and of tokens that do not decode to
    printable ASCII (lone UTF-8 bytes), so that greedy decoding of the random model prints
    (meaningless) word pieces instead of nothing. The model stays random otherwise; it never
    emits an end-of-sequence token, so generation runs to ``max_tokens``."""
    import torch

    weight = model.get_output_embeddings().weight
    special = set(tok.all_special_ids)
    bad = []
    for i in range(weight.shape[0]):
        text = tok.decode([i]) if i < len(tok) else ""
        if i in special or not text.strip() or not (text.isascii() and text.isprintable()):
            bad.append(i)
    with torch.no_grad():
        weight[bad] = 0


def _hub_layout_siglip_keys(out: Path) -> None:
    """transformers 5 saves the SigLIP tower flattened (``vision_tower.encoder...``); the
    real llava-hf checkpoints (and vLLM's loader) use ``vision_tower.vision_model.encoder...``.
    transformers loads either layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        renamed = {}
        for k, v in tensors.items():
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
                k = "vision_tower.vision_model." + k[len("vision_tower."):]
            renamed[k] = v.contiguous()
        save_file(renamed, str(shard), metadata={**meta, "format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            ("vision_tower.vision_model." + k[len("vision_tower."):]
             if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
             else k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def _fix_tokenizer_config(out: Path) -> None:
    """Declare the class real Qwen2 checkpoints use; drop load-time keys save_pretrained
    copies from a tokenizer that was itself loaded from disk."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    for k in ("is_local", "local_files_only", "_commit_hash"):
        cfg.pop(k, None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_all_tiny_models(preset: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Build every architecture at ``preset``; returns ``{arch: path}``."""
    return {arch: build_tiny_model(arch, preset=preset, seed=seed) for arch in ARCHS}


if __name__ == "__main__":  # python -m hieravid_vllm.testing.models [preset]
    import sys

    for arch, path in build_all_tiny_models(*(sys.argv[1:2] or ["tiny"])).items():
        print(arch, path)
