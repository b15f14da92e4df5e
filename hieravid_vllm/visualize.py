"""What HieraVid keeps, as a picture (Figure 3 of the paper).

::

    python -m hieravid_vllm.visualize VIDEO [--model PATH] [--budget 0.3] [--num-frames 16] \\
        [--mode full|input_only] [--question TEXT] -o out.png [--json out.json]

The figure has three parts:

1. **overlap ratio** O_t (Eq. 2) of every frame t >= 1 as bars against the threshold beta
   (dashed line; bars below it in red): the share of frame t's token positions whose
   similarity to frame t-1 (Eq. 1) is in the video-wide Top-K used for static-token
   merging; a new segment starts where O_t < beta (vertical lines);
2. a **strip of frames** (one per token frame), each with a bar in its segment's colour;
3. the **tokens kept at each stage**, drawn over the frames (kept tokens bright with an
   outline in the segment colour, dropped ones dimmed). Stage 1 is the LLM input after
   static-token merging (Eq. 3: a merged run keeps its first token); stages 2..n are the
   layer-level selections (Sec. 3.3, Eq. 8-11) with the schedule's counts. In
   ``input_only`` mode: stage 1 and the input-level DPP selection.

Features (said in the figure's title):

* ``--model PATH`` (a local Hugging Face directory of Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision,
  e.g. one made by :func:`hieravid_vllm.testing.models.build_tiny_model`): the model's video
  features (vision tower + projector, through transformers, as the plugin gets them in vLLM)
  and, in ``full`` mode, the tokens kept at every stage from the staged transformers forward
  of :class:`hieravid_vllm.reference.HieraVidReference` (the question after the video, text +
  kept visual tokens only from each stage on, original M-RoPE positions,
  :func:`hieravid_vllm.core.pipeline.select_layer_stage` on the residual stream entering
  each stage's first layer). The frames go in exactly as sampled (their fps: the source fps
  x sampled / total).
  Qwen2-VL models merge frame pairs (temporal patch 2): a token frame shows its first frame.
* no model: a **pixel-patch feature** (documented in :func:`pixel_patch_features`: mean
  colour, colour spread, gradient energy and a 4x4 thumbnail of every ``--patch`` x
  ``--patch`` patch), and the layer-level stages run the DPP selection on these input
  features with uniform relevance (no LLM hidden states exist; a relevance-only stage would
  just keep the lowest indices), with the schedule of a ``--num-layers`` LLM (default 28,
  the paper's models).

``--json`` writes the numbers behind the figure (frame indices, O_t, segment ids,
boundaries, per-stage counts and kept token indices).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .core import HieraVidConfig
from .core.config import DEFAULT_NUM_LAYERS
from .core.pipeline import prune_input_stage, select_layer_stage
from .core.schedule import round_half_up
from .core.segment import overlap_ratio, similarity_map, static_topk

__all__ = ["Visualization", "pixel_patch_features", "model_run", "compute", "render", "main"]

_SEG_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
               "#bfef45", "#469990", "#9a6324"]


# =========================================================================================
# Frames and features
# =========================================================================================
def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``total`` frames (all when <= 0 or >= total)."""
    if num_frames <= 0 or num_frames >= total:
        return list(range(total))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, num_frames)})


def _resize_max_side(frames: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    H, W = frames.shape[1:3]
    s = max(H, W)
    if max_side <= 0 or s <= max_side:
        return frames
    h, w = max(1, round(H * max_side / s)), max(1, round(W * max_side / s))
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])


