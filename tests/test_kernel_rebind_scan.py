"""vLLM's CPU worker start-up scan with numba loaded (patch ``kernel_rebind_scan``).

vLLM's ``triton_utils.dispatcher._rebind_kernels`` (every CPU worker's start-up) reads
``vars(value).get(...)`` for every attribute of every loaded module, and crashes on
llvmlite's ctypes wrapper, which numba loads (HieraVid's CPU greedy uses numba).

* the real scan, unpatched, fails once numba is imported; patched, it completes, and
  llvmlite's modules are back in ``sys.modules`` afterwards (0.32 and 0.33);
* a second in-process offline ``LLM`` with a HieraVid model starts in a process whose first
  engine's worker imported numba (the user scenario that crashed), and both answer.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hieravid_vllm import patches
from hieravid_vllm.testing.models import build_tiny_model


@pytest.mark.vllm033
def test_scan_survives_llvmlite():
    import numba  # noqa: F401  (loads llvmlite, as the CPU greedy does)
    import vllm.triton_utils.dispatcher as dispatcher

    patches.apply_all()
    scan = dispatcher._rebind_kernels
    assert patches.is_wrapped(scan)
    original, wrapper = object(), object()   # matches nothing: the scan only reads
    with pytest.raises(AttributeError, match="_lib_fn_wrapper"):
        scan.__wrapped__([(original, wrapper)])
    before = {n for n in sys.modules if n.startswith("llvmlite")}
    assert before
    scan([(original, wrapper)])
    assert {n for n in sys.modules if n.startswith("llvmlite")} == before


def _two_engines(model: str, video: str) -> dict:
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker here
    from vllm import LLM, SamplingParams

    from hieravid_vllm.testing.server import kv_cache_bytes

    kw = dict(dtype="float32", max_model_len=4096, enforce_eager=True,
              kv_cache_memory_bytes=kv_cache_bytes(model, 16384),
              additional_config={"hieravid": {"mode": "full", "budget": 0.3}},
              limit_mm_per_prompt={"video": 1})
    msgs = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": Path(video).as_uri()}},
        {"type": "text", "text": "What happens?"}]}]
    out = {}
    for i in range(2):
        llm = LLM(model, allowed_local_media_path=str(Path(video).parent), **kw)
        res = llm.chat(msgs, SamplingParams(max_tokens=2, temperature=0.0))
        out[f"tokens_{i}"] = len(res[0].outputs[0].token_ids)
        out[f"numba_{i}"] = "numba" in sys.modules
        del llm
    return out


@pytest.mark.vllm
def test_second_in_process_engine_after_numba(make_videos):
    clip = make_videos({"a": dict(num_frames=16, width=224, height=224, seed=3)})["a"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _common import run_isolated

    out = run_isolated(_two_engines, str(build_tiny_model("qwen2_5_vl")), str(clip),
                       timeout=600)
    assert "error" not in out, out
    assert out["numba_0"] and out["numba_1"]     # the first engine's worker loaded it
    assert out["tokens_0"] == out["tokens_1"] == 2
