"""``InputProcessor._validate_model_input``: full-mode prompts that can never be prefilled.

What: a full-mode prompt whose videos and question do not fit one prefill step
(``--max-num-batched-tokens``) or whose media do not fit the encoder cache is rejected with
a 400 naming the option to raise (:func:`hieravid_vllm.engine_setup.prompt_needs`).
Why: the HieraVid scheduler never splits a video from the end of its prompt, so such a
request would wait forever.
When it can go: when vLLM lets a model or scheduler reject a prompt at input processing.
Unchanged behaviour without HieraVid options (the HF config then has no ``hieravid``).
"""
from __future__ import annotations

from hieravid_vllm import engine_setup as hv_setup
from hieravid_vllm import options as hv_options
from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.engine.input_processor"
TARGETS = ("InputProcessor._validate_model_input",)


def apply(module) -> None:
    def make(orig):
        def _validate_model_input(self, prompt_input, prompt_type):
            orig(self, prompt_input, prompt_type)
            raw = getattr(self.model_config.hf_config, hv_options.CONFIG_KEY, None)
            if not raw or prompt_input.get("type") != "multimodal":
                return
            if hv_options.ServingOptions.from_dict(raw).config.mode != "full":
                return
            need, enc = hv_setup.prompt_needs(len(prompt_input["prompt_token_ids"]),
                                              prompt_input.get("mm_placeholders"))
            budget = int(self.vllm_config.scheduler_config.max_num_batched_tokens)
            from vllm.exceptions import VLLMValidationError  # a client error: HTTP 400

            if need > budget:
                raise VLLMValidationError(
                    f"HieraVid: the video(s) and the text after them ({need} tokens) must be "
                    f"prefilled in one step, but --max-num-batched-tokens is {budget}; send a "
                    f"shorter video or start the server with --max-num-batched-tokens >= {need}")
            if self.mm_encoder_cache_size and enc > self.mm_encoder_cache_size:
                raise VLLMValidationError(
                    f"HieraVid: the media of this prompt ({enc} encoder tokens) must be "
                    f"encoded in one step, but the encoder cache holds "
                    f"{self.mm_encoder_cache_size}; send fewer/shorter videos or raise "
                    f"--max-num-batched-tokens", parameter="messages")
        return _validate_model_input

    wrap(module.InputProcessor, "_validate_model_input", make)
