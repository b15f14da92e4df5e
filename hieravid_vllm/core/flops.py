"""Prefill FLOPs model of the paper (Sec. 4.1, Eq. 12).

    FLOPs = sum_i (4 n_i d^2 + 2 n_i^2 d + 2 n_i d m)

over the LLM layers, n_i = tokens at the input of layer i (visual tokens of the stage plus
text tokens), d = hidden size, m = FFN intermediate size. Like the paper we keep its
simplified per-layer formula (no GQA, gate projection, LM head or vision tower).

Text tokens: the paper does not state them. Its vanilla numbers (80.2 T for 64 x 169 visual
tokens, 40.8 T for 32 x 196) and its baselines' uniform ratios at 30 / 20 / 10% (23.8 / 15.5 /
7.4% and 25.9 / 16.9 / 8.3%) are all reproduced with almost no text tokens: solving Eq. 12 for
80.2 T gives n = 10,820 = 10,816 + 4 and for 40.8 T n = 6,276 = 6,272 + 4. We therefore use
``DEFAULT_TEXT_TOKENS = 4`` to reproduce the tables; pass the real prompt length for real
accounting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .config import HieraVidConfig
from .schedule import StageSchedule, build_schedule

__all__ = ["ModelSpec", "QWEN2_7B", "DEFAULT_TEXT_TOKENS", "layer_flops", "prefill_flops",
           "hieravid_flops", "vanilla_flops", "flops_ratio"]

DEFAULT_TEXT_TOKENS = 4


@dataclass(frozen=True)
class ModelSpec:
    """What Eq. 12 needs from a model config: layers L, hidden size d, FFN size m."""

    num_layers: int
    hidden_size: int
    intermediate_size: int


#: Qwen2-7B, the LLM of LLaVA-Video-7B, LLaVA-OneVision-7B and Qwen2-VL-7B.
QWEN2_7B = ModelSpec(num_layers=28, hidden_size=3584, intermediate_size=18944)


def layer_flops(n: int, d: int, m: int) -> float:
    """Eq. 12, one layer with n input tokens: 4 n d^2 + 2 n^2 d + 2 n d m."""
    n = float(n)
    return 4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m


def prefill_flops(tokens_per_layer: Iterable[int], d: int, m: int) -> float:
    """Eq. 12 summed over layers, given the total token count at each layer's input."""
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


def vanilla_flops(spec: ModelSpec, num_visual: int,
                  num_text: int = DEFAULT_TEXT_TOKENS) -> float:
    """Unpruned prefill: every layer sees all visual + text tokens."""
    return prefill_flops([num_visual + num_text] * spec.num_layers, spec.hidden_size,
                         spec.intermediate_size)


def hieravid_flops(spec: ModelSpec, num_visual: int, config: HieraVidConfig,
                   num_text: int = DEFAULT_TEXT_TOKENS, max_merge: Optional[int] = None,
                   schedule: Optional[StageSchedule] = None) -> float:
    """Eq. 12 over the schedule's real per-layer visual counts plus the text tokens."""
    sched = schedule or build_schedule(config, num_visual, spec.num_layers, max_merge)
    per_layer = [v + num_text for v in sched.tokens_per_layer()]
    return prefill_flops(per_layer, spec.hidden_size, spec.intermediate_size)


def flops_ratio(spec: ModelSpec, num_visual: int, config: HieraVidConfig,
                num_text: int = DEFAULT_TEXT_TOKENS) -> float:
    """HieraVid prefill FLOPs / vanilla prefill FLOPs."""
    return hieravid_flops(spec, num_visual, config, num_text) / vanilla_flops(
        spec, num_visual, num_text)