def pixel_patch_features(frames: np.ndarray, patch: int = 28, dither: float = 0.05,
                         seed: int = 0) -> torch.Tensor:
    """A model-free token feature for every ``patch`` x ``patch`` pixel patch.

    ``frames`` uint8 (T, H, W, 3) RGB; H and W are cropped to multiples of ``patch``
    (bottom / right remainder dropped). Per patch, 24 values, each roughly in [-1, 1]:

    * mean R, G, B / 127.5 - 1                                   (3)
    * standard deviation of R, G, B / 64                         (3)
    * mean |horizontal| and |vertical| grey-level gradient / 64   (2)
    * the patch's grey levels area-averaged to 4 x 4, / 127.5 - 1 (16)

    plus 2 tie-break coordinates. Why: video codecs re-encode static content slightly
    differently from frame to frame (a key frame after P-frames changes every block a little,
    skipped blocks repeat exactly), and the video-wide Top-K of Eq. 2 ranks positions by
    exactly these tiny differences: codec noise alone would push whole frames (the key
    frames) out of the Top-K and cut segments there. The extra coordinates are
    ``a_ij |f|`` in coordinate ``t mod 2`` and 0 in the other, with ``a_ij`` spread evenly
    over [dither, 2 dither] across the positions (a fixed permutation): an unchanged patch has
    similarity 1 / (1 + a_ij^2) to the previous frame, the same set of values in every frame,
    so the Top-K takes the same share of every frame's static positions; the dither
    (default 0.05: a similarity drop of 0.0025..0.01) is far above codec noise and far below
    real changes (moving objects, cuts). On the synthetic scene clips every dither in
    [0.03, 0.1] puts the boundaries exactly at the planted cuts for budgets 0.1..0.3.

    Returns (T, H // patch, W // patch, 26) float32. It only stands in for a vision encoder's
    features so that segmentation and merging can be shown without a model.
    """
    import cv2

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    T, H, W, _ = frames.shape
    gh, gw = H // patch, W // patch
    if gh < 1 or gw < 1:
        raise ValueError(f"frames {H}x{W} are smaller than one {patch}x{patch} patch")
    x = frames[:, : gh * patch, : gw * patch].astype(np.float32)
    p = x.reshape(T, gh, patch, gw, patch, 3)
    mean = p.mean(axis=(2, 4))
    std = p.std(axis=(2, 4))
    g = x.mean(-1)
    dx = np.zeros_like(g)
    dy = np.zeros_like(g)
    dx[:, :, 1:] = np.abs(g[:, :, 1:] - g[:, :, :-1])
    dy[:, 1:, :] = np.abs(g[:, 1:, :] - g[:, :-1, :])
    grad = np.stack([dx.reshape(T, gh, patch, gw, patch).mean(axis=(2, 4)),
                     dy.reshape(T, gh, patch, gw, patch).mean(axis=(2, 4))], -1)
    thumbs = np.stack([cv2.resize(f, (gw * 4, gh * 4), interpolation=cv2.INTER_AREA)
                       for f in g])                                   # (T, 4gh, 4gw)
    thumbs = thumbs.reshape(T, gh, 4, gw, 4).transpose(0, 1, 3, 2, 4).reshape(T, gh, gw, 16)
    feat = np.concatenate([mean / 127.5 - 1.0, std / 64.0, grad / 64.0,
                           thumbs / 127.5 - 1.0], -1)
    norm = np.linalg.norm(feat, axis=-1, keepdims=True) + 1e-6          # (T, gh, gw, 1)
    perm = np.random.default_rng(seed).permutation(gh * gw).reshape(gh, gw)
    a = dither * (1.0 + perm / max(gh * gw - 1, 1))                       # (gh, gw)
    tie = np.zeros((T, gh, gw, 2), np.float32)
    par = np.arange(T) % 2
    tie[np.arange(T), :, :, par] = (a[None] * norm[..., 0])[np.arange(T)]
    feat = np.concatenate([feat, tie], -1)
    return torch.from_numpy(np.ascontiguousarray(feat, dtype=np.float32))


@dataclass
class ModelRun:
    features: torch.Tensor               # (T', H', W', C) projector output (model dtype)
    token_frames: list[int]              # per token frame: index (into the frames given) of
    #                                      the first frame it covers
    arch: str
    num_layers: int
    stage_kept: Optional[list[list[int]]]  # full mode: flat kept indices per stage


