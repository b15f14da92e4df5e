"""Serving options of the plugin: CLI flags, ``additional_config`` and per-request overrides.

No vLLM import here: these functions validate user input and are unit-tested on their own.

How options travel through vLLM:

* ``vllm serve M --hieravid-budget 0.3 [--hieravid-mode input_only] [--hieravid-config JSON]``
  (flags added by :mod:`hieravid_vllm.patches.api_server.cli_args`), or offline
  ``LLM(M, additional_config={"hieravid": {"budget": 0.3}})``, or the same dict through
  ``--additional-config '{"hieravid": {...}}'``;
* all of them end up in ``EngineArgs.additional_config["hieravid"]`` as one dict:
  the :class:`~hieravid_vllm.core.config.HieraVidConfig` fields;
* at engine creation the validated dict is written into the checkpoint's HF config
  (``hf_config.hieravid``) through an ``hf_overrides`` callable, which also swaps the
  architecture for its HieraVid variant. Every vLLM process (API server: prompt processing;
  workers: the model) then reads the same options from the config it already has.

Per-request budget (off by default): with ``allow_request_budget`` (flag
``--hieravid-allow-request-budget`` or ``"allow_request_budget": true`` in the JSON) a
request may send ``mm_processor_kwargs: {"hieravid_budget": 0.2}``. vLLM 0.32 rejects every
per-request ``mm_processor_kwargs`` unless the server also runs with
``--trust-request-mm-kwargs``, so ``vllm serve`` refuses to start with the first but not the
second (:func:`check_request_budget_trust`). The prompt processor validates the value
(:func:`parse_request_budget`) and hands it to the worker with the video's own inputs.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from hieravid_vllm.core.config import HieraVidConfig

#: Key under ``additional_config`` and attribute name on the HF config.
CONFIG_KEY = "hieravid"
#: Key of the per-request budget in a request's ``mm_processor_kwargs``.
REQUEST_BUDGET_KEY = "hieravid_budget"
#: Keys of the options dict that are serving options, not ``HieraVidConfig`` fields.
SERVING_KEYS = ("allow_request_budget",)


class ServingOptions(BaseModel):
    """HieraVid algorithm config plus the options that only matter for serving."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: HieraVidConfig = HieraVidConfig()
    #: requests may override the budget through ``mm_processor_kwargs.hieravid_budget``
    allow_request_budget: StrictBool = False

    def to_dict(self) -> dict:
        d = self.config.model_dump(mode="json", exclude_defaults=True)
        d["budget"] = self.config.budget
        if self.allow_request_budget:
            d["allow_request_budget"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ServingOptions":
        d = dict(d)
        serving = {k: d.pop(k) for k in SERVING_KEYS if k in d}
        return cls(config=HieraVidConfig.model_validate(d), **serving)

    def with_budget(self, budget: float) -> "ServingOptions":
        """The same options at another budget (validated like the config's own field)."""
        if budget == self.config.budget:
            return self
        cfg = HieraVidConfig.model_validate({**self.config.model_dump(), "budget": budget})
        return self.model_copy(update={"config": cfg})


def _first_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "config"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def parse_budget(text: str) -> float:
    """argparse ``type=`` for ``--hieravid-budget``: a float in (0, 1]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a relative token budget in (0, 1], e.g. 0.3")
    if not (0.0 < value <= 1.0) or value != value:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: the relative token budget must be in (0, 1], e.g. 0.3")
    return value


def parse_request_budget(value: Any, allowed: bool) -> float:
    """Validate a request's ``mm_processor_kwargs.hieravid_budget``.

    Raises ``ValueError`` whose message names ``hieravid_budget`` (the server answers 400).
    """
    if not allowed:
        raise ValueError(
            f"{REQUEST_BUDGET_KEY}: per-request budgets are not enabled on this server (the "
            f"operator enables them with --hieravid-allow-request-budget together with "
            f"--trust-request-mm-kwargs); leave out mm_processor_kwargs.{REQUEST_BUDGET_KEY}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{REQUEST_BUDGET_KEY} must be a number in (0, 1], e.g. 0.3; got "
                         f"{value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects nan
        raise ValueError(f"{REQUEST_BUDGET_KEY} must be in (0, 1] (the share of video tokens "
                         f"kept); got {value!r}")
    return value


def check_request_budget_trust(options: Optional[Mapping[str, Any]],
                               trust_request_mm_kwargs: Optional[bool]) -> None:
    """``allow_request_budget`` is useless while vLLM rejects per-request
    ``mm_processor_kwargs``: refuse to start instead of failing every request.
    ``trust_request_mm_kwargs`` None means unknown (offline ``LLM``: always allowed)."""
    if options and options.get("allow_request_budget") is True and \
            trust_request_mm_kwargs is False:
        raise ValueError(
            "--hieravid-allow-request-budget (allow_request_budget) needs "
            "--trust-request-mm-kwargs: vLLM rejects per-request mm_processor_kwargs "
            "without it")


def parse_config_json(text: str) -> dict:
    """argparse ``type=`` for ``--hieravid-config``: a JSON object of HieraVid options."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos}): {text!r}")
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"budget\": 0.3}'")
    try:
        ServingOptions.from_dict(obj)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(_first_error(e))
    return obj


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--hieravid-*`` flags to a (vLLM) argument parser."""
    group = parser.add_argument_group(
        title="HieraVid",
        description="Hierarchical video-token pruning (hieravid-vllm plugin). Off unless "
                    "--hieravid-budget or --hieravid-config is given.")
    group.add_argument(
        "--hieravid-budget", type=parse_budget, default=None, metavar="B",
        help="Enable HieraVid with relative visual-token budget B in (0, 1] "
             "(layer-averaged share of video tokens kept), e.g. 0.3.")
    group.add_argument(
        "--hieravid-mode", choices=["full", "input_only"], default=None,
        help="full: prune before the LLM and again at LLM stage boundaries; "
             "input_only: all pruning before the LLM (Table 4 ablation).")
    group.add_argument(
        "--hieravid-config", type=parse_config_json, default=None, metavar="JSON",
        help="All HieraVid options as JSON, e.g. '{\"budget\": 0.3, \"beta\": 0.4}' "
             "(fields of hieravid_vllm.core.HieraVidConfig). "
             "--hieravid-budget / --hieravid-mode override the same keys.")
    group.add_argument(
        "--hieravid-allow-request-budget", action="store_true", default=None,
        help="Let a request choose its own budget with mm_processor_kwargs "
             "{\"hieravid_budget\": B}, B in (0, 1]; needs --trust-request-mm-kwargs.")


def options_from_cli(args: argparse.Namespace) -> Optional[dict]:
    """The ``additional_config["hieravid"]`` dict the flags ask for, or None if HieraVid is off."""
    d = dict(getattr(args, "hieravid_config", None) or {})
    budget = getattr(args, "hieravid_budget", None)
    mode = getattr(args, "hieravid_mode", None)
    allow = getattr(args, "hieravid_allow_request_budget", None)
    if budget is None and not d:
        for flag, value in (("--hieravid-mode", mode), ("--hieravid-allow-request-budget", allow)):
            if value is not None:
                raise ValueError(f"{flag} needs --hieravid-budget or --hieravid-config")
        return None
    if budget is not None:
        d["budget"] = budget
    if mode is not None:
        d["mode"] = mode
    if allow:
        d["allow_request_budget"] = True
    return d


def options_from_additional_config(additional: Optional[Mapping[str, Any]]) -> Optional[ServingOptions]:
    """Validate ``additional_config["hieravid"]``; None when HieraVid is not enabled.

    Raises ``ValueError`` naming the option on bad input (vLLM shows it at start-up).
    """
    if not additional or CONFIG_KEY not in additional:
        return None
    raw = additional[CONFIG_KEY]
    if raw is None or raw is False:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"additional_config.hieravid is not valid JSON: {e}") from None
    if not isinstance(raw, Mapping):
        raise ValueError("additional_config.hieravid must be an object like {\"budget\": 0.3}")
    try:
        return ServingOptions.from_dict(raw)
    except ValidationError as e:
        raise ValueError(f"invalid HieraVid option (--hieravid-budget / --hieravid-config / "
                         f"additional_config.hieravid): {_first_error(e)}") from None
