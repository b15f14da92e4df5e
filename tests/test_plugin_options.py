"""Plugin options: flag parsing, validation messages, additional_config, position channels.

The start-up tests run vLLM's real OpenAI server entry point with bad flags: it must exit
with a message naming the flag, before loading anything.
"""
import argparse
import subprocess
import sys

import pytest
import torch

from hieravid_vllm import options
from hieravid_vllm.core import HieraVidConfig


def _parser():
    p = argparse.ArgumentParser()
    options.add_cli_args(p)
    return p


@pytest.mark.parametrize("value", ["0", "1.5", "abc", "-0.1", "nan"])
def test_budget_flag_rejects_bad_values(value, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--hieravid-budget", value])
    err = capsys.readouterr().err
    assert "--hieravid-budget" in err and "(0, 1]" in err


def test_cli_options_round_trip():
    args = _parser().parse_args(["--hieravid-budget", "0.2", "--hieravid-mode", "input_only",
                                 "--hieravid-config", '{"beta": 0.5, "budget": 0.9}'])
    d = options.options_from_cli(args)
    # explicit flags override the JSON's keys
    assert d == {"beta": 0.5, "budget": 0.2, "mode": "input_only"}
    opts = options.options_from_additional_config({"hieravid": d})
    assert opts.config == HieraVidConfig(beta=0.5, budget=0.2, mode="input_only")
    assert options.ServingOptions.from_dict(opts.to_dict()) == opts


def test_cli_off_without_budget():
    assert options.options_from_cli(_parser().parse_args([])) is None
    with pytest.raises(ValueError, match="--hieravid-budget"):
        options.options_from_cli(_parser().parse_args(["--hieravid-mode", "full"]))


def test_config_json_errors_name_the_field(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--hieravid-config", '{"beta": 2}'])
    assert "beta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--hieravid-config", "{not json"])
    assert "--hieravid-config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="budget"):
        options.options_from_additional_config({"hieravid": {"budget": 0}})
    with pytest.raises(ValueError, match="lam"):
        options.options_from_additional_config({"hieravid": '{"lam": -1}'})
    assert options.options_from_additional_config({}) is None
    assert options.options_from_additional_config({"hieravid": None}) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_survive_embedding_dtype(dtype):
    from hieravid_vllm.models.common import (NUM_POS_CHANNELS, append_position_channels,
                                             decode_position_channels)

    g = torch.Generator().manual_seed(0)
    n = 5000
    thw = torch.stack([torch.randint(0, 4000, (n,), generator=g),
                       torch.randint(0, 300, (n,), generator=g),
                       torch.randint(0, 300, (n,), generator=g)], 1)
    emb = torch.randn(n, 16, generator=g).to(dtype)
    out = append_position_channels(emb, thw, t_scale=2.0)
    assert out.dtype == dtype and out.shape == (n, 16 + NUM_POS_CHANNELS)
    assert torch.equal(out[:, :16], emb)
    dec = decode_position_channels(out[:, 16:])
    assert torch.equal(dec[:, 0], thw[:, 0] * 2)
    assert torch.equal(dec[:, 1:3], thw[:, 1:3])
    assert torch.equal(dec[:, 3], torch.arange(n))


@pytest.mark.vllm
@pytest.mark.parametrize("value", ["0", "1.5", "abc"])
def test_server_refuses_bad_budget_at_startup(value, tmp_path):
    """The real server entry point stops at start-up with a message naming the flag."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
         "--hieravid-budget", value],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "argument --hieravid-budget" in proc.stderr, proc.stderr[-2000:]


# -------------------------------------------------------------------------------------------
# per-request budget
@pytest.mark.parametrize("value", [0.2, 1, 1.0, 0.001])
def test_request_budget_accepts_numbers_in_range(value):
    assert options.parse_request_budget(value, allowed=True) == float(value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.2", "abc",
                                   True, None, [0.2], {"b": 0.2}])
def test_request_budget_rejects_bad_values(value):
    with pytest.raises(ValueError, match="hieravid_budget"):
        options.parse_request_budget(value, allowed=True)


def test_request_budget_refused_unless_allowed():
    with pytest.raises(ValueError, match="hieravid_budget.*--hieravid-allow-request-budget"):
        options.parse_request_budget(0.2, allowed=False)


def test_allow_request_budget_flag_and_json():
    p = _parser()
    d = options.options_from_cli(p.parse_args(["--hieravid-budget", "0.3",
                                               "--hieravid-allow-request-budget"]))
    assert d == {"budget": 0.3, "allow_request_budget": True}
    opts = options.options_from_additional_config({"hieravid": d})
    assert opts.allow_request_budget and opts.config == HieraVidConfig(budget=0.3)
    assert options.ServingOptions.from_dict(opts.to_dict()) == opts
    # the JSON form, and the default (off) does not show up in the dict
    d = options.options_from_cli(p.parse_args(
        ["--hieravid-config", '{"budget": 0.4, "allow_request_budget": true}']))
    assert options.options_from_additional_config({"hieravid": d}).allow_request_budget
    assert "allow_request_budget" not in options.ServingOptions.from_dict(
        {"budget": 0.4}).to_dict()
    with pytest.raises(SystemExit):
        p.parse_args(["--hieravid-config", '{"allow_request_budget": "yes"}'])
    with pytest.raises(ValueError, match="--hieravid-allow-request-budget needs"):
        options.options_from_cli(p.parse_args(["--hieravid-allow-request-budget"]))


def test_allow_request_budget_needs_trust_request_mm_kwargs():
    on = {"budget": 0.3, "allow_request_budget": True}
    with pytest.raises(ValueError, match="--trust-request-mm-kwargs"):
        options.check_request_budget_trust(on, trust_request_mm_kwargs=False)
    options.check_request_budget_trust(on, trust_request_mm_kwargs=True)
    options.check_request_budget_trust(on, trust_request_mm_kwargs=None)  # offline LLM
    options.check_request_budget_trust({"budget": 0.3}, trust_request_mm_kwargs=False)


def test_with_budget_validates_and_keeps_other_fields():
    opts = options.ServingOptions.from_dict({"budget": 0.3, "beta": 0.5,
                                             "allow_request_budget": True})
    other = opts.with_budget(0.2)
    assert other.config == HieraVidConfig(budget=0.2, beta=0.5) and other.allow_request_budget
    assert opts.config.budget == 0.3
    with pytest.raises(ValueError, match="budget"):
        opts.with_budget(1.5)


def test_budget_field_round_trips_exactly():
    from hieravid_vllm.models.common import decode_budgets, encode_budget

    values = [0.2, 0.3, 1.0, 0.1 + 0.2, 1e-9]
    bits = torch.tensor([encode_budget(v) for v in values], dtype=torch.int64)
    assert bits.dtype == torch.int64
    assert decode_budgets(bits) == values  # exact, bit for bit
    assert decode_budgets([b for b in bits]) == values  # the unstacked (list) form


@pytest.mark.vllm
def test_server_refuses_request_budget_without_trust(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
         "--hieravid-budget", "0.3", "--hieravid-allow-request-budget"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--trust-request-mm-kwargs" in proc.stderr, proc.stderr[-2000:]
