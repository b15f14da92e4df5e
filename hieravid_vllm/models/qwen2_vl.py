"""HieraVid variant of vLLM's Qwen2-VL (also the base of the Qwen2.5-VL variant)."""
from __future__ import annotations

import dataclasses

from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder,
                                                  Qwen2VLForConditionalGeneration,
                                                  Qwen2VLMultiModalProcessor,
                                                  Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hieravid_vllm.engine_setup import StageKVCacheGroupingMixin

from hieravid_vllm.stages import HieraVidStagesMixin

from hieravid_vllm.models.common import (BUDGET_FIELD, HieraVidMRoPEMixin,
                                         HieraVidProcessorMixin, append_position_channels,
                                         full_grid_thw, num_llm_layers, prune_video,
                                         serving_options, video_item_options)


class HieraVidQwenProcessorMixin(HieraVidProcessorMixin):
    def _hieravid_grid(self, out_mm_kwargs, mm_items, item_idx):
        t, h, w = (int(x) for x in out_mm_kwargs["video"][item_idx]["video_grid_thw"].data)
        m = self.info.get_hf_config().vision_config.spatial_merge_size
        return t, (h // m) * (w // m), 0


class HieraVidQwen2VLMultiModalProcessor(HieraVidQwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class HieraVidQwenModelMixin(HieraVidMRoPEMixin, HieraVidStagesMixin):
    """embed_multimodal with the HieraVid input stage for the Qwen2-VL family."""

    #: tells the model-runner patch that media embeddings carry position channels
    hieravid_position_channels = True

    def _hieravid_setup(self) -> None:
        self.hieravid_options = serving_options(self.config)
        self.hieravid_num_layers = num_llm_layers(self.config)
        self._hieravid_stages_setup()

    def get_encoder_cudagraph_config(self):
        # Pruning post-processes the encoder output in embed_multimodal, which the encoder
        # CUDA-graph path bypasses (vLLM disables it for EVS for the same reason).
        cfg = super().get_encoder_cudagraph_config()
        if self.hieravid_options is not None and dataclasses.is_dataclass(cfg):
            cfg = dataclasses.replace(cfg, modalities=[])
        return cfg

    def embed_multimodal(self, **kwargs):
        if self.hieravid_options is None:
            return super().embed_multimodal(**kwargs)
        budgets = kwargs.pop(BUDGET_FIELD, None)  # per video, set by the prompt processor
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        tps = float(getattr(self.config.vision_config, "tokens_per_second", 1.0) or 1.0)
        out = ()
        for key, inp in modalities.items():
            if inp is None:
                continue
            if key.startswith("image"):
                for emb, (t, h, w) in zip(self._process_image_input(inp),
                                          inp["image_grid_thw"].tolist()):
                    out += (append_position_channels(emb, full_grid_thw(t, h // merge, w // merge),
                                                     1.0),)
                continue
            sec = inp.get("second_per_grid_ts") if hasattr(inp, "get") else None
            grids = inp["video_grid_thw"].tolist()
            item_opts = video_item_options(self.hieravid_options, budgets, len(grids))
            for i, (emb, (t, h, w)) in enumerate(zip(self._process_video_input(inp), grids)):
                feats = emb.reshape(t, h // merge, w // merge, emb.shape[-1])
                res = prune_video(feats, item_opts[i], self.hieravid_num_layers)
                t_scale = float(sec[i]) * tps if sec is not None else 1.0
                row = append_position_channels(res.features.to(emb.dtype), res.thw, t_scale)
                self.hieravid_add_video_output(row, res)
                out += (row,)
        return out



@MULTIMODAL_REGISTRY.register_processor(HieraVidQwen2VLMultiModalProcessor,
                                        info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class HieraVidQwen2VLForConditionalGeneration(HieraVidQwenModelMixin,
                                              StageKVCacheGroupingMixin,
                                              Qwen2VLForConditionalGeneration):
    """Qwen2-VL with HieraVid video-token pruning (serves Qwen2-VL checkpoints)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._hieravid_setup()
