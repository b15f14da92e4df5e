"""Reference HieraVid forward in plain PyTorch / transformers (no vLLM).

This is the oracle the vLLM layer-level stages are tested against, and the offline path for
evaluating HieraVid with a transformers checkpoint (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision /
LLaVA-Video-Qwen2; the tiny test models of :mod:`hieravid_vllm.testing.models` as well as real
checkpoints).

What it computes for one prompt ``[video_1 .. video_k, question]`` (chat template with
``add_generation_prompt=True``) and a :class:`~hieravid_vllm.core.config.HieraVidConfig` in
``full`` mode:

1. Vision features of every video from the HF model's own vision tower + projector, as
   (T, H', W', C): Qwen2-VL family after the 2x2 spatial merge (grid ``video_grid_thw``),
   LLaVA-OneVision after the 2x2 bilinear pooling of every frame (its trailing
   ``image_newline`` token is kept apart and never pruned).
2. Input stage (stage 1, Sec. 3.1.1, Eq. 1-3): :func:`~hieravid_vllm.core.pipeline.
   prune_input_stage`; the video's placeholder run is shortened to the kept count and filled
   with the (merged) features in order. Its schedule (Eq. 11) gives every later stage's count.
3. Positions. Qwen2-VL / Qwen2.5-VL (M-RoPE): every kept token keeps the (t, h, w) position it
   has in the unpruned prompt, text after a video is numbered as without pruning (the numbering
   of vLLM and of the original Qwen code: text resumes at max(previous positions) + 1; for
   Qwen2.5-VL t is scaled by ``second_per_grid_ts * tokens_per_second``), so nothing after a
   video depends on the selection. LLaVA-OneVision: 1-D positions 0..S-1 of the pruned prompt
   (as vLLM numbers it).
4. LLM layers with layer-level balancing (Sec. 3.3): at the first layer b of every stage
   i >= 2 the residual stream entering layer b (un-normalized; ``output_hidden_states[b]`` of
   HF) is read; per video, the relevance (Eq. 8) of its kept visual tokens to the query rows
   (the last prompt token for ``relevance_source="last"``, their mean for "mean") and the
   relevance-weighted per-segment DPP (Eq. 9-10, per-segment budgets Eq. 4-5; relevance only
   for the stages before ``dpp_from_stage``) choose ``schedule.counts[i]`` tokens
   (:func:`~hieravid_vllm.core.pipeline.select_layer_stage`). Layers b.. run on the text tokens
   plus the kept visual tokens only: the sequence is gathered in its original order, rotary
   positions are the gathered original positions and attention is causal over the reduced
   sequence. Text tokens are never dropped.
   Query rows of a video: the rows alive in the stage that ends at b which lie after the
   video's visual tokens, up to and including the last PROMPT token (Qwen: from
   ``<|vision_end|>``; LLaVA-OV: from the video's newline token; with several videos this
   includes the later videos' alive visual tokens). All videos select on the same stream
   (the drops of one video at b do not change another video's query at b); segment ids are
   the input stage's, subset by earlier selections (not renumbered).
5. Final norm + LM head: logits of the last prompt token and of every appended token
   (``extra_token_ids``: decoding steps; the selection depends on the prompt only, the
   appended tokens are attended causally and never change it).

Nothing here imports vLLM. Everything runs in the model's dtype (float32 by default) under
``torch.no_grad``.

Usage::

    ref = HieraVidReference(model_dir)
    out = ref.forward([frames], "What happens?", HieraVidConfig(budget=0.3), fps=8.0)
    out.prompt_logits, out.kept_indices[0]     # stage-by-stage flat indices of video 0
    gen = out.generate(16)                     # greedy, KV cache per stage
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from hieravid_vllm.core.config import HieraVidConfig
from hieravid_vllm.core.pipeline import InputStageResult, prune_input_stage, select_layer_stage

__all__ = [
    "HieraVidReference",
    "PreparedPrompt",
    "ReferenceOutput",
    "GenerationResult",
    "VideoSpan",
    "qwen_mrope_positions",
    "reference_forward",
]

QWEN_ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
LLAVA_OV_ARCHS = ("LlavaOnevisionForConditionalGeneration",)
SUPPORTED_ARCHS = QWEN_ARCHS + LLAVA_OV_ARCHS


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------
def qwen_mrope_positions(num_tokens: int, videos: Sequence[tuple]) -> tuple[torch.Tensor, int]:
    """M-RoPE (t, h, w) positions of an UNPRUNED Qwen2-VL-family prompt.

    ``videos``: (offset, grid_t, grid_h, grid_w, t_factor) per video placeholder run (grid
    after the spatial merge, ``t_factor = second_per_grid_ts * tokens_per_second`` for
    Qwen2.5-VL, 1 for Qwen2-VL), ascending offsets. Text is numbered consecutively; a video run
    of ``grid_t * grid_h * grid_w`` tokens starting after text ending at position p gets
    (floor(t * t_factor), h, w) + p + 1; text after it resumes at max(positions so far) + 1
    (the original Qwen / vLLM rule; transformers 5.x ``get_rope_index`` resumes at
    p + 1 + max(grid_h, grid_w) instead, which differs when the temporal extent exceeds the
    spatial one). Returns ((3, num_tokens) int64, delta) with delta = max + 1 - num_tokens
    (decode position of the token at index n: n + delta).
    """
    parts: list[np.ndarray] = []
    st = 0
    nxt = 0  # next free position
    for offset, gt, gh, gw, t_factor in videos:
        text_len = offset - st
        if text_len < 0:
            raise ValueError("video runs overlap or are not sorted by offset")
        parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
        base = nxt + text_len
        grid = np.indices((gt, gh, gw)).reshape(3, -1)
        if t_factor != 1.0:
            grid[0] = (grid[0] * t_factor).astype(np.int64)
        parts.append(grid + base)
        nxt = base + (int(grid.max()) + 1 if grid.size else 0)
        st = offset + gt * gh * gw
    if st > num_tokens:
        raise ValueError("video runs extend past the prompt")
    text_len = num_tokens - st
    parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
    pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    delta = int(pos.max()) + 1 - num_tokens if pos.size else 0
    return torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)), delta


# ---------------------------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------------------------
@dataclass
class VideoSpan:
    """One video inside the pruned prompt.

    ``start``: row of its first visual token in the pruned prompt; ``input_stage``: the core's
    input-stage result (``kept_indices`` are the visual rows start..start+n-1 in order);
    ``extra``: tokens after the visual ones that belong to the run and are never pruned
    (LLaVA-OneVision's newline); ``grid``: (T, H', W').
    """

    start: int
    input_stage: InputStageResult
    extra: int
    grid: tuple[int, int, int]
    features: torch.Tensor  # (T, H', W', C) vision features before pruning

    @property
    def num_kept(self) -> int:
        return int(self.input_stage.kept_indices.numel())

    @property
    def end(self) -> int:
        """One past its last visual row (the newline, if any, sits at ``end``)."""
        return self.start + self.num_kept


@dataclass
class PreparedPrompt:
    """Everything before the LLM layers, for one prompt."""

    arch: str
    config: HieraVidConfig
    num_layers: int
    boundaries: list[int]
    prompt_token_ids: list[int]          # pruned prompt, as vLLM sees it
    unpruned_token_ids: list[int]        # the processor's expansion without pruning
    inputs_embeds: torch.Tensor          # (S, C) pruned prompt embeddings
    positions: torch.Tensor              # (3, S) M-RoPE or (1, S) 1-D positions
    next_position: int                   # position of the first decoded token (all 3 axes)
    videos: list[VideoSpan]
    unpruned_rows: torch.Tensor          # (S,) row of every pruned-prompt token in the unpruned prompt

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class GenerationResult:
    token_ids: list[int]
    logits: torch.Tensor                 # (n, V) float32, logits that produced each token
    text: str
    finish_reason: str                   # "stop" (EOS) or "length"


@dataclass
class ReferenceOutput:
    """Result of :meth:`HieraVidReference.forward`.

    ``prompt_logits`` (V,) float32 at the last prompt token; ``extra_logits`` (E, V) at every
    appended token (row k: after ``extra_token_ids[:k+1]``). ``kept_indices[v][i]``: flat
    indices into video v's T * H' * W' tokens seen by the layers of stage i (stage 0: the input
    stage's ``kept_indices``; stage i: those of stage i-1 subset by ``stage_keep[v][i-1]``).
    ``stage_keep[v][i-1]``: what :func:`select_layer_stage` returned at boundary i (positions
    into the previous stage's tokens; pass it back as ``keep=`` to hold the selection fixed).
    ``rows[i]``: alive rows (indices into prompt + extra) in stage i. With
    ``return_all_logits``: ``all_logits`` (len(rows[-1]), V) for every row alive at the end.
    ``return_boundary_states``: ``boundary_states[i-1]`` (len(rows[i-1]), C) float32, the
    residual stream entering boundary layer ``boundaries[i]`` (what the selection reads;
    HF's ``output_hidden_states[boundaries[i]]`` restricted to the alive rows).
    """

    prompt_token_ids: list[int]
    extra_token_ids: list[int]
    prompt_logits: torch.Tensor
    extra_logits: torch.Tensor
    kept_indices: list[list[torch.Tensor]]
    stage_keep: list[list[torch.Tensor]]
    counts: list[tuple[int, ...]]
    boundaries: list[int]
    positions: torch.Tensor
    rows: list[torch.Tensor]
    prepared: PreparedPrompt
    all_logits: Optional[torch.Tensor] = None
    boundary_states: Optional[list[torch.Tensor]] = None
    _runner: Any = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """(1 + E, V): the prompt's last-position logits then the appended tokens'."""
        return torch.cat([self.prompt_logits[None], self.extra_logits], dim=0)

    def generate(self, max_tokens: int, ignore_eos: bool = False) -> GenerationResult:
        """Greedy decoding from this prompt (selection of this forward held fixed)."""
        if self._runner is None:
            raise RuntimeError("this output is not attached to a HieraVidReference")
        return self._runner.generate(self.prepared, max_tokens, ignore_eos=ignore_eos,
                                     keep=self.stage_keep)


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------
def _as_list(x, n: int, name: str) -> list:
    if x is None or isinstance(x, (int, float)):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{name}: {len(x)} values for {n} videos")
    return x


class HieraVidReference:
    """transformers model + processor of ``model_dir`` with the HieraVid stages applied.

    ``dtype`` float32 by default (the oracle); ``attn_implementation`` "sdpa" or "eager".
    """

    def __init__(self, model_dir, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
        import transformers
        from transformers import AutoConfig, AutoProcessor

        self.model_dir = str(model_dir)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        archs = list(getattr(hf_config, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHS), None)
        if arch is None:
            raise ValueError(f"HieraVid reference: unsupported architecture {archs} in "
                             f"{self.model_dir}; supported: {', '.join(SUPPORTED_ARCHS)}")
        self.arch = arch
        self.is_qwen = arch in QWEN_ARCHS
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.model = getattr(transformers, arch).from_pretrained(
            self.model_dir, dtype=dtype, attn_implementation=attn_implementation)
        self.model.to(self.device).eval()
        self.config = self.model.config
        self.text_config = getattr(self.config, "text_config", None) or self.config
        self.lm = self.model.model.language_model
        if any(t != "full_attention" for t in (getattr(self.text_config, "layer_types", None)
                                               or [])):
            raise NotImplementedError("HieraVid reference: sliding-window layers are not supported")
        self.num_layers = int(self.text_config.num_hidden_layers)
        vid = getattr(self.config, "video_token_id", None)
        self.video_token_id = int(vid if vid is not None else self.config.video_token_index)
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else list(eos or []))

    # ---------------------------------------------------------------------------------------
    # prompt + vision features + input stage
    # ---------------------------------------------------------------------------------------
    def prompt_text(self, question: str, num_videos: int = 1) -> str:
        """The chat template with ``num_videos`` video parts then the question (one user turn,
        ``add_generation_prompt=True``; :func:`hieravid_vllm.testing.hf_reference.video_messages`
        for one video)."""
        content = [{"type": "video"} for _ in range(num_videos)]
        content.append({"type": "text", "text": question})
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def encode(self, videos: Sequence[np.ndarray], question: str,
               fps: Union[None, float, Sequence[Optional[float]]] = None) -> dict:
        """The HF processor's output for the prompt (unpruned placeholder runs).

        ``videos``: decoded RGB uint8 frames (T, H, W, 3) each, exactly the frames vLLM
        samples; ``fps``: their sampled frame rate (vLLM passes the loader's metadata: source
        fps with the sampled frame indices). None: no metadata (HF's default 24 fps).
        Only Qwen2.5-VL uses it (``second_per_grid_ts``).
        """
        from transformers.video_utils import VideoMetadata

        videos = [np.asarray(v) for v in videos]
        if not videos:
            raise ValueError("HieraVid reference: at least one video is required")
        for v in videos:
            if v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"video frames must be (T, H, W, 3), got {v.shape}")
        fps_l = _as_list(fps, len(videos), "fps")
        kwargs: dict = {"do_sample_frames": False}
        if any(f is not None for f in fps_l):
            if any(f is None for f in fps_l):
                raise ValueError("fps: give it for every video or for none")
            kwargs["video_metadata"] = [
                VideoMetadata(total_num_frames=int(v.shape[0]), fps=float(f),
                              frames_indices=list(range(int(v.shape[0]))))
                for v, f in zip(videos, fps_l)]
        text = self.prompt_text(question, len(videos))
        if self.is_qwen:
            return self.processor(text=[text], videos=videos, return_tensors="pt", **kwargs)
        # LLaVA-OneVision stacks the videos' frames: videos of different lengths only as lists
        enc = dict(self.processor(text=[text], videos=videos, **kwargs))
        out = {k: torch.as_tensor(np.asarray(enc[k])) for k in ("input_ids", "attention_mask")}
        pix = [torch.as_tensor(np.asarray(x)) for x in enc["pixel_values_videos"]]
        same = len({tuple(x.shape) for x in pix}) == 1
        out["pixel_values_videos"] = torch.stack(pix) if same else pix
        return out

    @torch.no_grad()
    def video_features(self, enc: dict) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Per video: (T, H', W', C) features and the never-pruned trailing token (LLaVA-OV's
        newline embedding, (1, C)) or None."""
        out = []
        if self.is_qwen:
            grid = enc["video_grid_thw"]
            pix = enc["pixel_values_videos"].to(self.device, self.dtype)
            feats = self.model.get_video_features(pixel_values_videos=pix, video_grid_thw=grid.to(
                self.device), return_dict=True).pooler_output
            m = int(self.config.vision_config.spatial_merge_size)
            for f, (t, h, w) in zip(feats, grid.tolist()):
                out.append((f.reshape(t, h // m, w // m, f.shape[-1]), None))
            return out
        vc = self.config.vision_config
        side = math.ceil((vc.image_size // vc.patch_size) / 2)
        for pix in enc["pixel_values_videos"]:              # (F, 3, H, W) per video
            emb = self.model.get_video_features(
                pixel_values_videos=pix[None].to(self.device, self.dtype),
                return_dict=True).pooler_output
            emb = emb.reshape(-1, emb.shape[-1])            # (F * side^2 + 1, C)
            frames = pix.shape[0]
            out.append((emb[:-1].reshape(frames, side, side, emb.shape[-1]), emb[-1:]))
        return out

    @torch.no_grad()
    def prepare(self, videos: Sequence[np.ndarray], question: str,
                config: Union[HieraVidConfig, dict, str, None] = None,
                fps: Union[None, float, Sequence[Optional[float]]] = None) -> PreparedPrompt:
        """Processor, vision features, input stage, pruned prompt and its positions."""
        cfg = HieraVidConfig.coerce(config)
        if cfg.mode != "full":
            raise ValueError("HieraVid reference: only mode='full' is supported (layer-level "
                             "stages); input_only needs the instruction at the input stage")
        L = self.num_layers
        bounds = cfg.stage_boundaries(L)
        enc = self.encode(videos, question, fps)
        ids = enc["input_ids"][0].tolist()
        feats = self.video_features(enc)
        # placeholder runs, in order: video v owns the next N_v + extra_v video tokens
        vpos = [i for i, t in enumerate(ids) if t == self.video_token_id]
        extra = 0 if self.is_qwen else 1
        runs = []
        k = 0
        for f, _ in feats:
            n = int(f.shape[0] * f.shape[1] * f.shape[2]) + extra
            if k + n > len(vpos) or vpos[k + n - 1] - vpos[k] != n - 1:
                raise ValueError("HieraVid reference: video placeholder runs do not match the "
                                 "vision features")
            runs.append(vpos[k])
            k += n
        if k != len(vpos):
            raise ValueError("HieraVid reference: more video placeholders than video features")
        # unpruned positions
        S0 = len(ids)
        if self.is_qwen:
            m = int(self.config.vision_config.spatial_merge_size)
            tps = float(getattr(self.config.vision_config, "tokens_per_second", 1.0) or 1.0)
            spg = enc.get("second_per_grid_ts")
            vids = []
            for v, ((f, _), off) in enumerate(zip(feats, runs)):
                t, h, w = (int(x) for x in enc["video_grid_thw"][v].tolist())
                t_factor = float(spg[v]) * tps if (spg is not None and
                                                   self.arch == QWEN_ARCHS[1]) else 1.0
                vids.append((off, t, h // m, w // m, t_factor))
            pos0, _delta = qwen_mrope_positions(S0, vids)
        # input stage per video and the pruned prompt
        rows: list[int] = []
        spans: list[VideoSpan] = []
        fill: list[tuple[int, torch.Tensor]] = []
        st = 0
        for (f, tail), off in zip(feats, runs):
            rows.extend(range(st, off))
            # as the plugin's prune_video: the features in the model's dtype
            res = prune_input_stage(f, None, cfg, num_layers=L)
            start = len(rows)
            rows.extend((off + res.kept_indices.cpu()).tolist())
            fill.append((start, res.features))
            n = int(f.shape[0] * f.shape[1] * f.shape[2])
            if tail is not None:
                fill.append((len(rows), tail))
                rows.append(off + n)
            spans.append(VideoSpan(start, res, extra, tuple(int(x) for x in f.shape[:3]),
                                   f.detach()))
            st = off + n + extra
        rows.extend(range(st, S0))
        rows_t = torch.tensor(rows, dtype=torch.long)
        pruned_ids = [ids[r] for r in rows]
        emb = self.lm.embed_tokens(torch.tensor(pruned_ids, device=self.device)).clone()
        for start, x in fill:
            emb[start:start + x.shape[0]] = x.to(emb.device, emb.dtype)
        S = len(pruned_ids)
        if self.is_qwen:
            positions = pos0[:, rows_t]
            next_pos = int(positions.max()) + 1
        else:
            positions = torch.arange(S, dtype=torch.long)[None]
            next_pos = S
        return PreparedPrompt(self.arch, cfg, L, bounds, pruned_ids, ids, emb, positions,
                              next_pos, spans, rows_t)

    # ---------------------------------------------------------------------------------------
    # LLM
    # ---------------------------------------------------------------------------------------
    def _rotary(self, h: torch.Tensor, positions: torch.Tensor):
        """cos/sin for (3, n) M-RoPE or (1, n) positions."""
        if self.is_qwen:
            pid = positions.to(self.device)[:, None, :]      # (3, 1, n)
        else:
            pid = positions.to(self.device)                  # (1, n)
        return self.lm.rotary_emb(h[None], pid)

    def _causal_mask(self, n: int) -> torch.Tensor:
        m = torch.full((n, n), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        return torch.triu(m, diagonal=1)[None, None]

    def _select(self, prep: PreparedPrompt, h: torch.Tensor, alive: torch.Tensor,
                vis_rows: list[torch.Tensor], segs: list[torch.Tensor], stage: int
                ) -> list[torch.Tensor]:
        """Boundary selection of every video (Sec. 3.3) on the stream ``h`` of ``alive`` rows."""
        last = prep.num_prompt_tokens - 1
        keeps = []
        for v, span in enumerate(prep.videos):
            sched = span.input_stage.schedule
            vp = torch.searchsorted(alive, vis_rows[v])
            qmask = (alive >= span.end) & (alive <= last)
            if not bool(qmask.any()):
                raise ValueError(f"video {v}: no prompt token after it to score relevance against")
            query = h[qmask.to(h.device)].float()
            keep = select_layer_stage(h[vp.to(h.device)].float(), query, segs[v].to(h.device),
                                      target=int(sched.counts[stage]), config=prep.config,
                                      use_dpp=bool(sched.uses_dpp[stage]),
                                      num_segments=span.input_stage.num_segments)
            keeps.append(keep.to("cpu", torch.long))
        return keeps

    @torch.no_grad()
    def _run(self, prep: PreparedPrompt, extra_token_ids: Sequence[int],
             keep: Optional[Sequence[Sequence[torch.Tensor]]], cache=None,
             boundary_states: Optional[list] = None):
        """The staged forward over prompt + extra tokens. Returns (final hidden (n, C) after
        the norm, alive rows per stage, stage_keep, kept flat indices, positions).
        ``boundary_states``: a list that receives, per boundary i >= 1, the residual stream
        entering that layer (rows ``rows[i-1]``, float32, CPU) before the selection."""
        extra = [int(t) for t in extra_token_ids]
        S = prep.num_prompt_tokens
        E = len(extra)
        emb = prep.inputs_embeds
        if E:
            emb = torch.cat([emb, self.lm.embed_tokens(torch.tensor(extra, device=self.device))])
        ext_pos = torch.arange(E, dtype=torch.long) + prep.next_position
        positions = torch.cat([prep.positions, ext_pos[None].expand(prep.positions.shape[0], E)],
                              dim=1)
        alive = torch.arange(S + E, dtype=torch.long)
        vis_rows = [torch.arange(s.start, s.end, dtype=torch.long) for s in prep.videos]
        segs = [s.input_stage.segment_ids.to("cpu", torch.long) for s in prep.videos]
        flat = [[s.input_stage.kept_indices.to("cpu", torch.long)] for s in prep.videos]
        stage_keep: list[list[torch.Tensor]] = [[] for _ in prep.videos]
        rows = [alive]
        h = emb.to(self.dtype)
        cos, sin = self._rotary(h, positions)
        mask = self._causal_mask(S + E)
        bounds = prep.boundaries
        for layer_idx, layer in enumerate(self.lm.layers):
            if layer_idx in bounds[1:]:
                stage = bounds.index(layer_idx)
                if boundary_states is not None:
                    boundary_states.append(h.detach().float().cpu())
                if keep is not None:
                    keeps = [torch.as_tensor(keep[v][stage - 1], dtype=torch.long)
                             for v in range(len(prep.videos))]
                else:
                    keeps = self._select(prep, h, alive, vis_rows, segs, stage)
                dead = torch.zeros(S + E, dtype=torch.bool)
                for v, kv in enumerate(keeps):
                    want = int(prep.videos[v].input_stage.schedule.counts[stage])
                    if kv.numel() != want:
                        raise ValueError(f"video {v} stage {stage}: {kv.numel()} kept, the "
                                         f"schedule says {want}")
                    gone = torch.ones(vis_rows[v].numel(), dtype=torch.bool)
                    gone[kv] = False
                    dead[vis_rows[v][gone]] = True
                    vis_rows[v] = vis_rows[v][kv]
                    segs[v] = segs[v][kv]
                    flat[v].append(flat[v][-1][kv])
                    stage_keep[v].append(kv)
                sel = ~dead[alive]
                alive = alive[sel]
                idx = torch.nonzero(sel).flatten().to(self.device)
                h = h[idx]
                cos, sin = cos[:, idx], sin[:, idx]
                mask = self._causal_mask(alive.numel())
                rows.append(alive)
            h = layer(h[None], attention_mask=mask, position_embeddings=(cos, sin),
                      past_key_values=cache, use_cache=cache is not None)
            if isinstance(h, tuple):
                h = h[0]
            h = h[0]
        h = self.lm.norm(h)
        return h, rows, stage_keep, flat, positions

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()

    @torch.no_grad()
    def forward(self, videos: Union[Sequence[np.ndarray], PreparedPrompt],
                question: Optional[str] = None,
                config: Union[HieraVidConfig, dict, str, None] = None,
                extra_token_ids: Sequence[int] = (),
                fps: Union[None, float, Sequence[Optional[float]]] = None,
                keep: Optional[Sequence[Sequence[torch.Tensor]]] = None,
                return_all_logits: bool = False,
                return_boundary_states: bool = False) -> ReferenceOutput:
        """Staged forward of ``[videos, question]`` (+ ``extra_token_ids``).

        ``videos`` may be a :class:`PreparedPrompt` from :meth:`prepare` (then ``question``,
        ``config`` and ``fps`` are ignored). ``keep``: hold the layer-level selections fixed
        (``ReferenceOutput.stage_keep`` of an earlier forward) instead of selecting.
        """
        prep = videos if isinstance(videos, PreparedPrompt) else \
            self.prepare(videos, question, config, fps)
        states: Optional[list] = [] if return_boundary_states else None
        h, rows, stage_keep, flat, positions = self._run(prep, extra_token_ids, keep,
                                                         boundary_states=states)
        S = prep.num_prompt_tokens
        final = rows[-1]
        # the last prompt row and every extra row are text: alive to the end
        tail = torch.searchsorted(final, torch.arange(S - 1, S + len(extra_token_ids)))
        logits = self._logits(h[tail.to(h.device)]).cpu()
        all_logits = self._logits(h).cpu() if return_all_logits else None
        return ReferenceOutput(
            prompt_token_ids=list(prep.prompt_token_ids),
            extra_token_ids=[int(t) for t in extra_token_ids],
            prompt_logits=logits[0], extra_logits=logits[1:],
            kept_indices=flat, stage_keep=stage_keep,
            counts=[tuple(s.input_stage.schedule.counts) for s in prep.videos],
            boundaries=list(prep.boundaries), positions=positions, rows=rows,
            prepared=prep, all_logits=all_logits, boundary_states=states, _runner=self)

    @torch.no_grad()
    def generate(self, prepared: PreparedPrompt, max_tokens: int, ignore_eos: bool = False,
                 keep: Optional[Sequence[Sequence[torch.Tensor]]] = None) -> GenerationResult:
        """Greedy decoding with a per-layer KV cache (each layer caches the tokens of its
        stage only). ``keep``: hold the selection fixed (default: select on the prompt)."""
        from transformers.cache_utils import DynamicCache

        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        cache = DynamicCache(config=self.text_config)
        h, rows, stage_keep, _flat, _pos = self._run(prepared, (), keep, cache=cache)
        logits = self._logits(h[-1:])[0]
        out_ids: list[int] = []
        out_logits = [logits]
        finish = "length"
        pos = prepared.next_position
        n_axes = prepared.positions.shape[0]
        while True:
            tok = int(torch.argmax(logits))
            out_ids.append(tok)
            if not ignore_eos and tok in self.eos_token_ids:
                finish = "stop"
                break
            if len(out_ids) >= max_tokens:
                break
            x = self.lm.embed_tokens(torch.tensor([tok], device=self.device)).to(self.dtype)
            cos, sin = self._rotary(x, torch.full((n_axes, 1), pos, dtype=torch.long))
            pos += 1
            for layer in self.lm.layers:
                x = layer(x[None], attention_mask=None, position_embeddings=(cos, sin),
                          past_key_values=cache, use_cache=True)
                x = (x[0] if isinstance(x, tuple) else x)[0]
            logits = self._logits(self.lm.norm(x))[0]
            out_logits.append(logits)
        text = self.processor.tokenizer.decode(out_ids, skip_special_tokens=True)
        return GenerationResult(out_ids, torch.stack(out_logits[:len(out_ids)]).cpu(), text,
                                finish)


_RUNNERS: dict = {}


def reference_forward(model_dir, videos: Sequence[np.ndarray], question: str,
                      config: Union[HieraVidConfig, dict, str, None] = None,
                      extra_token_ids: Sequence[int] = (),
                      fps: Union[None, float, Sequence[Optional[float]]] = None,
                      **kwargs) -> ReferenceOutput:
    """One-call form of :meth:`HieraVidReference.forward` (the loaded model is cached per
    directory)."""
    key = str(model_dir)
    if key not in _RUNNERS:
        _RUNNERS[key] = HieraVidReference(model_dir)
    return _RUNNERS[key].forward(videos, question, config, extra_token_ids, fps, **kwargs)
