"""``GPUModelRunner.execute_model`` / ``_prepare_inputs`` / ``_get_slot_mappings`` /
``_build_attention_metadata`` (also the CPU runner's): the per-stage attention metadata of the
in-LLM stages.

What: ``execute_model`` marks the real forward steps; ``_get_slot_mappings`` keeps the
per-layer slot-mapping dict; ``_build_attention_metadata`` builds the step plan and one
attention metadata and slot mapping per stage (:func:`hieravid_vllm.stages.build_step_plan`)
right after vLLM built its own, and hands the plan to the model's
:class:`hieravid_vllm.stages.StageState` for this step's forward. Arguments are read by name
(``inspect.signature(...).bind`` when any comes by position), not by position.
When the plan will replace the metadata and slot mappings of every layer of KV cache groups
1..S-1 (:func:`hieravid_vllm.stages.plan_replaces_stage_groups`: one group per stage and a
video in the batch; decided once per step in ``_prepare_inputs``), vLLM computes group 0's
only: ``_prepare_inputs`` runs with the batch's ``MultiGroupBlockTable.compute_slot_mapping``
(an instance wrapper, installed once per block table) limited to group 0, and
``_build_attention_metadata`` with a ``kv_cache_config`` holding group 0 only (restored right
after). A step that skipped them and then builds no plan is an error, never stale slots.
Why: vLLM builds one attention metadata per KV cache group for all layers; HieraVid's later
stages attend over fewer (compacted) tokens, and vLLM's own slot mappings and metadata for
those groups would be computed and thrown away on every step (S-1 slot-mapping kernels and
S-1 metadata builds, full builds on backends without ``update_block_table`` such as CPU_ATTN;
benchmarks/RESULTS.md, "Engine step profile").
When it can go: when vLLM lets a model build metadata for layers with fewer tokens.
Unchanged behaviour without HieraVid full mode (``hieravid_stages_enabled`` is false).
"""
from __future__ import annotations

import dataclasses
import inspect

from hieravid_vllm.patches._wrap import is_wrapped, wrap, wrap_instance

MODULE = "vllm.v1.worker.gpu_model_runner"
TARGETS = ("GPUModelRunner.execute_model", "GPUModelRunner._prepare_inputs",
           "GPUModelRunner._get_slot_mappings", "GPUModelRunner._build_attention_metadata")

#: block-table flag: this step's slot mappings are computed for KV cache group 0 only
_FIRST_ONLY = "_hieravid_first_group_only"


def _first_group_slots(block_table) -> bool:
    """Install (once per ``MultiGroupBlockTable``) the instance wrapper of
    ``compute_slot_mapping`` that computes group 0's only while the table's flag is set.
    False (nothing skipped) for a block table of another shape."""
    groups = getattr(block_table, "block_tables", None)
    if not groups or not callable(getattr(block_table, "compute_slot_mapping", None)):
        return False
    if not is_wrapped(block_table.compute_slot_mapping):
        def make(orig):
            def compute_slot_mapping(*args, **kwargs):
                if getattr(block_table, _FIRST_ONLY, False):
                    return block_table.block_tables[0].compute_slot_mapping(*args, **kwargs)
                return orig(*args, **kwargs)
            return compute_slot_mapping
        wrap_instance(block_table, "compute_slot_mapping", make)
    return True


def _first_group_config(runner):
    """``runner.kv_cache_config`` with KV cache group 0 only (cached per config object)."""
    full = runner.kv_cache_config
    cached = getattr(runner, "_hieravid_first_group_config", None)
    if cached is None or cached[0] is not full:
        cached = (full, dataclasses.replace(full, kv_cache_groups=full.kv_cache_groups[:1]))
        runner._hieravid_first_group_config = cached
    return cached[1]


def apply(module) -> None:
    cls = module.GPUModelRunner

    def make_exec(orig):
        def execute_model(self, *args, **kwargs):
            self._hieravid_in_step = True
            self._hieravid_first_group = False
            try:
                return orig(self, *args, **kwargs)
            finally:
                self._hieravid_in_step = False
                self._hieravid_first_group = False
        return execute_model

    def make_prepare(orig):
        def _prepare_inputs(self, *args, **kwargs):
            first = False
            if getattr(self, "_hieravid_in_step", False):
                model = self.get_model()
                if getattr(model, "hieravid_stages_enabled", False):
                    from hieravid_vllm.stages import plan_replaces_stage_groups

                    ib = self.input_batch
                    n = ib.num_reqs
                    first = bool(n) and all(r in self.requests for r in ib.req_ids[:n]) and \
                        plan_replaces_stage_groups(self, model, n) and \
                        _first_group_slots(ib.block_table)
            self._hieravid_first_group = first
            if not first:
                return orig(self, *args, **kwargs)
            bt = self.input_batch.block_table
            setattr(bt, _FIRST_ONLY, True)
            try:
                return orig(self, *args, **kwargs)
            finally:
                setattr(bt, _FIRST_ONLY, False)
        return _prepare_inputs

    def make_slots(orig):
        def _get_slot_mappings(self, *args, **kwargs):
            by_gid, by_layer = orig(self, *args, **kwargs)
            self._hieravid_slot_by_layer = by_layer
            return by_gid, by_layer
        return _get_slot_mappings

    def make_build(orig):
        sig = inspect.signature(orig)

        def _build_attention_metadata(self, *args, **kwargs):
            model = self.get_model()
            if not getattr(model, "hieravid_stages_enabled", False):
                return orig(self, *args, **kwargs)
            model.hieravid_state.set_plan(None)
            first = getattr(self, "_hieravid_first_group", False)
            # vLLM passes everything by keyword; bind only a positional call (once per step
            # it would cost more than the rest of this hook on a decode step)
            bound = sig.bind(self, *args, **kwargs).arguments if args else kwargs
            num_reqs, num_tokens = bound.get("num_reqs"), bound.get("num_tokens")
            planned = getattr(self, "_hieravid_in_step", False) and \
                not bound.get("for_cudagraph_capture") and \
                bound.get("ubatch_slices") is None and bool(num_reqs) and \
                all(r in self.requests for r in self.input_batch.req_ids[:num_reqs])
            if first and not (planned and num_reqs == self.input_batch.num_reqs):
                raise RuntimeError("HieraVid: the slot mappings of KV cache groups 1.. were "
                                   "left to the stage plan in a step that builds none")
            if not planned:
                return orig(self, *args, **kwargs)
            if first:  # vLLM builds group 0's metadata only; the plan builds the others
                full = self.kv_cache_config
                self.kv_cache_config = _first_group_config(self)
                try:
                    attn_metadata, spec = orig(self, *args, **kwargs)
                finally:
                    self.kv_cache_config = full
            else:
                attn_metadata, spec = orig(self, *args, **kwargs)
            from hieravid_vllm.stages import build_step_plan

            plan = build_step_plan(self, model, attn_metadata,
                                   getattr(self, "_hieravid_slot_by_layer", None), num_reqs,
                                   num_tokens)
            if first and plan is None:
                raise RuntimeError("HieraVid: no stage plan for a step whose KV cache groups "
                                   "1.. were left to it")
            model.hieravid_state.set_plan(plan)
            return attn_metadata, spec
        return _build_attention_metadata

    wrap(cls, "execute_model", make_exec)
    wrap(cls, "_prepare_inputs", make_prepare)
    wrap(cls, "_get_slot_mappings", make_slots)
    wrap(cls, "_build_attention_metadata", make_build)