def model_run(model_dir: str | Path, frames: np.ndarray, config: HieraVidConfig,
              question: str, fps: Optional[float] = None) -> ModelRun:
    """Run ``frames`` (T, H, W, 3) uint8 RGB through a checkpoint with
    :class:`hieravid_vllm.reference.HieraVidReference` (transformers, no vLLM): its vision
    features and, in ``full`` mode, the staged forward (text + kept visual tokens, original
    M-RoPE positions, selection at every stage boundary on the residual stream) that gives
    the tokens kept in every stage. ``input_only`` mode: the features only (the selection is
    the input stage's, as the plugin runs it)."""
    from .reference import HieraVidReference

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json (a local Hugging Face model "
                         "directory of Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision is expected)")
    try:
        ref = HieraVidReference(model_dir)
    except ValueError as e:
        raise SystemExit(f"--model {model_dir}: {e}") from None
    stage_kept = None
    if config.mode == "full":
        out = ref.forward([frames], question, config, fps=fps)
        feats = out.prepared.videos[0].features
        stage_kept = [k.tolist() for k in out.kept_indices[0]]
    else:
        feats = ref.video_features(ref.encode([frames], question, fps))[0][0]
    T = frames.shape[0]
    step = 2 if ref.is_qwen else 1  # Qwen2-VL family: temporal patch 2
    token_frames = [min(step * t, T - 1) for t in range(feats.shape[0])]
    name = {"Qwen2VLForConditionalGeneration": "qwen2_vl",
            "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}.get(ref.arch, "llava_onevision")
    return ModelRun(feats.detach(), token_frames, name, ref.num_layers, stage_kept)


# =========================================================================================
# Computation
# =========================================================================================
@dataclass
class Visualization:
    """Everything the figure shows (also written by ``--json``)."""

    frame_indices: list[int]            # source frame index shown for every token frame
    grid: tuple[int, int]               # (H', W') tokens per frame
    overlap: list[float]                # O_t, t = 1..T-1 (Eq. 2)
    beta: float
    segment_ids: list[int]              # per token frame
    boundaries: list[int]               # token-frame indices t where a new segment starts
    boundary_frames: list[int]          # the same as source frame indices
    stage_names: list[str]
    stage_counts: list[int]
    stage_kept: list[list[int]]         # flat token indices t * H'W' + i W' + j per stage
    num_visual: int
    feature_source: str
    stage_source: str
    budget: float
    mode: str
    frames: Optional[np.ndarray] = field(default=None, repr=False)  # (T, H, W, 3) shown

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "frames"}
        d["grid"] = list(self.grid)
        return d


def _segmentation_k(cfg: HieraVidConfig, merge_count: int, n: int, n_sim: int) -> int:
    """K of the segmentation Top-K as :func:`prune_input_stage` chooses it."""
    if cfg.segmentation == "merge_ratio" and cfg.segment_ratio is not None:
        return min(round_half_up(cfg.segment_ratio * n), n_sim)
    return merge_count


