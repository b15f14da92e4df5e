"""``GPUModelRunner.profile_run`` (also the CPU runner's): HieraVid in vLLM's memory profile.

What: pruning on vLLM's dummy profiling videos is not counted in the metrics
(:func:`hieravid_vllm.metrics.not_counted`); in full mode the profile run also runs the
largest in-LLM selection (:func:`hieravid_vllm.stages.profile_stage_selection`), so the KV
cache is sized with that workspace counted; afterwards the input-stage layouts the dummy
videos left in the model's stage state are dropped (vLLM caches those outputs directly).
Why: vLLM profiles only its own forward; a plugin cannot add work to the profile.
When it can go: when vLLM lets a model take part in the memory profile.
Unchanged behaviour without HieraVid options (both steps then do nothing).
"""
from __future__ import annotations

from hieravid_vllm import metrics as hv_metrics
from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.worker.gpu_model_runner"
TARGETS = ("GPUModelRunner.profile_run",)


def apply(module) -> None:
    def make(orig):
        def profile_run(self, *args, **kwargs):
            from hieravid_vllm.stages import profile_stage_selection

            with hv_metrics.not_counted():
                out = orig(self, *args, **kwargs)
                profile_stage_selection(self)  # its workspace counts in the memory profile
            # the dummy encoder outputs go straight into vLLM's encoder cache, past the stage
            # state's encoder-run hook: drop the layouts they left pending (max-size videos)
            state = getattr(self.get_model(), "hieravid_state", None)
            if state is not None:
                state.end_encoder_run()
            return out
        return profile_run

    wrap(module.GPUModelRunner, "profile_run", make)
