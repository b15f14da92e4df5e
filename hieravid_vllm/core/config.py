"""HieraVid configuration (pydantic v2, frozen, ``extra="forbid"``).

Every field carries its paper reference. Invalid values raise
:class:`pydantic.ValidationError`; its message names the field and the allowed range, e.g.
``budget: Input should be less than or equal to 1``.

The plugin accepts the same object as JSON: ``HieraVidConfig.from_json('{"budget": 0.2}')``
(equivalently ``HieraVidConfig.model_validate_json``), or a dict / an instance via
:meth:`HieraVidConfig.coerce`.
"""
from __future__ import annotations

from typing import Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["HieraVidConfig", "DEFAULT_NUM_LAYERS"]

#: LLM depth of all three paper models (Qwen2-7B: LLaVA-Video-7B, LLaVA-OneVision-7B, Qwen2-VL-7B).
DEFAULT_NUM_LAYERS = 28


class HieraVidConfig(BaseModel):
    """Hyper-parameters of HieraVid (Sec. 3 and 4.1 of the paper).

    Defaults follow Sec. 4.1 (4 stages, beta = 0.4, lambda = 0.5) and, where the paper is
    silent, the authors' development code (R_var = 0.1, relevance-only second stage).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- budget and layer-level schedule (Sec. 3.3, Eq. 11) -------------------------------
    budget: float = Field(
        0.3, gt=0.0, le=1.0,
        description="Relative token budget b in (0, 1]: layer-averaged share of visual tokens.")
    num_stages: int = Field(
        4, ge=1, le=64,
        description="Number of stages n (Sec. 3.3); stage 1 is the segment-level merge at the "
                    "LLM input, stages 2..n prune at layer boundaries.")
    stage_layers: Optional[List[int]] = Field(
        None,
        description="Explicit first layer of every stage (starts with 0, strictly increasing, "
                    "length num_stages). None: equal stages, floor(i * L / n).")
    stage_decay: float = Field(
        0.65, gt=0.0, le=1.0,
        description="q in (0, 1]: retention of stage i+1 = q * retention of stage i (constant "
                    "per-stage prune ratio 1 - q, PyramidDrop style), capped at 1, scaled so the "
                    "layer-weighted mean equals the budget. 1.0 = uniform retention.")
    merge_ratio: Optional[float] = Field(
        None, ge=0.0, lt=1.0,
        description="R_merge in [0, 1) (Eq. 3/11). None: derived from the schedule "
                    "(1 - retention of stage 1).")
    # --- segment level (Sec. 3.1) ----------------------------------------------------------
    segmentation: Literal["merge_ratio", "none", "avg_pool"] = Field(
        "merge_ratio",
        description="merge_ratio: Eq. 1-2 (paper); none / avg_pool: Table 5 ablations.")
    beta: float = Field(
        0.4, ge=0.0, le=1.0,
        description="Segment threshold beta in [0, 1]: boundary where O_t < beta (Eq. 2).")
    segment_ratio: Optional[float] = Field(
        None, gt=0.0, lt=1.0,
        description="Ratio of the Top-K used for segmentation (Eq. 2) in (0, 1). None: the "
                    "merge ratio (paper). Useful at budgets high enough that nothing is merged.")
    avg_pool_threshold: float = Field(
        0.9, ge=-1.0, le=1.0,
        description="avg_pool ablation: boundary where the cosine of mean-pooled adjacent "
                    "frames is below this value, in [-1, 1].")
    # --- segment budget allocation (Sec. 3.1.2, Eq. 4-5) -------------------------------------
    lam: float = Field(
        0.5, ge=0.0, le=1.0,
        description="lambda in [0, 1] of Eq. 4 (representativeness vs diversity).")
    r_var: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Pruning deviation R_var in [0, 1] of Eq. 5.")
    segment_score_keeps_more: bool = Field(
        True,
        description="True: a higher segment score b_m keeps MORE tokens (Sec. 3.1.2 text, "
                    "authors' code keep = base + R_var * z). False: Eq. 5 read literally "
                    "(b_m raises the prune rate).")
    missing_neighbor: Literal["neutral", "zero"] = Field(
        "neutral",
        description="Eq. 4 for the first / last segment (no left / right neighbours). neutral: "
                    "the missing term takes the mean of that term over the segments that have "
                    "it; zero: empty sum = zero vector, cosine 0.")
    # --- frame level (Sec. 3.2, Eq. 8-10) ----------------------------------------------------
    relevance_source: Literal["last", "mean"] = Field(
        "last",
        description="last: last instruction token (paper); mean: attention averaged over the "
                    "instruction tokens (Table 7 ablation).")
    relevance_sign: Literal[1, -1] = Field(
        1,
        description="+1: Eq. 8 as printed; -1: the authors' code negates the attention "
                    "before min-max (copied from CDPruner).")
    dpp_kernel: Literal["dot", "cosine"] = Field(
        "dot",
        description="dot: L = Hv Hv^T / d (Eq. 9, paper); cosine: cosine similarity of the "
                    "hidden states (authors' code).")
    dpp_from_stage: int = Field(
        3, ge=2,
        description="First stage (1-based; stage 1 = merge) that runs the DPP; earlier pruning "
                    "stages keep tokens by relevance alone (Sec. 4.1; authors' code: "
                    "relevance-only before layer 8). Must be >= 2.")
    dpp_eps: float = Field(
        1e-10, gt=0.0, lt=1.0,
        description="Greedy MAP stop threshold on d_i^2 (Chen et al. 2018), in (0, 1).")
    # --- where pruning happens (Table 4 ablation) ---------------------------------------------
    mode: Literal["full", "input_only"] = Field(
        "full",
        description="full: stage 1 at the input, later stages inside the LLM; input_only: all "
                    "pruning before the LLM, every layer sees round(b * N) tokens.")

    @field_validator("stage_layers")
    @classmethod
    def _check_stage_layers(cls, v: Optional[List[int]]) -> Optional[List[int]]:
        if v is None:
            return v
        if len(v) == 0 or v[0] != 0:
            raise ValueError("stage_layers must start with layer 0")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("stage_layers must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> "HieraVidConfig":
        if self.stage_layers is not None and len(self.stage_layers) != self.num_stages:
            raise ValueError(
                f"stage_layers has {len(self.stage_layers)} entries but num_stages is "
                f"{self.num_stages}; stage_layers must have exactly num_stages entries")
        return self

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "HieraVidConfig":
        """Parse the JSON form (same validation as the constructor)."""
        return cls.model_validate_json(text)

    @classmethod
    def coerce(cls, obj: Any) -> "HieraVidConfig":
        """Accept a config, a dict, a JSON string or None (defaults)."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, (str, bytes)):
            return cls.from_json(obj)
        return cls.model_validate(obj)

    def stage_boundaries(self, num_layers: int = DEFAULT_NUM_LAYERS) -> List[int]:
        """First layer of each stage for an LLM with ``num_layers`` layers.

        Explicit ``stage_layers`` are checked against the depth; otherwise equal stages
        ``floor(i * num_layers / num_stages)``: 0, 7, 14, 21 for 28 layers (Sec. 4.1).
        """
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if self.stage_layers is not None:
            if self.stage_layers[-1] >= num_layers:
                raise ValueError(
                    f"stage_layers {self.stage_layers} do not fit a {num_layers}-layer model "
                    f"(every entry must be < {num_layers})")
            return list(self.stage_layers)
        if self.num_stages > num_layers:
            raise ValueError(
                f"num_stages={self.num_stages} exceeds the model's {num_layers} layers")
        return [(i * num_layers) // self.num_stages for i in range(self.num_stages)]

    def layers_per_stage(self, num_layers: int = DEFAULT_NUM_LAYERS) -> List[int]:
        """Number of decoder layers in each stage."""
        b = self.stage_boundaries(num_layers) + [num_layers]
        return [b[i + 1] - b[i] for i in range(len(b) - 1)]
