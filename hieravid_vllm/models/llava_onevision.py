"""HieraVid variant of vLLM's LLaVA-OneVision (also LLaVA-Video-7B-Qwen2)."""
from __future__ import annotations

import math

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder, LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor, LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hieravid_vllm.engine_setup import StageKVCacheGroupingMixin

from hieravid_vllm.stages import HieraVidStagesMixin

from hieravid_vllm.models.common import (BUDGET_FIELD, HieraVidProcessorMixin, num_llm_layers,
                                         prune_video, serving_options, video_item_options)


class HieraVidLlavaOnevisionMultiModalProcessor(HieraVidProcessorMixin,
                                                LlavaOnevisionMultiModalProcessor):
    def _hieravid_grid(self, out_mm_kwargs, mm_items, item_idx):
        videos = mm_items.get_items("video", object)
        frames = videos.get_num_frames(item_idx)
        size = videos.get_frame_size(item_idx)
        per_frame = self.info._get_num_frame_tokens(image_width=size.width,
                                                    image_height=size.height)
        return frames, per_frame, 1  # + the newline token, never pruned


@MULTIMODAL_REGISTRY.register_processor(HieraVidLlavaOnevisionMultiModalProcessor,
                                        info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class HieraVidLlavaOnevisionForConditionalGeneration(HieraVidStagesMixin,
                                                     StageKVCacheGroupingMixin,
                                                     LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with HieraVid video-token pruning. Positions stay 1-D: vLLM numbers
    the (shorter) placeholder run as it is."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.hieravid_options = serving_options(self.config)
        self.hieravid_num_layers = num_llm_layers(self.config)
        self._hieravid_stages_setup()

    def _pooled_side(self) -> int:
        vc = self.config.vision_config
        return math.ceil((vc.image_size // vc.patch_size) / 2)

    def embed_multimodal(self, **kwargs):
        if self.hieravid_options is None:
            return super().embed_multimodal(**kwargs)
        budgets = kwargs.pop(BUDGET_FIELD, None)  # per video, set by the prompt processor
        mm_input_by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out = ()
        side = self._pooled_side()
        for modality, inp in mm_input_by_modality.items():
            if modality == "image":
                out += tuple(self._process_image_input(inp))
                continue
            pixels = inp["pixel_values_videos"]
            frames = [v.shape[0] for v in pixels] if not isinstance(pixels, torch.Tensor) \
                else [pixels.shape[1]] * pixels.shape[0]
            item_opts = video_item_options(self.hieravid_options, budgets, len(frames))
            for emb, f, opts in zip(self._process_video_pixels(inp), frames, item_opts):
                emb = emb.reshape(-1, emb.shape[-1])           # (f * side^2 + 1, C)
                feats = emb[:-1].reshape(f, side, side, emb.shape[-1])
                res = prune_video(feats, opts, self.hieravid_num_layers)
                row = torch.cat([res.features.to(emb.dtype), emb[-1:]], dim=0)
                self.hieravid_add_video_output(row, res)
                out += (row,)
        return out
