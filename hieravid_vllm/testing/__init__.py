"""Test, benchmark and demo helpers (no model hub needed).

``models``        tiny random-weight model directories: ``build_tiny_model(arch, ...)``
``tokenizer``     the locally trained byte-level BPE tokenizer they use
``video``         synthetic mp4 clips with known scene cuts, static and one-frame clips
``server``        ``VLLMServer``: vLLM's OpenAI server as a managed subprocess
``hf_reference``  prompt-token counts from transformers' processor, for comparison

Importing this package is cheap: torch, transformers and vLLM load only when used.
"""
from .hf_reference import PromptTokens, expected_video_tokens, hf_video_prompt
from .models import ARCHS, build_tiny_model, model_info
from .server import VLLMServer, VLLMServerError, video_chat
from .video import (SyntheticVideo, read_video_frames, video_data_url, write_scene_video,
                    write_single_frame_video, write_static_video)

__all__ = [
    "ARCHS", "PromptTokens", "SyntheticVideo", "VLLMServer", "VLLMServerError",
    "build_tiny_model", "expected_video_tokens", "hf_video_prompt", "model_info",
    "read_video_frames", "video_chat", "video_data_url", "write_scene_video",
    "write_single_frame_video", "write_static_video",
]
