"""VLLMServer: its command line, its KV sizing in bytes, and its failure path (a server
that cannot start raises naming the root cause and leaves no process behind)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import (VLLMServer, VLLMServerError, free_port,
                                          kv_bytes_per_token, kv_cache_bytes, root_cause)

REPO = Path(__file__).resolve().parents[1]


def test_command_line_defaults(tmp_path):
    srv = VLLMServer(tmp_path, extra_args=["--foo"], video_fps=4, port=12345,
                     allowed_local_media_path=tmp_path, log_path=tmp_path / "x.log")
    cmd = srv.command
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--media-io-kwargs") + 1] == '{"video": {"fps": 4}}'
    assert cmd[cmd.index("--port") + 1] == "12345" and cmd[-1] == "--foo"
    assert cmd[cmd.index("--allowed-local-media-path") + 1] == str(tmp_path)
    assert srv.base_url == "http://127.0.0.1:12345/v1"
    assert "--allowed-local-media-path" not in VLLMServer(tmp_path).command
    assert srv.env["HF_HUB_OFFLINE"] == "1"
    assert 1024 < free_port() < 65536


def test_kv_bytes_per_token_equals_the_hf_cache():
    """Independent reference: the bytes of the KV cache transformers fills for a prompt."""
    import torch
    from transformers import AutoModelForImageTextToText

    for arch in ("qwen2_5_vl", "llava_onevision"):
        model_dir = build_tiny_model(arch)
        hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        n = 37
        with torch.no_grad():
            out = hf(input_ids=torch.arange(5, 5 + n)[None], use_cache=True)
        cache = out.past_key_values
        total = sum(t.numel() * t.element_size() for layer in cache.layers
                    for t in (layer.keys, layer.values))
        assert kv_bytes_per_token(model_dir) * n == total, arch
        # whole blocks: 37 tokens take 2 blocks of 32
        assert kv_cache_bytes(model_dir, n) == 64 * total // n


def test_cpu_servers_size_the_kv_cache_in_bytes(tmp_path):
    model = build_tiny_model("qwen2_5_vl")
    args = VLLMServer(model, max_model_len=4096, max_num_batched_tokens=8192).args
    assert "--gpu-memory-utilization" not in args
    assert int(args[args.index("--kv-cache-memory-bytes") + 1]) == \
        kv_cache_bytes(model, 4 * 8192)
    args = VLLMServer(model, kv_tokens=512).args
    assert int(args[args.index("--kv-cache-memory-bytes") + 1]) == kv_cache_bytes(model, 512)
    # the caller's own flag wins and appears once
    args = VLLMServer(model, extra_args=["--kv-cache-memory-bytes", "12345"]).args
    assert args.count("--kv-cache-memory-bytes") == 1
    assert args[args.index("--kv-cache-memory-bytes") + 1] == "12345"
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        VLLMServer(model, gpu_memory_utilization=0.1)


def _memory_share_uses(path: Path) -> list[str]:
    """Places in a Python file that size a vLLM KV cache as a share of memory: a numeric
    ``gpu_memory_utilization=`` keyword, or a ``--gpu-memory-utilization`` string other than
    an argparse option name or a membership / lookup test (``"--..." in args``); code inside
    ``with pytest.raises(...)`` (a test that the share is refused) does not count."""
    tree = ast.parse(path.read_text(), str(path))
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def refused(node) -> bool:  # inside ``with pytest.raises(...)``: a test of the refusal
        while node in parent:
            node = parent[node]
            if isinstance(node, ast.With) and any(
                    isinstance(i.context_expr, ast.Call) and
                    isinstance(i.context_expr.func, ast.Attribute) and
                    i.context_expr.func.attr == "raises" for i in node.items):
                return True
        return False

    found = []
    for node in ast.walk(tree):
        if refused(node):
            continue
        if isinstance(node, ast.keyword) and node.arg == "gpu_memory_utilization" and \
                isinstance(node.value, ast.Constant) and \
                isinstance(node.value.value, (int, float)):
            found.append(f"{path.name}:{node.value.lineno} gpu_memory_utilization="
                         f"{node.value.value}")
        if isinstance(node, ast.Constant) and node.value == "--gpu-memory-utilization":
            up = parent.get(node)
            if isinstance(up, ast.Compare) or (
                    isinstance(up, ast.Call) and isinstance(up.func, ast.Attribute)
                    and up.func.attr in ("add_argument", "index", "count")):
                continue
            found.append(f"{path.name}:{node.lineno} --gpu-memory-utilization")
    return found


def test_no_test_demo_or_benchmark_sizes_kv_as_a_share_of_memory(tmp_path):
    """Every server or engine the suite, the demo and the benchmarks start sizes its KV cache
    in bytes (the conftest guard checks each started server's flags as well)."""
    files = [p for d in ("tests", "benchmarks", "hieravid_vllm")
             for p in sorted((REPO / d).rglob("*.py"))]
    # the one place that may name a share: VLLMServer's CUDA branch (tests of a refusal, in
    # ``with pytest.raises``, are not counted)
    allowed = {REPO / "hieravid_vllm" / "testing" / "server.py"}
    uses = [u for p in files if p not in allowed for u in _memory_share_uses(p)]
    assert not uses, uses
    # the checker does find them, and lets a refusal test through
    assert _memory_share_uses(REPO / "hieravid_vllm" / "testing" / "server.py")
    probe = tmp_path / "probe.py"
    probe.write_text("import pytest\n"
                     "def f(S):\n"
                     "    S('m', gpu_memory_utilization=0.2)\n"
                     "    with pytest.raises(ValueError):\n"
                     "        S('m', gpu_memory_utilization=0.3)\n"
                     "    args = ['--gpu-memory-utilization', '0.5']\n")
    assert _memory_share_uses(probe) == ["probe.py:3 gpu_memory_utilization=0.2",
                                         "probe.py:6 --gpu-memory-utilization"]


def test_root_cause_names_the_buried_error(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "INFO 11-25 12:00:00 [api_server.py:1] vLLM API server version 0.32.0\n"
        "WARNING 11-25 12:00:01 [cpu.py:1] ValueError: something harmless\n"
        "(EngineCore pid=12) ERROR [core.py:1] ValueError: Available memory on node 0 "
        "(9.44/11.46 GiB) on kv cache allocation is less than requested memory for kv "
        "(-0.13/0.57 GiB). Reduce CPU memory used by other processes.\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed "
        "core proc(s): {}\n")
    cause = root_cause("RuntimeError: Engine core initialization failed.", log)
    assert cause.startswith("ValueError: Available memory on node 0"), cause
    assert root_cause("plain message\nsecond line") == "plain message"


@pytest.mark.vllm
def test_failed_start_raises_naming_the_root_cause(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    srv = VLLMServer(bad, log_path=tmp_path / "server.log", startup_timeout=240)
    with pytest.raises(VLLMServerError) as err:
        srv.start()
    first = str(err.value).splitlines()[0]
    assert "exited with code" in first and "  | " in str(err.value)
    # the first line names the specific error of the log, not vLLM's generic wrapper
    assert first.split("during start-up: ", 1)[1] == root_cause("", srv.log_path)
    assert "Error" in first and "See root cause" not in first, first
    assert srv.proc is None and srv.pid
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(srv.pid, 0)
