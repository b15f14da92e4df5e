"""``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (vLLM's V1 runners):
worker start-up guard and HieraVid's position recomputation.

What: after vLLM loaded the model, every worker runs the start-up guard
(:func:`hieravid_vllm.engine_setup.check_worker_setup`: hooked runner class, attention
backend, CUDA-graph mode, one KV cache group per stage on GPUs), and for HieraVid Qwen
models sets the runner's ``is_multimodal_pruning_enabled`` so that it calls the model's
``recompute_mrope_positions``.
Why: vLLM sets that flag only for its own EVS models (the CPU runner never sets it, see
ENVIRONMENT.md); there is no plugin hook after ``load_model``.
When it can go: when vLLM asks the model whether it prunes media embeddings.
Unchanged behaviour without HieraVid options (the model then is vLLM's own class).
"""
from __future__ import annotations

from hieravid_vllm import engine_setup as hv_setup
from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.worker.gpu_model_runner"
TARGETS = ("GPUModelRunner.load_model",)
CPU_MODULE = "vllm.v1.worker.cpu_model_runner"
CPU_TARGETS = ("CPUModelRunner.load_model",)


def _make(orig):
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        model = self.get_model()
        hv_setup.check_worker_setup(self, model)
        if getattr(model, "hieravid_position_channels", False) and \
                getattr(model, "hieravid_options", None) is not None:
            self.is_multimodal_pruning_enabled = True
        return out
    return load_model


def apply(module) -> None:
    wrap(module.GPUModelRunner, "load_model", _make)


def apply_cpu(module) -> None:
    wrap(module.CPUModelRunner, "load_model", _make)
