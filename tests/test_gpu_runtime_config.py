"""What HieraVid does with GPU-only settings, decided at engine-config time (CPU, real vLLM).

Engine configs are resolved through vLLM's real ``EngineArgs.create_engine_config`` with the
plugin's patches applied. On a GPU node ``vllm.triton_utils.HAS_TRITON`` is true, which makes
vLLM 0.32 pick Model Runner V2 (no HieraVid hooks); the tests report Triton importable the way
a GPU node does (``vllm.config.vllm.HAS_TRITON``) and nothing else.

* the runner: with HieraVid on, vLLM resolves ``use_v2_model_runner == False`` (the V1 runner
  the plugin hooks), decided in the config process through ``VLLM_USE_V2_MODEL_RUNNER=0`` in
  the environment the engine processes inherit; without HieraVid the same config resolves to
  V2 (the check can fail); an explicit ``VLLM_USE_V2_MODEL_RUNNER=1`` or a V2-only feature
  (watermarking) stops start-up naming it;
* settings the in-LLM stages cannot follow (LoRA, context parallelism, KV connectors,
  encoder-cache connectors,
  ``--disable-hybrid-kv-cache-manager``, ``--async-scheduling``, dual-batch overlap /
  micro-batching (``--enable-dbo``, ``--ubatch-size``), CUDA graphs that capture
  attention metadata, attention+quant fusion, inductor graph partitioning, custom splitting
  ops, batch-invariant mode): full mode falls back to ``input_only`` with a warning naming
  the setting; the resolved config carries ``input_only`` to every process;
* the worker guard (:func:`hieravid_vllm.engine_setup.check_worker_setup`) on a real CPU
  runner: passes as started, refuses a CUDA-graph mode that captures attention and a runner
  class without hooks, and a real engine start whose worker builds an unhooked runner class
  stops with the guard's message; vLLM's ``profile_run`` on that runner performs the largest in-LLM
  selection the server can meet (so the KV cache is sized with its workspace counted);
* the model's stage state (:class:`hieravid_vllm.stages.StageState`) on that real engine:
  after each of twelve videos it holds a layout exactly for the video encoder outputs vLLM
  still caches, no per-request entries, nothing pending.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from hieravid_vllm.testing.models import build_tiny_model

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"


@pytest.fixture()
def gpu_like(monkeypatch):
    """vLLM as a GPU node configures it: Triton importable; no V2 choice in the environment
    (restored afterwards: the plugin writes its choice into os.environ)."""
    import vllm.config.vllm as vllm_config_mod

    from hieravid_vllm.vllm_patches import apply_all

    apply_all()
    monkeypatch.setattr(vllm_config_mod, "HAS_TRITON", True)
    monkeypatch.delenv(V2_ENV, raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    return monkeypatch


def _args(hieravid: dict | None, **kw):
    from vllm.engine.arg_utils import EngineArgs

    extra = {"additional_config": {"hieravid": hieravid}} if hieravid else {}
    return EngineArgs(model=str(build_tiny_model("qwen2_5_vl")), max_model_len=4096,
                      enforce_eager=True, **extra, **kw)


def _mode(cfg) -> str:
    from hieravid_vllm.options import ServingOptions

    return ServingOptions.from_dict(cfg.model_config.hf_config.hieravid).config.mode


def test_hieravid_resolves_to_the_v1_runner(gpu_like):
    import os

    plain = _args(None).create_engine_config()
    assert plain.use_v2_model_runner is True  # what a GPU node gets without HieraVid
    cfg = _args({"budget": 0.3}).create_engine_config()
    assert os.environ[V2_ENV] == "0"  # inherited by the engine core and the workers
    assert cfg.use_v2_model_runner is False
    assert _mode(cfg) == "full"


def test_explicit_v2_runner_is_refused(gpu_like):
    gpu_like.setenv(V2_ENV, "1")
    with pytest.raises(ValueError, match=f"{V2_ENV}=1"):
        _args({"budget": 0.3}).create_engine_config()


def test_v2_only_feature_is_refused(gpu_like):
    with pytest.raises(ValueError, match="watermarking.*--watermark-config"):
        _args({"budget": 0.3}, watermark_config={"type": "gumbel"}).create_engine_config()


FALLBACKS = [
    (dict(enable_lora=True), "--enable-lora"),
    (dict(decode_context_parallel_size=2), "--decode-context-parallel-size"),
    (dict(prefill_context_parallel_size=2), "--prefill-context-parallel-size"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
     "--kv-transfer-config"),
    (dict(ec_transfer_config={"ec_connector": "ECExampleConnector", "ec_role": "ec_consumer",
                              "ec_connector_extra_config": {"shared_storage_path": "/tmp/ec"}}),
     "--ec-transfer-config"),
    (dict(disable_hybrid_kv_cache_manager=True), "--disable-hybrid-kv-cache-manager"),
    (dict(async_scheduling=True), "--async-scheduling"),
    (dict(enable_dbo=True), "--enable-dbo"),
    (dict(ubatch_size=2), "--ubatch-size"),
    (dict(compilation_config={"cudagraph_mode": "FULL"}), "cudagraph_mode=FULL"),
    (dict(compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"}),
     "cudagraph_mode=FULL_AND_PIECEWISE"),
    (dict(compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"}),
     "cudagraph_mode=FULL_DECODE_ONLY"),
    (dict(compilation_config={"pass_config": {"fuse_attn_quant": True}}), "fuse_attn_quant"),
    (dict(compilation_config={"use_inductor_graph_partition": True}),
     "use_inductor_graph_partition"),
    (dict(compilation_config={"splitting_ops": []}), "splitting_ops"),
    ({}, "VLLM_BATCH_INVARIANT=1"),
]


@pytest.mark.parametrize("kw,flag", FALLBACKS, ids=[f for _, f in FALLBACKS])
def test_unsupported_setting_falls_back_to_input_only(gpu_like, caplog, kw, flag):
    from hieravid_vllm import vllm_patches
    from hieravid_vllm.options import ServingOptions

    if flag.startswith("VLLM_BATCH_INVARIANT"):
        gpu_like.setenv("VLLM_BATCH_INVARIANT", "1")
    args = _args(None, **kw)  # real EngineArgs: CLI-equivalent values
    opts = ServingOptions.from_dict({"budget": 0.3})
    with caplog.at_level(logging.WARNING, logger="vllm.hieravid_vllm"):
        out = vllm_patches.configure_stages(args, opts)
    assert out.config.mode == "input_only" and out.config.budget == 0.3
    assert flag in caplog.text, caplog.text
    assert args.scheduler_cls != vllm_patches.SCHEDULER_CLS  # no HieraVid scheduler


def test_fallback_reaches_the_resolved_config(gpu_like, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.hieravid_vllm"):
        cfg = _args({"budget": 0.3}, async_scheduling=True).create_engine_config()
    assert _mode(cfg) == "input_only"
    assert "--async-scheduling" in caplog.text
    assert cfg.use_v2_model_runner is False


def test_defaults_keep_full_mode(gpu_like):
    from hieravid_vllm import vllm_patches

    cfg = _args({"budget": 0.3}).create_engine_config()
    assert _mode(cfg) == "full"
    assert cfg.scheduler_config.scheduler_cls == vllm_patches.SCHEDULER_CLS
    assert not cfg.scheduler_config.async_scheduling


# ------------------------------------------------------------------------------------------
# the worker guard on a real CPU runner (in a child process: one in-process engine)
# ------------------------------------------------------------------------------------------
def _stage_state_lifecycle(llm, runner, model_obj, video_paths) -> list:
    """Serve the videos one after another; after each, what the model's stage state holds
    next to what vLLM holds (its encoder cache and request states)."""
    from vllm import SamplingParams

    st = model_obj.hieravid_state
    seen = []
    for path in video_paths:
        msgs = [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{path}"}},
            {"type": "text", "text": "What happens?"}]}]
        out = llm.chat(msgs, SamplingParams(max_tokens=2, temperature=0.0))
        seen.append({"layouts": sorted(st.layouts), "encoder_cache": sorted(runner.encoder_cache),
                     "videos": sorted(st.videos), "requests": sorted(runner.requests),
                     "pending": len(st._pending), "tokens": len(out[0].outputs[0].token_ids),
                     "prompt": len(out[0].prompt_token_ids)})
    return seen


def _guard_on_real_runner(model: str, video_paths=()) -> dict:
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker here
    from vllm import LLM
    from vllm.config import CUDAGraphMode

    from hieravid_vllm.testing.server import kv_cache_bytes
    from hieravid_vllm.vllm_patches import _attention_backends, check_worker_setup

    llm = LLM(model, dtype="float32", max_model_len=1024, enforce_eager=True,
              kv_cache_memory_bytes=kv_cache_bytes(model, 4096),
              allowed_local_media_path="/", media_io_kwargs={"video": {"fps": 8.0}},
              enable_prefix_caching=False,
              additional_config={"hieravid": {"budget": 0.3}})
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    model_obj = runner.get_model()
    out = {"runner": f"{type(runner).__module__}.{type(runner).__name__}",
           "backends": sorted(_attention_backends(model_obj))}
    check_worker_setup(runner, model_obj)  # as started: passes
    out["lifecycle"] = _stage_state_lifecycle(llm, runner, model_obj, video_paths)
    # vLLM's own memory profile (the CPU worker skips it with an explicit KV size: run it)
    runner.profile_run()
    out["pending_after_profile"] = len(model_obj.hieravid_state._pending)
    out["profiled"] = list(getattr(runner, "hieravid_profiled_selection", ()))
    out["max_video_tokens"] = int(runner.mm_budget.mm_max_toks_per_item["video"])
    out["max_num_tokens"] = int(runner.max_num_tokens)
    runner.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    try:
        check_worker_setup(runner, model_obj)
        out["full_graphs"] = "accepted"
    except RuntimeError as e:
        out["full_graphs"] = str(e)
    runner.compilation_config.cudagraph_mode = CUDAGraphMode.NONE

    class UnhookedRunner(type(runner)):  # a runner class the plugin never patched
        pass

    runner.__class__ = UnhookedRunner
    try:
        check_worker_setup(runner, model_obj)
        out["unhooked"] = "accepted"
    except RuntimeError as e:
        out["unhooked"] = str(e)
    return out


def _run_isolated(fn, *args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _common import run_isolated

    return run_isolated(fn, *args, timeout=600)


N_LIFECYCLE_VIDEOS = 12


@pytest.mark.vllm
def test_worker_guard_on_a_real_cpu_runner(make_videos):
    # ~460 kept tokens each: vLLM's 4096-token encoder cache must evict to take them all
    clips = make_videos({f"v{i}": dict(num_frames=48, width=224, height=224, seed=40 + i)
                         for i in range(N_LIFECYCLE_VIDEOS)})
    out = _run_isolated(_guard_on_real_runner, str(build_tiny_model("qwen2_5_vl")),
                        [str(clips[f"v{i}"]) for i in range(N_LIFECYCLE_VIDEOS)])
    assert "error" not in out, out
    # the stage state follows vLLM's lifecycles: a layout exactly per cached video encoder
    # output (freed with the entry), video spans only for requests the runner still holds
    # (vLLM drops a finished request at its next step), nothing pending
    life = out["lifecycle"]
    assert len(life) == N_LIFECYCLE_VIDEOS and all(s["tokens"] == 2 for s in life), life
    for s in life:
        assert s["layouts"] and s["layouts"] == s["encoder_cache"], s
        assert s["videos"] == s["requests"] and len(s["requests"]) <= 1, s
        assert s["pending"] == 0, s
    held = [r for s in life for r in s["requests"]]
    assert len(held) == len(set(held)), life  # earlier requests' spans were freed
    # entries were freed on the way (with their layouts: the equality above held throughout)
    assert len({h for s in life for h in s["layouts"]}) > max(len(s["layouts"]) for s in life)
    assert out["runner"] == "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    assert out["backends"] == ["CPU_ATTN"]
    assert "CUDA graph mode FULL" in out["full_graphs"] and "PIECEWISE" in out["full_graphs"]
    assert "has no HieraVid hooks" in out["unhooked"] and V2_ENV in out["unhooked"]
    # the profile run selected among as many tokens as the largest video brings into the
    # LLM (vLLM's per-item maximum, capped by one step), down to a real stage target
    assert out["pending_after_profile"] == 0  # the dummy videos' layouts were dropped
    n, target = out["profiled"]
    assert n == min(out["max_video_tokens"], out["max_num_tokens"]) > 100
    assert 0 < target < n


def _start_with_unhooked_runner(model: str) -> dict:
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from hieravid_vllm.testing.server import kv_cache_bytes

    try:
        LLM(model, dtype="float32", max_model_len=1024, enforce_eager=True,
            kv_cache_memory_bytes=kv_cache_bytes(model, 4096),
            worker_cls="hieravid_vllm.testing.workers.UnhookedRunnerCPUWorker",
            additional_config={"hieravid": {"budget": 0.3}})
    except Exception as e:  # the start must fail, with the guard's message in the chain
        msgs, err = [], e
        while err is not None:
            msgs.append(f"{type(err).__name__}: {err}")
            err = err.__cause__ or err.__context__
        return {"started": False, "errors": msgs}
    return {"started": True}


@pytest.mark.vllm
def test_engine_start_with_an_unhooked_runner_is_refused():
    """A real engine start whose worker builds a runner class the plugin has no hooks for
    (vLLM's CPU runner under another name, via ``worker_cls``) stops at the worker guard."""
    out = _run_isolated(_start_with_unhooked_runner, str(build_tiny_model("qwen2_5_vl")))
    assert out.get("started") is False, out
    text = "\n".join(out["errors"])
    assert "hieravid_vllm.testing.workers.UnhookedCPUModelRunner has no HieraVid hooks" in text
    assert V2_ENV in text


def test_v2_runner_class_is_refused_when_imported():
    """Model Runner V2's module gets the refusing load_model when it is imported."""
    from hieravid_vllm import vllm_patches

    vllm_patches.apply_all()
    try:
        from vllm.v1.worker.gpu import model_runner as v2
    except Exception as e:  # pragma: no cover - depends on the vLLM build
        pytest.fail(f"Model Runner V2 does not import on this build: {e}")
    assert getattr(v2.GPUModelRunner.load_model, vllm_patches._MARK, False)
