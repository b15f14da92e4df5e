"""``EngineArgs.create_engine_config``: HieraVid's engine configuration.

What: with ``additional_config["hieravid"]`` it checks the vLLM version and that every
patch found its target (:func:`hieravid_vllm.patches.require`), selects vLLM's V1 model
runner (:func:`hieravid_vllm.engine_setup.select_v1_runner`), installs the HieraVid
scheduler in full mode or falls back to ``input_only``
(:func:`hieravid_vllm.engine_setup.configure_stages`), installs the ``hf_overrides`` step
(:class:`hieravid_vllm.engine_setup.HieraVidHfOverrides`: HieraVid architecture + options in
the HF config, which every vLLM process sees) and sets up the metrics directory the engine
processes inherit. Without ``hieravid`` options nothing is changed.
Why: this is the one place that runs before any vLLM process reads the config.
When it can go: when vLLM gives plugins a config hook (a platform/plugin
``check_and_update_config`` for general plugins).
Applied in every process, also with an unsupported vLLM (it then refuses HieraVid options).
"""
from __future__ import annotations

import logging

from hieravid_vllm import engine_setup as hv_setup
from hieravid_vllm import metrics as hv_metrics
from hieravid_vllm import options as hv_options
from hieravid_vllm.patches._wrap import wrap

logger = logging.getLogger("vllm.hieravid_vllm")

MODULE = "vllm.engine.arg_utils"
TARGETS = ("EngineArgs.create_engine_config",)


def apply(module) -> None:
    def make(orig):
        def create_engine_config(self, *args, **kwargs):
            opts = hv_options.options_from_additional_config(self.additional_config)
            if opts is not None and not isinstance(self.hf_overrides,
                                                   hv_setup.HieraVidHfOverrides):
                hv_setup.check_vllm_version()
                from hieravid_vllm import patches

                patches.require()
                self.additional_config = {**self.additional_config,
                                          hv_options.CONFIG_KEY: opts.to_dict()}
                hv_setup.select_v1_runner(self)
                opts = hv_setup.configure_stages(self, opts)
                self.hf_overrides = hv_setup.HieraVidHfOverrides(opts.to_dict(),
                                                                 self.hf_overrides)
                hv_metrics.setup_api_process()
                logger.info("HieraVid enabled: %s", opts.to_dict())
            return orig(self, *args, **kwargs)
        return create_engine_config

    wrap(module.EngineArgs, "create_engine_config", make)
