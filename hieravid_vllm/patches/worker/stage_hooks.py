"""``GPUModelRunner.execute_model`` / ``_get_slot_mappings`` / ``_build_attention_metadata``
(also the CPU runner's): the per-stage attention metadata of the in-LLM stages.

What: ``execute_model`` marks the real forward steps; ``_get_slot_mappings`` keeps the
per-layer slot-mapping dict; ``_build_attention_metadata`` builds the step plan and one
attention metadata and slot mapping per stage (:func:`hieravid_vllm.stages.build_step_plan`)
right after vLLM built its own, and hands the plan to the model's
:class:`hieravid_vllm.stages.StageState` for this step's forward. Arguments are read by name
(``inspect.signature(...).bind`` when any comes by position), not by position.
Why: vLLM builds one attention metadata per KV cache group for all layers; HieraVid's later
stages attend over fewer (compacted) tokens.
When it can go: when vLLM lets a model build metadata for layers with fewer tokens.
Unchanged behaviour without HieraVid full mode (``hieravid_stages_enabled`` is false).
"""
from __future__ import annotations

import inspect

from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.v1.worker.gpu_model_runner"
TARGETS = ("GPUModelRunner.execute_model", "GPUModelRunner._get_slot_mappings",
           "GPUModelRunner._build_attention_metadata")


def apply(module) -> None:
    cls = module.GPUModelRunner

    def make_exec(orig):
        def execute_model(self, *args, **kwargs):
            self._hieravid_in_step = True
            try:
                return orig(self, *args, **kwargs)
            finally:
                self._hieravid_in_step = False
        return execute_model

    def make_slots(orig):
        def _get_slot_mappings(self, *args, **kwargs):
            by_gid, by_layer = orig(self, *args, **kwargs)
            self._hieravid_slot_by_layer = by_layer
            return by_gid, by_layer
        return _get_slot_mappings

    def make_build(orig):
        sig = inspect.signature(orig)

        def _build_attention_metadata(self, *args, **kwargs):
            attn_metadata, spec = orig(self, *args, **kwargs)
            model = self.get_model()
            if not getattr(model, "hieravid_stages_enabled", False):
                return attn_metadata, spec
            model.hieravid_state.set_plan(None)
            # vLLM passes everything by keyword; bind only a positional call (once per step
            # it would cost more than the rest of this hook on a decode step)
            bound = sig.bind(self, *args, **kwargs).arguments if args else kwargs
            if not getattr(self, "_hieravid_in_step", False) or \
                    bound.get("for_cudagraph_capture") or \
                    bound.get("ubatch_slices") is not None:
                return attn_metadata, spec
            num_reqs, num_tokens = bound.get("num_reqs"), bound.get("num_tokens")
            ids = self.input_batch.req_ids[:num_reqs]
            if not num_reqs or any(r not in self.requests for r in ids):
                return attn_metadata, spec
            from hieravid_vllm.stages import build_step_plan

            plan = build_step_plan(self, model, attn_metadata,
                                   getattr(self, "_hieravid_slot_by_layer", None), num_reqs,
                                   num_tokens)
            model.hieravid_state.set_plan(plan)
            return attn_metadata, spec
        return _build_attention_metadata

    wrap(cls, "execute_model", make_exec)
    wrap(cls, "_get_slot_mappings", make_slots)
    wrap(cls, "_build_attention_metadata", make_build)
