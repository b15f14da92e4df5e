"""VLLMServer's failure path: a server that cannot start raises with its log tail and
leaves no process behind (no engine is started: the model directory is invalid)."""
from __future__ import annotations

import os

import pytest

from hieravid_vllm.testing.server import VLLMServer, VLLMServerError, free_port


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


@pytest.mark.vllm
def test_failed_start_raises_with_log_tail(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    srv = VLLMServer(bad, log_path=tmp_path / "server.log", startup_timeout=240)
    with pytest.raises(VLLMServerError) as err:
        srv.start()
    assert "exited with code" in str(err.value) and "  | " in str(err.value)
    assert srv.proc is None and srv.pid
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(srv.pid, 0)
