"""Shared glue between vLLM's video models and :mod:`hieravid_vllm.core`.

* :class:`HieraVidProcessorMixin` fixes the number of video placeholder tokens at
  prompt-processing time from the video's grid (exact counts from the core schedule);
* :func:`prune_video` runs the input stage of the core on one video's vision features;
* :class:`HieraVidMRoPEMixin` keeps M-RoPE positions right for Qwen2-VL / Qwen2.5-VL:
  kept tokens keep their original (t, h, w) positions and text after a video is numbered as
  without pruning, so nothing after the video depends on which tokens were kept (this is
  what keeps prefix caching and chunked prefill correct).
"""
from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.pipeline import prune_input_stage
from hieravid_vllm.core.schedule import build_schedule
from hieravid_vllm.options import (CONFIG_KEY, REQUEST_BUDGET_KEY, ServingOptions,
                                   parse_request_budget)
from hieravid_vllm import metrics

logger = logging.getLogger("vllm.hieravid_vllm")

#: Directory where every pruned video's vision features and kept indices are saved
#: (debug/test hook; off when unset).
DEBUG_DIR_ENV = "HIERAVID_DEBUG_DIR"


def serving_options(hf_config: Any) -> Optional[ServingOptions]:
    """The plugin options written into the HF config at engine creation (None: off)."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        return None
    return ServingOptions.from_dict(raw)


def effective_config(opts: ServingOptions) -> HieraVidConfig:
    """The config prompt processing and the model run with.

    ``full`` mode (the default) merges before the LLM and prunes again at the stage
    boundaries inside it (:mod:`hieravid_vllm.stages`); where the engine cannot run the stages
    (pipeline parallel, speculative decoding), the engine-config patch writes
    ``mode=input_only`` into the options before any process reads them, so the API process
    and the workers always agree.
    """
    return opts.config


def num_llm_layers(hf_config: Any) -> int:
    text = getattr(hf_config, "text_config", None) or hf_config
    return int(text.num_hidden_layers)


@lru_cache(maxsize=4096)
def _kept_count(cfg_json: str, num_frames: int, tokens_per_frame: int, num_layers: int) -> int:
    cfg = HieraVidConfig.model_validate_json(cfg_json)
    n = num_frames * tokens_per_frame
    sched = build_schedule(cfg, n, num_layers, max_merge=max(num_frames - 1, 0) * tokens_per_frame)
    return int(sched.input_target)


@lru_cache(maxsize=4096)
def _stage_schedule(cfg_json: str, num_frames: int, tokens_per_frame: int,
                    num_layers: int) -> tuple:
    cfg = HieraVidConfig.model_validate_json(cfg_json)
    n = num_frames * tokens_per_frame
    sched = build_schedule(cfg, n, num_layers, max_merge=max(num_frames - 1, 0) * tokens_per_frame)
    if cfg.mode == "full":
        counts = tuple(int(c) for c in sched.counts)
        uses = tuple(bool(u) for u in sched.uses_dpp)
    else:  # every layer sees the input count
        counts = (int(sched.input_target),) * len(cfg.stage_boundaries(num_layers))
        uses = (False,) * len(counts)
    return counts, uses


def stage_schedule(cfg: HieraVidConfig, num_frames: int, tokens_per_frame: int,
                   num_layers: int) -> tuple:
    """(visual tokens per LLM stage, DPP used per stage) of one video (exact, grid only)."""
    return _stage_schedule(cfg.model_dump_json(), int(num_frames), int(tokens_per_frame),
                           int(num_layers))


def video_item_grid(hf_config: Any, data: Any) -> tuple[int, int, int]:
    """(frames, tokens per frame, placeholder tokens never pruned) of one video item's
    multimodal inputs (worker and engine-core side; the grid alone fixes every count)."""
    if "video_grid_thw" in data:  # Qwen2-VL family: (t, h, w) patches, 2x2 merge
        t, h, w = (int(x) for x in data["video_grid_thw"].data)
        m = hf_config.vision_config.spatial_merge_size
        return t, (h // m) * (w // m), 0
    frames = int(data["pixel_values_videos"].data.shape[0])  # LLaVA-OneVision
    vc = hf_config.vision_config
    side = int(np.ceil((vc.image_size // vc.patch_size) / 2))
    return frames, side * side, 1  # + the newline token


def video_item_config(opts: ServingOptions, data: Any) -> HieraVidConfig:
    """The config one video item is pruned with (its per-item budget when present)."""
    field = data.get(BUDGET_FIELD) if hasattr(data, "get") else None
    if field is None:
        return effective_config(opts)
    (budget,) = decode_budgets(field.data)
    return effective_config(opts.with_budget(budget))


def kept_count(cfg: HieraVidConfig, num_frames: int, tokens_per_frame: int, num_layers: int) -> int:
    """Visual tokens of one video entering the LLM (exact; depends on the grid, not content)."""
    return _kept_count(cfg.model_dump_json(), int(num_frames), int(tokens_per_frame),
                       int(num_layers))


#: Per-item field of a video's multimodal inputs carrying the budget it is pruned at (the
#: server's, or the request's ``mm_processor_kwargs.hieravid_budget``). The float64's bit
#: pattern travels as an int64, so no dtype cast on the way to the worker can change it.
BUDGET_FIELD = "hieravid_budget_bits"


def encode_budget(budget: float) -> int:
    return int(torch.tensor(float(budget), dtype=torch.float64).view(torch.int64))


def decode_budgets(field: Any) -> list[float]:
    """Budgets of a (batched) ``hieravid_budget_bits`` field, one per video item."""
    if isinstance(field, torch.Tensor):
        bits = field.reshape(-1)
    else:
        bits = torch.stack([torch.as_tensor(x).reshape(()) for x in field])
    return bits.to("cpu", torch.int64).view(torch.float64).tolist()


def video_item_options(opts: ServingOptions, budgets: Any, num_videos: int
                       ) -> list[ServingOptions]:
    """Options for each video of an ``embed_multimodal`` call (worker side): the budget the
    prompt processor fixed for that video. Never guessed: a missing field is an error."""
    if budgets is None:
        raise RuntimeError(f"HieraVid: video inputs without {BUDGET_FIELD} (not prepared by "
                           f"the HieraVid prompt processor)")
    values = decode_budgets(budgets)
    if len(values) != num_videos:
        raise RuntimeError(f"HieraVid: {len(values)} budgets for {num_videos} videos")
    return [opts.with_budget(b) for b in values]


class HieraVidProcessorMixin:
    """Mixin for a vLLM multimodal processor: fewer video placeholders when HieraVid is on.

    The replacement that vLLM's processor computes for a video (``[video_token] * N``,
    LLaVA-OneVision: ``N`` frame tokens + 1 newline) is shortened to the schedule's count.
    Subclasses implement :meth:`_hieravid_grid` giving (frames, tokens per frame, extra
    tokens that are never pruned) of one video item.

    Budget: the server's, or the request's ``mm_processor_kwargs.hieravid_budget`` where the
    operator allows it (validated here: a bad value is a 400 naming ``hieravid_budget``). It
    is attached to every video item as the :data:`BUDGET_FIELD` input, so the placeholder
    count here and the pruning in the worker read the same number. vLLM hashes a request's
    ``mm_processor_kwargs`` into each item's hash, so the same video at two budgets gets two
    processor-cache, encoder-cache and prefix-cache identities.
    """

    def _hieravid_grid(self, out_mm_kwargs, mm_items, item_idx: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def _hieravid_options(self) -> Optional[ServingOptions]:
        return serving_options(self.info.get_hf_config())

    @staticmethod
    def _hieravid_strip(hf_kwargs: Mapping[str, object]) -> Mapping[str, object]:
        """The kwargs without ours (the HF processor must not see it)."""
        if REQUEST_BUDGET_KEY not in hf_kwargs:
            return hf_kwargs
        return {k: v for k, v in hf_kwargs.items() if k != REQUEST_BUDGET_KEY}

    def _hieravid_budget(self, opts: ServingOptions, hf_kwargs: Mapping[str, object]) -> float:
        from vllm.exceptions import VLLMValidationError

        unknown = sorted(k for k in hf_kwargs if isinstance(k, str) and k != REQUEST_BUDGET_KEY
                         and k.lower().replace("-", "_").startswith("hieravid"))
        if unknown:  # a misspelled key would silently serve the server's budget
            raise VLLMValidationError(
                f"unknown HieraVid key(s) {unknown} in mm_processor_kwargs; the only one is "
                f"{REQUEST_BUDGET_KEY!r} (a number in (0, 1])",
                parameter="mm_processor_kwargs")
        if REQUEST_BUDGET_KEY not in hf_kwargs:
            return opts.config.budget

        try:
            budget = parse_request_budget(hf_kwargs[REQUEST_BUDGET_KEY],
                                          opts.allow_request_budget)
            opts.with_budget(budget)
        except ValueError as e:  # pydantic's ValidationError is one too
            raise VLLMValidationError(str(e), parameter=f"mm_processor_kwargs."
                                                        f"{REQUEST_BUDGET_KEY}") from None
        return budget

    def get_dummy_mm_inputs(self, *args, **kwargs):
        with metrics.not_counted():  # vLLM's profiling input, not a served video
            return super().get_dummy_mm_inputs(*args, **kwargs)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        opts = self._hieravid_options()
        if opts is None:
            return super()._apply_hf_processor_main(mm_items, hf_kwargs)
        budget = self._hieravid_budget(opts, hf_kwargs)
        out = super()._apply_hf_processor_main(mm_items, self._hieravid_strip(hf_kwargs))
        n = mm_items.get_count("video", strict=False)
        if n:
            out[BUDGET_FIELD] = torch.full((n,), encode_budget(budget), dtype=torch.int64)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = super()._get_mm_fields_config(hf_inputs,
                                               self._hieravid_strip(hf_processor_mm_kwargs))
        if self._hieravid_options() is None:
            return fields
        from vllm.multimodal.inputs import MultiModalFieldConfig

        return {**fields, BUDGET_FIELD: MultiModalFieldConfig.batched("video",
                                                                      keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items,
                                              self._hieravid_strip(hf_processor_mm_kwargs),
                                              out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        opts = serving_options(hf_config)
        if opts is None:
            return updates
        layers = num_llm_layers(hf_config)
        out = []
        for upd in updates:
            if upd.modality != "video":
                out.append(upd)
                continue
            orig = upd.replacement

            def replacement(item_idx: int, _orig=orig):
                tokens = _orig(item_idx)
                full = getattr(tokens, "full", tokens)
                frames, per_frame, extra = self._hieravid_grid(out_mm_kwargs, mm_items, item_idx)
                n = frames * per_frame
                if len(full) != n + extra:
                    raise ValueError(f"HieraVid: video item has {len(full)} placeholder tokens, "
                                     f"expected {n} + {extra}")
                item = out_mm_kwargs["video"][item_idx]
                field = item.get(BUDGET_FIELD) if hasattr(item, "get") else None
                if field is None:
                    raise RuntimeError(f"HieraVid: video item without {BUDGET_FIELD}")
                (budget,) = decode_budgets(field.data)
                keep = kept_count(effective_config(opts.with_budget(budget)), frames,
                                  per_frame, layers)
                metrics.record_prompt(n, keep, budget)
                return [full[0]] * (keep + extra)

            out.append(type(upd)(modality=upd.modality, target=upd.target,
                                 replacement=replacement))
        return out


_debug_counter = 0


def prune_video(features: torch.Tensor, opts: ServingOptions, num_layers: int):
    """Run the HieraVid input stage on one video's features (T, H', W', C).

    Returns the core's :class:`~hieravid_vllm.core.pipeline.InputStageResult`. The
    instruction is unknown here (the last prompt token's input embedding carries no question
    information), so the input-stage DPP runs without relevance (r = 1).
    """
    global _debug_counter
    cfg = effective_config(opts)
    t0 = time.perf_counter()
    from hieravid_kernels import OPS  # the kernel dispatch: Triton on CUDA, core reference else
    res = prune_input_stage(features, None, cfg, num_layers=num_layers, ops=OPS)
    if features.is_cuda:  # time the GPU work, not only its launch
        torch.cuda.synchronize(features.device)
    dt = time.perf_counter() - t0
    T, H, W, _ = features.shape
    logger.debug("HieraVid: video %dx%dx%d at budget %s: %d -> %d visual tokens (%d segments) "
                 "in %.2f ms", T, H, W, cfg.budget, T * H * W, res.kept_indices.numel(),
                 res.num_segments, dt * 1e3)
    metrics.record_prune(T * H * W, int(res.kept_indices.numel()), dt)
    debug_dir = os.environ.get(DEBUG_DIR_ENV)
    if debug_dir:
        _debug_counter += 1
        path = Path(debug_dir) / f"video-{os.getpid()}-{_debug_counter:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": features.detach().float().cpu(),
                    "kept_indices": res.kept_indices.cpu(),
                    "config": cfg.model_dump(mode="json"), "num_layers": num_layers}, path)
    return res


# ---------------------------------------------------------------------------------------------
# M-RoPE (Qwen2-VL family)
# ---------------------------------------------------------------------------------------------
class HieraVidMRoPEMixin:
    """Positions for pruned videos in Qwen2-VL / Qwen2.5-VL.

    ``embed_multimodal`` appends position channels to every image/video embedding row
    (:func:`append_position_channels`): (t, h, w) of the token relative to the media start
    (as vLLM's EVS does) and the row's index inside the media's placeholder run. ``get_mrope_input_positions`` numbers text
    exactly as without pruning and gives a pruned run placeholder positions;
    ``recompute_mrope_positions`` (called by vLLM's model runner whenever embeddings are
    gathered, also for partial chunks) writes the real positions of the rows it receives.
    A video served wholly from the prefix cache needs no positions at all, and the text
    after it was numbered right from the start.
    """

    def get_mrope_input_positions(self, input_tokens, mm_features):
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        grids = list(self.iter_mm_grid_thw(feats))
        pos_list: list[np.ndarray] = []
        next_idx = 0  # first position after what has been numbered
        st = 0
        for feat, (offset, gt, gh, gw, t_factor) in zip(feats, grids):
            text_len = offset - st
            pos_list.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_idx)
            base = next_idx + text_len
            grid = np.indices((gt, gh, gw)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            length = int(feat.mm_position.length)
            grid_max = int(grid.max()) if grid.size else -1
            if length == grid.shape[1]:
                pos_list.append(grid + base)
            else:  # pruned: placeholders, overwritten by recompute_mrope_positions
                pos_list.append(np.full((3, length), base + grid_max, dtype=np.int64))
            next_idx = base + grid_max + 1
            st = offset + length
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            pos_list.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_idx)
        positions = np.concatenate(pos_list, axis=1).reshape(3, -1) if pos_list else \
            np.zeros((3, 0), dtype=np.int64)
        delta = int(next_idx + (len(input_tokens) - st) - len(input_tokens))
        return torch.from_numpy(np.ascontiguousarray(positions)), delta

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                  num_computed_tokens):
        cfg = self.config
        if not multimodal_embeddings:
            # vLLM calls this for every request on every step once pruning is enabled, decode
            # steps included; with no embeddings in the step nothing moves (the loop below
            # would not run), so skip the prompt scan and the copy: same positions and delta.
            n = len(input_ids)
            delta = int(mrope_positions[:, -1].max()) + 1 - n if n else 0
            return [], mrope_positions, delta
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.to("cpu", torch.long)
        else:
            ids = torch.as_tensor(input_ids, dtype=torch.long)
        k = NUM_POS_CHANNELS
        out_embeds = [mm[:, :-k] for mm in multimodal_embeddings]
        positions = mrope_positions.clone()
        n = ids.numel()
        media = (ids == cfg.video_token_id) | (ids == cfg.image_token_id)
        starts = torch.nonzero(media & ~torch.cat([media.new_zeros(1), media[:-1]])).flatten()
        ends = torch.nonzero(media & ~torch.cat([media[1:], media.new_zeros(1)])).flatten() + 1
        pending = [(int(s), int(e)) for s, e in zip(starts, ends) if int(e) > num_computed_tokens]
        if len(pending) < len(multimodal_embeddings):
            raise RuntimeError("HieraVid: more media embeddings than media runs in the prompt")
        for (s, _e), mm in zip(pending, multimodal_embeddings):
            extra = decode_position_channels(mm[:, -k:])
            base = int(positions[:, s - 1].max()) + 1 if s > 0 else 0
            rows = s + extra[:, 3]
            positions[:, rows.to(positions.device)] = (extra[:, :3].T + base).to(positions)
        # text positions never change, so the decode offset is the unpruned one
        delta = int(positions[:, -1].max()) + 1 - n if n else 0
        return out_embeds, positions, delta


#: Extra channels appended to Qwen media embeddings: (t, h, w) as 2 base-256 digits each and
#: the row index in the placeholder run as 3 digits. Digits < 256 are exact in bf16/fp16, so
#: positions survive the embedding dtype (one channel per value would not in bf16).
_DIGITS = (2, 2, 2, 3)
NUM_POS_CHANNELS = sum(_DIGITS)


def encode_position_channels(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 4) non-negative int64 -> (n, NUM_POS_CHANNELS) base-256 digits in ``dtype``."""
    cols = []
    for c, nd in enumerate(_DIGITS):
        v = values[:, c]
        if v.numel() and int(v.max()) >= 256 ** nd:
            raise ValueError(f"HieraVid: position value {int(v.max())} too large to encode")
        for d in range(nd):
            cols.append((v >> (8 * d)) & 255)
    return torch.stack(cols, dim=1).to(dtype)


def decode_position_channels(extra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_position_channels`: (n, NUM_POS_CHANNELS) -> (n, 4) int64."""
    digits = extra.to("cpu", torch.float64).round().long()
    out, k = [], 0
    for nd in _DIGITS:
        v = torch.zeros(digits.shape[0], dtype=torch.long)
        for d in range(nd):
            v += digits[:, k] << (8 * d)
            k += 1
        out.append(v)
    return torch.stack(out, dim=1)


def append_position_channels(emb: torch.Tensor, thw: torch.Tensor, t_scale: float) -> torch.Tensor:
    """Rows of ``emb`` + position channels: (t * t_scale, h, w) and the row index in the run."""
    thw = thw.to("cpu", torch.long)
    idx = torch.arange(emb.shape[0], dtype=torch.long)
    t = (thw[:, 0].double() * t_scale).long() if t_scale != 1.0 else thw[:, 0]
    vals = torch.stack([t, thw[:, 1], thw[:, 2], idx], dim=1)
    return torch.cat([emb, encode_position_channels(vals, emb.dtype).to(emb.device)], dim=1)


def full_grid_thw(gt: int, gh: int, gw: int) -> torch.Tensor:
    """(t, h, w) of every token of a (gt, gh, gw) grid in raster order."""
    return torch.from_numpy(np.indices((gt, gh, gw)).reshape(3, -1).T.copy())
