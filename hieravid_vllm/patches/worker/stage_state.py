"""``GPUModelRunner._execute_mm_encoder`` / ``._cache_encoder_output`` /
``._process_encoder_cache_scheduler_output`` / ``._on_request_state_removed`` (also the CPU
runner's): the lifecycle of the model's :class:`hieravid_vllm.stages.StageState`.

What: when vLLM caches a video's encoder output under its ``mm_hash``, the input-stage layout
the model recorded for that output row is filed under the same key; it is freed when the
scheduler frees the encoder-cache entry; layouts of rows vLLM did not cache (its profiling
run) are dropped at the end of the encoder run; a request's video spans are freed when the
runner drops the request's state.
Why: the in-LLM stages need each video's segment layout in the step that prefills it, and
vLLM's encoder cache holds tensors only; without these events the state would have no owner
(it used to hang on the cached tensors and in a dict cleared at 4096 entries).
When it can go: when vLLM's encoder cache can carry per-item metadata for the model.
Unchanged behaviour without HieraVid full mode (the model then has no stage state to feed).
"""
from __future__ import annotations

from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.worker.gpu_model_runner"
TARGETS = ("GPUModelRunner._execute_mm_encoder", "GPUModelRunner._cache_encoder_output",
           "GPUModelRunner._process_encoder_cache_scheduler_output",
           "GPUModelRunner._on_request_state_removed")


def _state(runner):
    if getattr(runner, "model", None) is None:  # not loaded yet
        return None
    model = runner.get_model()  # unwraps vLLM's CUDA-graph wrapper
    if not getattr(model, "hieravid_stages_enabled", False):
        return None
    return model.hieravid_state


def apply(module) -> None:
    def make_encoder_run(orig):
        def _execute_mm_encoder(self, *args, **kwargs):
            try:
                return orig(self, *args, **kwargs)
            finally:
                st = _state(self)
                if st is not None:
                    st.end_encoder_run()
        return _execute_mm_encoder

    def make_cache(orig):
        def _cache_encoder_output(self, mm_hash, output, *args, **kwargs):
            out = orig(self, mm_hash, output, *args, **kwargs)
            st = _state(self)
            if st is not None:
                st.cache_output(mm_hash, output)
            return out
        return _cache_encoder_output

    def make_free(orig):
        def _process_encoder_cache_scheduler_output(self, scheduler_output, *args, **kwargs):
            out = orig(self, scheduler_output, *args, **kwargs)
            st = _state(self)
            if st is not None:
                st.free_outputs(scheduler_output.free_encoder_mm_hashes)
            return out
        return _process_encoder_cache_scheduler_output

    def make_removed(orig):
        def _on_request_state_removed(self, req_id, *args, **kwargs):
            out = orig(self, req_id, *args, **kwargs)
            st = _state(self)
            if st is not None:
                st.free_request(req_id)
            return out
        return _on_request_state_removed

    cls = module.GPUModelRunner
    wrap(cls, "_execute_mm_encoder", make_encoder_run)
    wrap(cls, "_cache_encoder_output", make_cache)
    wrap(cls, "_process_encoder_cache_scheduler_output", make_free)
    wrap(cls, "_on_request_state_removed", make_removed)
