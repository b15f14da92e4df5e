"""HieraVid variant of vLLM's Qwen2.5-VL."""
from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,
                                                    Qwen2_5_VLForConditionalGeneration,
                                                    Qwen2_5_VLMultiModalProcessor,
                                                    Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from hieravid_vllm.engine_setup import StageKVCacheGroupingMixin

from hieravid_vllm.models.qwen2_vl import HieraVidQwenModelMixin, HieraVidQwenProcessorMixin


class HieraVidQwen2_5_VLMultiModalProcessor(HieraVidQwenProcessorMixin,
                                            Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(HieraVidQwen2_5_VLMultiModalProcessor,
                                        info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class HieraVidQwen2_5_VLForConditionalGeneration(HieraVidQwenModelMixin,
                                                 StageKVCacheGroupingMixin,
                                                 Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with HieraVid video-token pruning (serves Qwen2.5-VL checkpoints)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._hieravid_setup()
        if self.hieravid_options is not None:
            # vLLM's own EVS must not run on top of HieraVid.
            self.video_pruning_rate = None
