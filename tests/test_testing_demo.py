"""The demo (``python -m hieravid_vllm.demo``): option handling, and one real run."""
from __future__ import annotations

import json

import pytest

from hieravid_vllm import demo


def test_server_configs_start_with_unpruned():
    names = [c.name for c in demo.SERVER_CONFIGS]
    assert names[0] == "unpruned" and len(set(names)) == len(names)


def test_video_url_forms(tmp_path):
    allowed = []
    f = tmp_path / "a.mp4"
    f.write_bytes(b"x")
    assert demo._video_url(str(f), allowed) == f.resolve().as_uri()
    assert allowed == [tmp_path.resolve()]
    for url in ("https://example.com/v.mp4", "data:video/mp4;base64,AAAA"):
        assert demo._video_url(url, []) == url
    with pytest.raises(SystemExit):
        demo._video_url(str(tmp_path / "missing.mp4"), [])


def test_unknown_config_is_rejected():
    with pytest.raises(SystemExit):
        demo.main(["--only", "no-such-config", "--frames", "4", "--size", "64"])


@pytest.mark.vllm
def test_demo_runs_end_to_end(capsys, tmp_path):
    rc = demo.main(["--frames", "8", "--size", "112", "--max-tokens", "4", "--json",
                    "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    results = json.loads(out[out.index("\n[") + 1:])
    assert [r["config"] for r in results] == [c.name for c in demo.SERVER_CONFIGS]
    unpruned = results[0]
    assert unpruned["ok"] and unpruned["completion_tokens"] == 4 and unpruned["answer"].strip()
    # the printed transformers reference equals what vLLM reported
    ref_line = next(line for line in out.splitlines() if line.startswith("reference"))
    assert f"makes {unpruned['prompt_tokens']} prompt tokens" in ref_line
    assert "200 OK" in out and "=== Summary" in out
    for other in results[1:]:  # pruned configurations: served, and never more tokens
        assert other["ok"], other
        assert other["prompt_tokens"] <= unpruned["prompt_tokens"], other
