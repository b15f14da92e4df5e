"""``vllm.triton_utils.dispatcher._rebind_kernels``: llvmlite's modules left out of its scan.

What: while vLLM rebinds the platform's Triton kernel overrides (on CPU at every worker's
start-up: ``CpuPlatform.register_triton_kernel_overrides`` -> ``register_kernels`` ->
``_rebind_kernels``), the modules of ``llvmlite`` are taken out of ``sys.modules`` and put
back right after.
Why: that scan reads ``vars(value).get("kernel")`` for every attribute of every loaded module;
``llvmlite.binding.ffi.lib`` (loaded with numba -- the CPU greedy of HieraVid's selection, and
vLLM's own audio path through librosa) answers ``vars()`` with a ctypes wrapper, not a dict,
so a worker started in a process that has imported numba (a second offline ``LLM`` in one
process, an in-process engine after a selection) fails with ``AttributeError:
'_lib_fn_wrapper' object has no attribute 'get'``. llvmlite holds no vLLM kernel, so leaving
it out changes nothing the scan is for.
When it can go: when vLLM's scan skips namespaces whose ``vars()`` is not a dict (vLLM 0.32
and 0.33 have the bug).
Unchanged behaviour where llvmlite is not loaded; applied with or without HieraVid options.
"""
from __future__ import annotations

import sys

from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.triton_utils.dispatcher"
TARGETS = ("_rebind_kernels",)
HIDDEN = ("llvmlite",)


def apply(module) -> None:
    def make(orig):
        def _rebind_kernels(*args, **kwargs):
            hidden = {name: sys.modules.pop(name) for name in list(sys.modules)
                      if name.split(".", 1)[0] in HIDDEN}
            try:
                return orig(*args, **kwargs)
            finally:
                sys.modules.update(hidden)
        return _rebind_kernels

    wrap(module, "_rebind_kernels", make)