def compute(frames: np.ndarray, features: torch.Tensor, token_frames: Sequence[int],
            frame_indices: Sequence[int], config: HieraVidConfig, num_layers: int,
            feature_source: str,
            stage_kept: Optional[list[list[int]]] = None) -> Visualization:
    """Run the core on ``features`` (T, H', W', C) and collect what the figure draws.

    ``frames`` are the decoded frames the features come from, ``token_frames[t]`` the frame
    (index into ``frames``) shown for token frame t, ``frame_indices`` the source frame
    numbers of ``frames``. ``stage_kept``: the kept flat indices of every stage from a model's
    staged forward (:func:`model_run`); None: the layer-level stages are selected on the
    input features themselves.
    """
    T, Hh, Ww, C = features.shape
    if T < 2:
        raise SystemExit("need at least 2 token frames (a longer clip or more --num-frames)")
    N = T * Hh * Ww
    res = prune_input_stage(features, None, config, num_layers=num_layers)
    sched = res.schedule
    # Eq. 1-2 again for the bars (the same K as the pipeline's segmentation)
    S = similarity_map(features)
    k_seg = _segmentation_k(config, sched.merge_count, N, S.numel())
    O = overlap_ratio(static_topk(S, k_seg)) if k_seg else torch.zeros(T - 1)
    seg = res.frame_segment_ids.tolist()
    bounds = [t for t in range(1, T) if seg[t] != seg[t - 1]]
    stage1 = res.merge.flat_indices
    names, counts, kept = [], [], []
    if config.mode == "input_only":
        names = ["stage 1: after static-token merging (Eq. 3)",
                 "LLM input: input-level DPP (Table 4 'input only')"]
        counts = [int(stage1.numel()), int(res.kept_indices.numel())]
        kept = [stage1.tolist(), res.kept_indices.tolist()]
        stage_source = "input-level frame DPP on the input features"
    else:
        bl = list(sched.boundaries) + [num_layers]
        names = [f"stage 1 (layers 0-{bl[1] - 1}): after static-token merging"]
        counts = [int(stage1.numel())]
        kept = [stage1.tolist()]
        if stage_kept is not None:
            if stage_kept[0] != stage1.tolist():
                raise RuntimeError("the model's input stage differs from the core's on the "
                                   "same features")
            stage_source = ("stages >= 2: the staged forward of hieravid_vllm.reference "
                            "(select_layer_stage on the LLM residual stream at each stage)")
            for i in range(1, len(sched.counts)):
                kind = "DPP" if sched.uses_dpp[i] else "relevance top-k"
                names.append(f"stage {i + 1} (layers {bl[i]}-{bl[i + 1] - 1}): {kind}")
                counts.append(len(stage_kept[i]))
                kept.append(list(stage_kept[i]))
        else:
            stage_source = ("stages >= 2: select_layer_stage (DPP) on the input features, "
                            "uniform relevance (no model: no LLM hidden states)")
            cur = torch.arange(stage1.numel())
            for i in range(1, len(sched.counts)):
                # uniform relevance: a relevance-only stage would keep the lowest indices (its
                # tie-break), so every stage runs the DPP on the features
                keep = select_layer_stage(res.features[cur], None, res.segment_ids[cur],
                                          sched.counts[i], config, use_dpp=True)
                cur = cur[keep]
                names.append(f"stage {i + 1} (layers {bl[i]}-{bl[i + 1] - 1}): DPP")
                counts.append(int(cur.numel()))
                kept.append(stage1[cur].tolist())
    shown = np.stack([frames[k] for k in token_frames])
    return Visualization(
        frame_indices=[int(frame_indices[k]) for k in token_frames], grid=(Hh, Ww),
        overlap=[float(x) for x in O], beta=float(config.beta), segment_ids=seg,
        boundaries=bounds, boundary_frames=[int(frame_indices[token_frames[t]]) for t in bounds],
        stage_names=names, stage_counts=counts, stage_kept=kept, num_visual=N,
        feature_source=feature_source, stage_source=stage_source, budget=config.budget,
        mode=config.mode, frames=shown)


