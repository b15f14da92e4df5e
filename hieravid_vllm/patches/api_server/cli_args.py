"""``EngineArgs.add_cli_args`` + ``EngineArgs.from_cli_args``: the ``--hieravid-*`` flags.

What: ``add_cli_args`` adds the flags of :func:`hieravid_vllm.options.add_cli_args`;
``from_cli_args`` carries them into ``additional_config["hieravid"]`` (merged with what the
user put there) and stops start-up when ``allow_request_budget`` is set without the server's
``--trust-request-mm-kwargs``.
Why: vLLM has no supported way for a general plugin to add CLI flags.
When it can go: when vLLM lets plugins register engine arguments (``additional_config``
alone keeps working without it).
Applied in every process, also with an unsupported vLLM (the flags are how HieraVid is
switched on; without them nothing else changes).
"""
from __future__ import annotations

from hieravid_vllm import options as hv_options
from hieravid_vllm.patches._wrap import wrap

MODULE = "vllm.engine.arg_utils"
TARGETS = ("EngineArgs.add_cli_args", "EngineArgs.from_cli_args")


def apply(module) -> None:
    cls = module.EngineArgs

    def make_add(orig):
        def add_cli_args(parser, *args, **kwargs):
            parser = orig(parser, *args, **kwargs)
            if not any(a.dest == "hieravid_budget" for a in parser._actions):
                hv_options.add_cli_args(parser)
            return parser
        return add_cli_args

    def make_from(orig):
        def from_cli_args(cls, args):
            engine_args = orig(cls, args)
            opts = hv_options.options_from_cli(args)
            if opts is not None:
                extra = dict(engine_args.additional_config or {})
                merged = dict(extra.get(hv_options.CONFIG_KEY) or {})
                merged.update(opts)
                extra[hv_options.CONFIG_KEY] = merged
                engine_args.additional_config = extra
            final = hv_options.options_from_additional_config(engine_args.additional_config)
            if final is not None:
                hv_options.check_request_budget_trust(
                    final.to_dict(), getattr(args, "trust_request_mm_kwargs", None))
            return engine_args
        return from_cli_args

    wrap(cls, "add_cli_args", make_add)
    wrap(cls, "from_cli_args", make_from)
