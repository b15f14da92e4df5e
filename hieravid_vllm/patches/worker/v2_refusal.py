"""``vllm.v1.worker.gpu.model_runner.GPUModelRunner.load_model`` (Model Runner V2): refuse a
HieraVid model.

What: after ``load_model`` the worker start-up guard
(:func:`hieravid_vllm.engine_setup.check_worker_setup`) stops start-up for a HieraVid model,
naming ``VLLM_USE_V2_MODEL_RUNNER``.
Why: Model Runner V2 (vLLM's GPU default whenever Triton imports) has none of HieraVid's
runner hooks; the engine config selects V1 (:func:`hieravid_vllm.engine_setup.
select_v1_runner`), this is the guard if V2 is used anyway.
When it can go: when HieraVid hooks Model Runner V2 (or V1 is removed: then the hooks move).
Unchanged behaviour without HieraVid options.
"""
from __future__ import annotations

from hieravid_vllm import engine_setup as hv_setup
from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.worker.gpu.model_runner"
TARGETS = ("GPUModelRunner.load_model",)


def apply(module) -> None:
    def make(orig):
        def load_model(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            hv_setup.check_worker_setup(self, self.get_model() if hasattr(self, "get_model")
                                        else getattr(self, "model", None))
            return out
        return load_model

    wrap(module.GPUModelRunner, "load_model", make)