# =========================================================================================
# Figure
# =========================================================================================
def _hex_rgb(c: str) -> np.ndarray:
    return np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def _overlay(frame: np.ndarray, kept_mask: np.ndarray, color: str, cell: int = 14) -> np.ndarray:
    """Frame resized to the token grid x ``cell`` px; dropped tokens dimmed, kept outlined."""
    import cv2

    gh, gw = kept_mask.shape
    img = cv2.resize(frame, (gw * cell, gh * cell), interpolation=cv2.INTER_AREA)
    img = img.astype(np.float32)
    m = np.kron(kept_mask.astype(np.float32), np.ones((cell, cell), np.float32))[..., None]
    img = img * (0.18 + 0.82 * m)
    edge = np.zeros((cell, cell), bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    e = np.kron(kept_mask, edge).astype(bool)
    img[e] = 0.35 * img[e] + 0.65 * _hex_rgb(color)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(vis: Visualization, out: str | Path, title: Optional[str] = None,
           dpi: int = 80, max_columns: int = 32) -> Path:
    """Draw the figure to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    T = len(vis.frame_indices)
    cols = list(range(T)) if T <= max_columns else sorted(
        {int(round(x)) for x in np.linspace(0, T - 1, max_columns)})
    nc = len(cols)
    gh, gw = vis.grid
    rows = 1 + len(vis.stage_names)
    aspect = gh / gw
    fig_w = max(8.0, 1.05 * nc)
    fig_h = 2.6 + rows * (1.05 * aspect + 0.3)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    gs = GridSpec(rows + 1, nc, figure=fig, height_ratios=[2.2] + [aspect * 1.0] * rows,
                  hspace=0.55, wspace=0.06)
    ax = fig.add_subplot(gs[0, :])
    t_axis = np.arange(1, T)
    O = np.array(vis.overlap)
    colors = ["tab:red" if o < vis.beta else "tab:blue" for o in O]
    ax.bar(t_axis, O, color=colors, width=0.8)
    ax.axhline(vis.beta, ls="--", color="k", lw=1)
    ax.text(T - 0.5, vis.beta + 0.02, f"beta = {vis.beta:g}", ha="right", va="bottom",
            fontsize=8)
    for b in vis.boundaries:
        ax.axvline(b - 0.5, color="tab:red", lw=1.2, ls=":")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(T))
    ax.set_xticklabels([str(i) for i in range(T)], fontsize=7)
    ax.set_ylabel("overlap ratio O_t", fontsize=8)
    ax.set_xlabel("token frame t.  Below: its frame (bar colour = segment, f = source frame "
                  "number), then the tokens kept at each stage", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    head = title or (f"HieraVid, budget {vis.budget:g} ({vis.mode}): {vis.num_visual} visual "
                     f"tokens in {T} token frames, {len(set(vis.segment_ids))} segments "
                     "(new segment where O_t < beta, red)")
    ax.set_title(f"{head}\nfeatures: {vis.feature_source}\n{vis.stage_source}", fontsize=8)
    P = gh * gw
    cell = 14
    for r in range(rows):
        if r == 0:
            mask_rows = None
            label = ""
        else:
            kept = np.zeros(T * P, bool)
            kept[np.asarray(vis.stage_kept[r - 1], dtype=np.int64)] = True
            mask_rows = kept.reshape(T, gh, gw)
            label = (f"{vis.stage_names[r - 1]}: {vis.stage_counts[r - 1]} tokens "
                     f"({100.0 * vis.stage_counts[r - 1] / max(vis.num_visual, 1):.1f}%)")
        for c, t in enumerate(cols):
            a = fig.add_subplot(gs[r + 1, c])
            color = _SEG_COLORS[vis.segment_ids[t] % len(_SEG_COLORS)]
            if mask_rows is None:
                import cv2

                img = cv2.resize(vis.frames[t], (gw * cell, gh * cell),
                                 interpolation=cv2.INTER_AREA)
                a.imshow(img)
                a.add_patch(plt.Rectangle((-0.5, gh * cell - 4.5), gw * cell, 4, color=color))
                a.set_title(f"f{vis.frame_indices[t]}", fontsize=6, pad=1)
            else:
                a.imshow(_overlay(vis.frames[t], mask_rows[t], color, cell))
            a.set_xticks([])
            a.set_yticks([])
            start = t in vis.boundaries
            for sp in a.spines.values():
                sp.set_edgecolor("tab:red" if start else "#999")
                sp.set_linewidth(1.6 if start else 0.5)
            if c == 0 and mask_rows is not None:
                a.text(0, 1.04, label, fontsize=8, transform=a.transAxes, ha="left",
                       va="bottom")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


# =========================================================================================
# CLI
# =========================================================================================
def _sampled_fps(video: str, num_sampled: int) -> Optional[float]:
    """Frame rate of the sampled frames (source fps x sampled / total), None if unknown."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        total = float(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
    finally:
        cap.release()
    if fps <= 0 or total <= 0:
        return None
    return fps * num_sampled / total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hieravid_vllm.visualize",
        description="Figure-3 style picture of what HieraVid keeps in a video.")
    p.add_argument("video", help="video file (anything OpenCV decodes)")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    p.add_argument("--model", default=None,
                   help="local HF model dir (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) for real "
                        "vision features; without it a pixel-patch feature is used")
    p.add_argument("--budget", type=float, default=0.3, help="relative token budget (0.3)")
    p.add_argument("--mode", choices=["full", "input_only"], default="full")
    p.add_argument("--config", default=None,
                   help="JSON of further HieraVidConfig fields (beta, num_stages, ...)")
    p.add_argument("--num-frames", type=int, default=16,
                   help="frames sampled evenly from the clip (0: all) (16)")
    p.add_argument("--question", default="What happens in the video?",
                   help="with --model: the question after the video (relevance, Eq. 8)")
    p.add_argument("--patch", type=int, default=28,
                   help="no model: pixel patch size of one token (28 = a Qwen2-VL LLM token)")
    p.add_argument("--max-side", type=int, default=448,
                   help="no model: frames are downscaled to this longer side first (448)")
    p.add_argument("--num-layers", type=int, default=DEFAULT_NUM_LAYERS,
                   help="no model: LLM depth for the stage schedule (28)")
    p.add_argument("--json", default=None, help="also write the numbers behind the figure")
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument("--title", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from .testing.video import read_video_frames

    try:
        extra = json.loads(a.config) if a.config else {}
        if not isinstance(extra, dict):
            raise ValueError("--config must be a JSON object")
        cfg = HieraVidConfig.model_validate({**extra, "budget": a.budget, "mode": a.mode})
    except (ValueError, ValidationError) as e:
        print(f"error: invalid --budget/--mode/--config: {e}", file=sys.stderr)
        return 2
    if not Path(a.video).is_file():
        print(f"error: video {a.video} not found", file=sys.stderr)
        return 2
    try:
        frames = read_video_frames(a.video)
    except RuntimeError as e:
        print(f"error: cannot decode {a.video}: {e}", file=sys.stderr)
        return 2
    idx = sample_frame_indices(len(frames), a.num_frames)
    frames = frames[idx]
    if a.model:
        mr = model_run(a.model, frames, cfg, a.question, _sampled_fps(a.video, len(idx)))
        source = f"{mr.arch} vision tower + projector ({Path(a.model).name})"
        vis = compute(frames, mr.features, mr.token_frames, idx, cfg, mr.num_layers, source,
                      mr.stage_kept)
    else:
        small = _resize_max_side(frames, a.max_side)
        try:
            feats = pixel_patch_features(small, a.patch)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        source = (f"pixel-patch feature, no model ({a.patch}x{a.patch} px patches: mean/std "
                  "colour, gradients, 4x4 thumbnail)")
        vis = compute(small, feats, list(range(len(idx))), idx, cfg, a.num_layers, source)
    out = render(vis, a.out, a.title, a.dpi)
    if a.json:
        Path(a.json).write_text(json.dumps(vis.to_json(), indent=1))
    print(f"[visualize] {out}: {len(vis.frame_indices)} token frames, {vis.num_visual} tokens, "
          f"segments start at frames {[vis.frame_indices[0]] + vis.boundary_frames}; kept per "
          f"stage {vis.stage_counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
