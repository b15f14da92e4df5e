"""HieraVid variants of vLLM's video models (thin subclasses; the algorithm lives in core)."""

#: original architecture -> (HieraVid architecture name, "module:Class" for vLLM's registry)
HIERAVID_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": (
        "HieraVidQwen2VLForConditionalGeneration",
        "hieravid_vllm.models.qwen2_vl:HieraVidQwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": (
        "HieraVidQwen2_5_VLForConditionalGeneration",
        "hieravid_vllm.models.qwen2_5_vl:HieraVidQwen2_5_VLForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": (
        "HieraVidLlavaOnevisionForConditionalGeneration",
        "hieravid_vllm.models.llava_onevision:HieraVidLlavaOnevisionForConditionalGeneration"),
}
