"""Test-only vLLM workers (pass one with ``worker_cls=`` / ``--worker-cls``).

:class:`UnhookedRunnerCPUWorker` is vLLM's CPU worker with a model runner class HieraVid has
no hooks for, standing in for a runner the plugin never saw (Model Runner V2 on a GPU node,
or a platform's own runner): a HieraVid engine started with it must refuse at start-up.
"""
from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker


class UnhookedCPUModelRunner(CPUModelRunner):
    """vLLM's CPU runner under a class name the plugin does not know (same behaviour)."""


class UnhookedRunnerCPUWorker(CPUWorker):
    """vLLM's CPU worker building :class:`UnhookedCPUModelRunner`."""

    def init_device(self):
        super().init_device()
        self.model_runner.__class__ = UnhookedCPUModelRunner
