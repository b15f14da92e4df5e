"""Reference prompt-token counts from transformers' processor (independent of vLLM).

``hf_video_prompt(model_dir, frames, question)`` renders the chat template for one user turn
``[video, text]`` with the model's ``AutoProcessor``, runs the processor on the given decoded
frames and returns the token accounting (video tokens, text tokens, total). vLLM's
``usage.prompt_tokens`` for the same frames must equal ``prompt_tokens`` (what the
end-to-end tests check; HieraVid-pruned servers report fewer).

Frames must be exactly the ones vLLM samples: write clips at the fps given to the server
(``--media-io-kwargs '{"video": {"fps": N}}'``) with an even frame count and at most 32
frames, and both sides take every frame (vLLM's Qwen2-VL loader samples
``total / source_fps * fps`` frames floored to a multiple of 2; its generic OpenCV loader,
used for LLaVA-OneVision, takes ``min(32, duration * fps)`` frames).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class PromptTokens:
    prompt_tokens: int   # what vLLM reports as usage.prompt_tokens
    video_tokens: int    # video placeholder tokens after the processor's expansion
    text_tokens: int     # everything else (template + question)
    text: str            # the rendered chat template (one placeholder per video)


def video_messages(question: str, video: dict | None = None) -> list[dict]:
    """One user turn with a video part then a text part. ``video`` defaults to the
    template-side form ``{"type": "video"}``; pass ``{"type": "video_url", "video_url":
    {"url": ...}}`` for an OpenAI request."""
    return [{"role": "user", "content": [video or {"type": "video"},
                                         {"type": "text", "text": question}]}]


@lru_cache(maxsize=8)
def _processor(model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def hf_video_prompt(model_dir: str | os.PathLike, frames: np.ndarray, question: str,
                    **processor_kwargs) -> PromptTokens:
    """Token accounting of a ``[video, question]`` user turn with the HF processor.

    ``frames``: ``uint8`` array (T, H, W, 3), RGB, every frame that vLLM also samples."""
    proc = _processor(str(model_dir))
    text = proc.apply_chat_template(video_messages(question), add_generation_prompt=True,
                                    tokenize=False)
    enc = proc(text=[text], videos=[np.asarray(frames)], return_tensors="np",
               **processor_kwargs)
    ids = np.asarray(enc["input_ids"][0])
    video_id = proc.tokenizer.convert_tokens_to_ids(proc.video_token)
    n_video = int((ids == video_id).sum())
    # Independent check of the text side: the template tokenised alone holds one placeholder.
    plain = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_text = len(plain) - plain.count(video_id)
    if n_text + n_video != len(ids):
        raise AssertionError(f"processor output ({len(ids)} ids) != text ({n_text}) + video "
                             f"({n_video}) tokens")
    return PromptTokens(len(ids), n_video, n_text, text)


def hf_text_prompt_tokens(model_dir: str | os.PathLike, question: str) -> int:
    """Prompt tokens of a text-only user turn (chat template + tokenizer)."""
    proc = _processor(str(model_dir))
    msgs = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return len(proc.tokenizer(text, add_special_tokens=False)["input_ids"])


def expected_video_tokens(arch: str, num_frames: int, height: int, width: int,
                          llava_tokens_per_frame: int | None = None) -> int:
    """Closed-form video-token count for frames already at a size the processor keeps
    (Qwen2-VL family: multiples of 28 within min/max pixels; LLaVA-OV: resized to a square,
    ``llava_tokens_per_frame`` = ceil(patches/2)^2 per frame plus one newline token)."""
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        t = (num_frames + 1) // 2  # temporal patch 2 (an odd last frame is repeated)
        return t * (height // 28) * (width // 28)
    if arch == "llava_onevision":
        if llava_tokens_per_frame is None:
            raise ValueError("llava_tokens_per_frame is required for llava_onevision")
        return num_frames * llava_tokens_per_frame + 1
    raise ValueError(arch)
