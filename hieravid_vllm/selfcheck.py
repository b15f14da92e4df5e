"""Operator acceptance check: run it on the serving node before taking traffic.

    python -m hieravid_vllm.selfcheck --model /models/Qwen2.5-VL-7B-Instruct \\
        [--tensor-parallel-size 2] [--budget 0.3] [extra vLLM flags ...]

It writes its own synthetic test clips, starts the vLLM OpenAI servers it needs on
127.0.0.1 with the given checkpoint (one at a time, each stopped before the next), loads the
transformers reference forward (:mod:`hieravid_vllm.reference`) of the same checkpoint after
the last server stopped, and prints one PASS / FAIL / SKIP / INFO row per check. The exit code
is 1 when any row is FAIL (0 otherwise; SKIP and INFO rows never fail).

How the server is compared with the reference (greedy DPP is discontinuous: two correct
forwards that differ by float noise can keep different tokens, so kept indices are never
compared exactly across precisions, kernels or backends). Every HieraVid server runs with
``HIERAVID_DEBUG_DIR``, so its workers dump what each selection saw and chose, and two things
are checked apart:

(b) the server's selection given the states it selected on: the core
    (:func:`~hieravid_vllm.core.pipeline.prune_input_stage` on the dumped vision features,
    :func:`~hieravid_vllm.core.pipeline.select_layer_stage` on the dumped residual stream at
    every stage boundary), run the way the server runs it (its dtype, its device, the kernel
    dispatch ``hieravid_kernels.OPS``), must choose exactly the dumped tokens;
(a) the computation given the server's selections: the reference forward in the server's
    dtype with every selection held to the server's -- the input stage's static-token merge
    and segments (the reference merges its own vision features with the server's static
    mask and frame segments), and the kept tokens of every later stage (``keep=``) -- must
    give first-token logprobs equal to the server's within the stated tolerance
    (``--logprob-atol``; default 2e-3 in float32, 0.25 nats in bfloat16, 0.1 in float16).

Checks (``--only`` / ``--skip`` take these names):

setup       runner and attention backend every worker runs (its ``worker-*.json`` dump) are
            ones HieraVid hooks, and the layer-level stages are on (full mode)
logits      (a) and (b) above on two clips (one and two scenes)
greedy      16 requests (8 video, 8 text-only): greedy answers alone == all 16 at once ==
            the video ones again with the prefix cache warm
preemption  a second server with a KV cache of about one request: 5 requests alone, then
            10 at once (sent again, at most 3 times in all, until vLLM has preempted);
            vLLM must preempt, and every answer must equal the alone one
kv          KV blocks a video request holds right after prefill (``/metrics``) vs the core
            schedule on the clip's grid (one KV cache group per stage)
timing      TTFT and engine prefill time vs an unpruned server, as ratios (INFO unless
            ``--max-time-ratio`` is given)
backend     (a) and (b) on a server with a second attention backend (CUDA only)
tp          (a) and (b) on a server with the other tensor-parallel size (TP 2 vs 1; needs
            two visible GPUs); its ranks must select alike; kept indices vs the first
            server are reported, not required equal

Greedy answers are compared token by token; in float32 they must be identical, in
bfloat16/float16 a divergence is accepted only at a near-tie (the alone run's logprob of the
other run's token within the tolerance of its own pick), because vLLM's GPU kernels are not
batch-invariant.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
CHECKS = ("setup", "logits", "greedy", "preemption", "kv", "timing", "backend", "tp")
#: default ``--logprob-atol`` per server dtype (nats, on the server's top-k first-token
#: logprobs); float32 as the engine tests use, the half-precision ones a first estimate
LOGPROB_ATOL = {"float32": 2e-3, "bfloat16": 0.25, "float16": 0.1}
TOP = 20
FPS = 8.0
QUESTION = "What happens in this video, and which shapes move first?"
QUESTIONS = (QUESTION, "Describe it.", "How many scenes are there?", "What color is the "
             "background?")
GREEDY_TOKENS = 12
PREEMPT_TOKENS = 128
TIMING_TOKENS = 32
#: attention backends tried as the second one on CUDA, in order
SECOND_BACKENDS = ("TRITON_ATTN", "FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION")


@dataclass
class Row:
    name: str
    status: str
    detail: str = ""


@dataclass
class ServerRun:
    """What one server phase collected (evaluated after every server has stopped)."""

    name: str
    dump_dir: Path
    ok: bool = False
    error: str = ""
    log: str = ""
    logits: list = field(default_factory=list)  # per clip: dict(clip, prompt_tokens, top, dumps)
    workers: list = field(default_factory=list)  # worker-*.json dicts


# -----------------------------------------------------------------------------------------
# arguments
# -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hieravid_vllm.selfcheck",
        description="HieraVid acceptance check: starts vLLM servers on 127.0.0.1 with the "
                    "given checkpoint, compares them with the transformers reference forward "
                    "and prints a PASS/FAIL table (exit 1 on any FAIL). Unknown flags are "
                    "passed to every vLLM server.",
        epilog="checks: " + ", ".join(CHECKS))
    p.add_argument("--model", required=True, help="checkpoint directory (or hub id) to serve")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="TP size of the servers (default %(default)s)")
    p.add_argument("--budget", type=float, default=0.3, help="--hieravid-budget (default 0.3)")
    p.add_argument("--dtype", default=None,
                   help="server and reference dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache of the servers (default on CPU: room for 4 prompts of "
                        "max(max-model-len, max-num-batched-tokens); on CUDA vLLM's share)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default 4096 on CPU, 8192 on CUDA")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default 2048 on CPU, 16384 on CUDA")
    p.add_argument("--keep-dumps", metavar="DIR", default=None,
                   help="write clips, server logs and debug dumps here and keep them (default: "
                        "a temporary folder, kept only when a check fails)")
    p.add_argument("--logprob-atol", type=float, default=None,
                   help="tolerance on first-token logprobs, nats (default: 2e-3 float32, 0.25 "
                        "bfloat16, 0.1 float16)")
    p.add_argument("--max-time-ratio", type=float, default=None,
                   help="make the timing rows checks: HieraVid/unpruned TTFT and prefill "
                        "medians must be at most this (default: reported only, INFO)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per test clip (default 24 on CPU, 32 on CUDA)")
    p.add_argument("--size", type=int, default=None,
                   help="test clip width = height in px, a multiple of 28 (default 112 on CPU, "
                        "336 on CUDA)")
    p.add_argument("--second-backend", default=None,
                   help="attention backend of the 'backend' check (default: the first of "
                        f"{', '.join(SECOND_BACKENDS)} that is not in use)")
    p.add_argument("--only", action="append", default=[], choices=CHECKS, metavar="CHECK",
                   help="run only these checks (repeatable)")
    p.add_argument("--skip", action="append", default=[], choices=CHECKS, metavar="CHECK",
                   help="skip these checks (repeatable)")
    p.add_argument("--reference-model", default=None,
                   help="checkpoint the reference forward loads (default: --model; another one "
                        "is for testing the check itself: it must then fail)")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    return p


def _parse_args(argv):
    p = build_parser()
    args, vllm_args = p.parse_known_args(argv)
    args.vllm_args = vllm_args
    if args.size is not None and args.size % 28:
        p.error("--size must be a multiple of 28")
    return args


def _cuda():
    from hieravid_vllm.testing.server import _cuda_available

    return _cuda_available()


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def _torch_dtype(name: str, model: str):
    import torch

    if name == "auto":
        try:
            cfg = json.loads((Path(model) / "config.json").read_text())
            text = cfg.get("text_config") or {}
            name = str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype")
                       or cfg.get("dtype") or "bfloat16")
        except (OSError, ValueError):
            name = "bfloat16"
    name = {"float": "float32", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    return name, getattr(torch, name)


# -----------------------------------------------------------------------------------------
# talking to a server
# -----------------------------------------------------------------------------------------
def _token_id(tok: str) -> int:
    if not tok.startswith("token_id:"):
        raise ValueError(f"expected a token_id:N token (return_tokens_as_token_ids), got {tok!r}")
    return int(tok.split(":", 1)[1])


#: system prompt of the greedy checks: long enough (several KV blocks on every platform)
#: that the text before the video is served from the prefix cache when asked again
SYSTEM_PROMPT = " ".join(
    ["You are a careful assistant that watches videos and answers questions about them."] +
    [f"Rule {i}: describe what is visible, in order, without guessing what is not shown."
     for i in range(1, 9)])


def _messages(video: Optional[Path], question: str, system: bool = False) -> list:
    from hieravid_vllm.testing.server import chat_messages, video_messages

    msgs = chat_messages(question) if video is None else video_messages(video, question)
    return ([{"role": "system", "content": SYSTEM_PROMPT}] if system else []) + msgs


def greedy_answer(server, video: Optional[Path], question: str, max_tokens: int,
                  ignore_eos: bool = False, system: bool = False) -> dict:
    """Greedy answer as token ids with the top-2 logprobs at every position."""
    from hieravid_vllm.testing.server import chat

    r = chat(server, _messages(video, question, system), max_tokens=max_tokens, logprobs=True,
             top_logprobs=2, extra_body={"return_tokens_as_token_ids": True,
                                         "ignore_eos": ignore_eos})
    steps = []
    for c in r.choices[0].logprobs.content or []:
        steps.append((_token_id(c.token), {_token_id(t.token): t.logprob
                                           for t in c.top_logprobs}))
    return {"ids": [s[0] for s in steps], "tops": [s[1] for s in steps],
            "text": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens}


def same_greedy(alone: dict, other: dict, tie: float) -> tuple[bool, str]:
    """``other``'s answer equals ``alone``'s token by token; a divergence is accepted only at a
    near-tie of the alone run (its logprob of the other run's token within ``tie`` of its own
    pick: float noise between batch shapes, not a wrong forward)."""
    if alone["prompt_tokens"] != other["prompt_tokens"]:
        return False, f"prompt tokens {other['prompt_tokens']} vs {alone['prompt_tokens']} alone"
    for k, (a, b) in enumerate(zip(alone["ids"], other["ids"])):
        if a != b:
            tops = alone["tops"][k]
            gap = tops.get(a, math.inf) - tops.get(b, -math.inf)
            if gap <= tie:
                return True, f"near-tie at token {k} (gap {gap:.3g})"
            return False, f"token {k}: {b} vs {a} alone (logprob gap {gap:.3g} > {tie:g})"
    if len(alone["ids"]) != len(other["ids"]):
        return False, f"{len(other['ids'])} vs {len(alone['ids'])} tokens alone"
    return True, ""


def _dump_files(folder: Path, prefix: str, suffix: str = ".pt") -> set:
    return {p.name for p in folder.glob(f"{prefix}-*{suffix}")}


def collect_logits(server, run: ServerRun, clips: Sequence[Path]) -> None:
    """One first-token request per (fresh) clip; the dumps it left behind."""
    from hieravid_vllm.stages import STAGES_DUMP_PREFIX
    from hieravid_vllm.testing.server import chat

    for clip in clips:
        st0 = _dump_files(run.dump_dir, STAGES_DUMP_PREFIX)
        vd0 = _dump_files(run.dump_dir, "video")
        r = chat(server, _messages(clip, QUESTION), max_tokens=1, logprobs=True,
                 top_logprobs=TOP, extra_body={"return_tokens_as_token_ids": True})
        tops = r.choices[0].logprobs.content[0].top_logprobs
        run.logits.append({
            "clip": clip, "prompt_tokens": r.usage.prompt_tokens,
            "top": [(_token_id(t.token), float(t.logprob)) for t in tops],
            "stage_dumps": sorted(_dump_files(run.dump_dir, STAGES_DUMP_PREFIX) - st0),
            "video_dumps": sorted(_dump_files(run.dump_dir, "video") - vd0)})


def read_workers(folder: Path) -> list:
    from hieravid_vllm.engine_setup import WORKER_DUMP_PREFIX

    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{WORKER_DUMP_PREFIX}-*.json"))]


# -----------------------------------------------------------------------------------------
# (b): the server's selections given its own states
# -----------------------------------------------------------------------------------------
def _ops_device():
    return "cuda" if _cuda() else "cpu"


def check_selections(video_dump: dict, stage_dump: dict, dtype) -> tuple[bool, str, dict]:
    """Re-run the core on what the server dumped, the way the server runs it. Returns
    (ok, detail, held) with ``held`` the input stage's static mask and frame segments."""
    import torch
    from hieravid_kernels import OPS

    from hieravid_vllm.core import HieraVidConfig
    from hieravid_vllm.core.pipeline import prune_input_stage, select_layer_stage

    dev = _ops_device()
    held: dict = {}

    def merge(F, static, fseg, num_kept):
        held["static"], held["fseg"] = static.detach().cpu(), fseg.detach().cpu()
        return OPS.merge_static_tokens(F, static, fseg, num_kept=num_kept)

    ops = types.SimpleNamespace(similarity_map=OPS.similarity_map, merge_static_tokens=merge,
                                frame_level_select=OPS.frame_level_select)
    cfg = HieraVidConfig.model_validate(video_dump["config"])
    feats = video_dump["features"].to(dev, dtype)
    res = prune_input_stage(feats, None, cfg, num_layers=int(video_dump["num_layers"]), ops=ops)
    stages = [s.long().cpu() for s in stage_dump["stages"]]
    bad = []
    if not torch.equal(res.kept_indices.cpu().long(), video_dump["kept_indices"].long()):
        bad.append("input stage (core on the dumped features)")
    if not torch.equal(stages[0], video_dump["kept_indices"].long()):
        bad.append("input stage (stage dump vs input dump)")
    for g, d in enumerate(stage_dump["boundaries"], start=1):
        keep = select_layer_stage(d["hidden_visual"].to(dev), d["query"].to(dev),
                                  d["segment_ids"].to(dev), d["target"],
                                  HieraVidConfig.model_validate(d["config"]),
                                  use_dpp=d["use_dpp"], num_segments=d["num_segments"], ops=OPS)
        if not torch.equal(stages[g - 1][keep.cpu().long()], stages[g]):
            bad.append(f"stage {g}")
    counts = "/".join(str(len(s)) for s in stages)
    if bad:
        return False, f"differs at {', '.join(bad)} (kept {counts})", held
    return True, f"kept {counts}", held


# -----------------------------------------------------------------------------------------
# (a): the reference given the server's selections
# -----------------------------------------------------------------------------------------
def held_prepare(ref, frames, question: str, cfg, held: dict):
    """The reference's prompt with its input stage held to the server's: the reference's own
    vision features merged with the server's static mask and frame segments."""
    from unittest import mock

    import hieravid_vllm.reference as reference_mod
    from hieravid_vllm.core.pipeline import REFERENCE_OPS, prune_input_stage
    from hieravid_vllm.core.segment import merge_static_tokens

    def merge(F, _static, _fseg, num_kept):
        return merge_static_tokens(F, held["static"].to(F.device), held["fseg"].to(F.device),
                                   num_kept=num_kept)

    ops = types.SimpleNamespace(similarity_map=REFERENCE_OPS.similarity_map,
                                merge_static_tokens=merge,
                                frame_level_select=REFERENCE_OPS.frame_level_select)

    def held_input_stage(features, instruction, config, num_layers):
        return prune_input_stage(features, instruction, config, num_layers=num_layers, ops=ops)

    with mock.patch.object(reference_mod, "prune_input_stage", held_input_stage):
        return ref.prepare([frames], question, cfg, fps=FPS)


def stage_keep_from_dump(stages) -> list:
    """The server's flat kept indices per stage -> the reference's ``keep`` format: per
    boundary, positions into the previous stage's tokens."""
    import torch

    out = []
    for g in range(1, len(stages)):
        where = {int(x): i for i, x in enumerate(stages[g - 1].tolist())}
        out.append(torch.tensor([where[int(x)] for x in stages[g].tolist()], dtype=torch.long))
    return out


def check_logits(ref, rec: dict, video_dump: dict, stage_dump: dict, held: dict,
                 atol: float) -> tuple[bool, str, float]:
    """(a) for one clip. Returns (ok, detail, max |d logprob|)."""
    import torch

    from hieravid_vllm.core import HieraVidConfig
    from hieravid_vllm.testing.video import read_video_frames

    cfg = HieraVidConfig.model_validate(video_dump["config"])
    stages = [s.long().cpu() for s in stage_dump["stages"]]
    prep = held_prepare(ref, read_video_frames(rec["clip"]), QUESTION, cfg, held)
    out = ref.forward(prep, keep=[stage_keep_from_dump(stages)], return_boundary_states=True)
    if not all(torch.equal(a.long().cpu(), b) for a, b in zip(out.kept_indices[0], stages)):
        return False, "the reference could not be held to the server's selections", math.inf
    if len(out.prompt_token_ids) != rec["prompt_tokens"]:
        return False, (f"prompt tokens {rec['prompt_tokens']} served vs "
                       f"{len(out.prompt_token_ids)} reference"), math.inf
    logp = torch.log_softmax(out.prompt_logits.double(), dim=-1)
    diff = max(abs(lp - float(logp[tid])) for tid, lp in rec["top"])
    top1, ref1 = rec["top"][0][0], int(torch.argmax(logp))
    same_top = top1 == ref1 or float(logp[ref1] - logp[top1]) <= atol
    # where the streams part (diagnostic): relative error of the boundary states
    errs = []
    video = prep.videos[0]
    last = prep.num_prompt_tokens - 1
    for g, d in enumerate(stage_dump["boundaries"], start=1):
        rows = out.rows[g - 1]
        vis = (rows >= video.start) & (rows < video.end)
        ref_hv = out.boundary_states[g - 1][vis]
        ref_q = out.boundary_states[g - 1][rows == last][-1]
        if ref_hv.shape == d["hidden_visual"].shape:
            errs.append(float((d["hidden_visual"] - ref_hv).norm() / ref_hv.norm().clamp_min(1e-12)))
        errs.append(float((d["query"][-1] - ref_q).norm() / ref_q.norm().clamp_min(1e-12)))
    ok = diff <= atol and same_top
    detail = (f"max |d logprob| {diff:.2g} over top-{len(rec['top'])}"
              + ("" if same_top else f", top-1 {top1} vs reference {ref1}")
              + (f", boundary states rel. err <= {max(errs):.1g}" if errs else ""))
    return ok, detail, diff


def evaluate_logits(ref, run: ServerRun, atol: float, dtype) -> list:
    """Rows (b) and (a) of one server (all its clips; every TP rank's dumps)."""
    import torch

    name = run.name
    rows_b, rows_a = [], []
    ok_b = ok_a = True
    worst = 0.0
    for rec in run.logits:
        tag = rec["clip"].stem
        vds = [torch.load(run.dump_dir / f) for f in rec["video_dumps"]]
        sds = [torch.load(run.dump_dir / f) for f in rec["stage_dumps"]]
        if not vds or not sds:
            ok_b = ok_a = False
            msg = (f"{tag}: no debug dumps ({len(vds)} input, {len(sds)} stage): "
                   f"HIERAVID_DEBUG_DIR not honoured, full mode off, or the video was cached")
            rows_b.append(msg)
            rows_a.append(msg)
            continue
        # every rank of a TP group selects alike
        agree = all(torch.equal(v["kept_indices"], vds[0]["kept_indices"]) for v in vds) and \
            all(len(s["stages"]) == len(sds[0]["stages"]) and
                all(torch.equal(a, b) for a, b in zip(s["stages"], sds[0]["stages"]))
                for s in sds)
        if not agree:
            ok_b = False
            rows_b.append(f"{tag}: the {len(sds)} TP ranks kept different tokens")
        good, detail, held = check_selections(vds[0], sds[0], dtype)
        ok_b &= good
        rows_b.append(f"{tag}: {detail}" + (f" ({len(sds)} ranks alike)" if len(sds) > 1
                                            and agree else ""))
        try:
            good, detail, diff = check_logits(ref, rec, vds[0], sds[0], held, atol)
        except Exception as exc:  # noqa: BLE001 - reported as the row's failure
            good, detail, diff = False, f"reference failed: {type(exc).__name__}: {exc}", math.inf
        worst = max(worst, diff)
        ok_a &= good
        rows_a.append(f"{tag}: {detail}")
    return [
        Row(f"{name}: selections == core on the server's own states (b)",
            PASS if ok_b else FAIL, "; ".join(rows_b)),
        Row(f"{name}: first-token logprobs vs reference, given the server's selections (a), "
            f"tol {atol:g}", PASS if ok_a else FAIL, "; ".join(rows_a)),
    ]


# -----------------------------------------------------------------------------------------
# the check
# -----------------------------------------------------------------------------------------
class SelfCheck:
    def __init__(self, args):
        self.args = args
        self.cuda = _cuda()
        self.gpus = _gpu_count()
        self.dtype_name, self.dtype = _torch_dtype(
            args.dtype or ("bfloat16" if self.cuda else "float32"), args.model)
        self.atol = args.logprob_atol if args.logprob_atol is not None else \
            LOGPROB_ATOL.get(self.dtype_name, 0.25)
        self.tie = 0.0 if self.dtype_name == "float32" else self.atol
        checks = set(args.only or CHECKS) - set(args.skip)
        self.checks = [c for c in CHECKS if c in checks]
        self.keep = args.keep_dumps is not None
        self.work = Path(args.keep_dumps) if self.keep else \
            Path(tempfile.mkdtemp(prefix="hieravid-selfcheck-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.runs: dict[str, ServerRun] = {}
        self.frames = args.frames or (32 if self.cuda else 24)
        self.size = args.size or (336 if self.cuda else 112)
        self.mml = args.max_model_len or (8192 if self.cuda else 4096)
        self.mnbt = args.max_num_batched_tokens or (16384 if self.cuda else 2048)
        self.greedy: dict = {}
        self.timing: dict = {}
        self.kv: dict = {}
        self._ref = None

    # -- helpers ----------------------------------------------------------------------------
    def want(self, *names) -> bool:
        return any(n in self.checks for n in names)

    def add(self, name, status, detail=""):
        self.rows.append(Row(name, status, detail))

    def clip(self, name: str, seed: int, scenes: int = 1) -> Path:
        from hieravid_vllm.testing.video import write_scene_video

        path = self.work / "clips" / f"{name}.mp4"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_scene_video(path, num_frames=self.frames, width=self.size, height=self.size,
                              fps=FPS, num_scenes=scenes, seed=seed)
        return path

    def server(self, name: str, extra: Sequence[str] = (), hieravid: bool = True,
               tp: Optional[int] = None, **kw):
        from hieravid_vllm.testing.server import VLLMServer

        dump_dir = self.work / "dumps" / name
        dump_dir.mkdir(parents=True, exist_ok=True)
        args = list(extra)
        if hieravid:
            args = ["--hieravid-budget", str(self.args.budget), *args]
        tp = tp or self.args.tensor_parallel_size
        if tp != 1:
            args += ["--tensor-parallel-size", str(tp)]
        args += ["--max-logprobs", str(TOP), *self.args.vllm_args]
        kw.setdefault("kv_cache_memory_bytes", self.args.kv_cache_memory_bytes)
        kw.setdefault("max_model_len", self.mml)
        kw.setdefault("max_num_batched_tokens", self.mnbt)
        srv = VLLMServer(self.args.model, extra_args=args, port=self.args.port,
                         dtype=self.dtype_name, video_fps=FPS,
                         env={"HIERAVID_DEBUG_DIR": str(dump_dir)},
                         log_path=self.work / "logs" / f"{name}.log",
                         startup_timeout=self.args.startup_timeout, **kw)
        run = ServerRun(name, dump_dir, log=str(srv.log_path))
        self.runs[name] = run
        return srv, run

    def phase(self, run: ServerRun, srv, body: Callable, fail_rows: Sequence[str]) -> bool:
        """Start ``srv``, run ``body(srv)``, stop it; a failure becomes FAIL rows."""
        from hieravid_vllm.testing.server import root_cause

        t0 = time.perf_counter()
        print(f"[selfcheck] {run.name}: starting vLLM (log {run.log})", flush=True)
        try:
            with srv:
                print(f"[selfcheck] {run.name}: ready after {time.perf_counter() - t0:.0f} s",
                      flush=True)
                body(srv)
                run.workers = read_workers(run.dump_dir)
            run.ok = True
        except Exception as exc:  # noqa: BLE001 - the row says why
            run.error = root_cause(f"{type(exc).__name__}: {exc}", srv.log_path)
            for name in fail_rows:
                self.add(name, FAIL, f"{run.error} (log {run.log})")
        print(f"[selfcheck] {run.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        return run.ok

    def reference(self):
        if self._ref is None:
            from hieravid_vllm.reference import HieraVidReference

            t0 = time.perf_counter()
            self._ref = HieraVidReference(self.args.reference_model or self.args.model,
                                          device="cuda" if self.cuda else "cpu",
                                          dtype=self.dtype)
            print(f"[selfcheck] reference loaded in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        return self._ref

    # -- phases -----------------------------------------------------------------------------
    def run_main(self):
        """The HieraVid server as configured: setup, logits, greedy, kv, timing."""
        names = [n for n in ("setup", "logits", "greedy", "kv", "timing") if self.want(n)]
        if not names:
            return
        clips = [self.clip("a", 5, 1), self.clip("b", 6, 2)]
        srv, run = self.server("hieravid", ["--max-num-seqs", "16"])

        def body(s):
            if self.want("logits"):
                collect_logits(s, run, clips)
            if self.want("greedy"):
                self.greedy_phase(s, clips + [self.clip("c", 7, 3)])
            if self.want("kv", "timing"):
                self.timing["hieravid"] = self.stream_phase(s, run)

        self.phase(run, srv, body, [f"main server ({', '.join(names)})"])

    def greedy_phase(self, s, clips):
        jobs = []
        for i in range(16):
            if i % 2 == 0:
                jobs.append((clips[(i // 2) % len(clips)], QUESTIONS[(i // 2) % len(QUESTIONS)]))
            else:
                jobs.append((None, f"Tell me a short story number {i}."))
        run = lambda job: greedy_answer(s, job[0], job[1], GREEDY_TOKENS,  # noqa: E731
                                        system=True)
        alone = [run(j) for j in jobs]
        with cf.ThreadPoolExecutor(16) as ex:
            batched = list(ex.map(run, jobs))
        hits0 = s.metric("vllm:prefix_cache_hits_total")
        video_jobs = [k for k, j in enumerate(jobs) if j[0] is not None]
        warm = {k: run(jobs[k]) for k in video_jobs}
        hits = s.metric("vllm:prefix_cache_hits_total") - hits0
        self.greedy = {"jobs": jobs, "alone": alone, "batched": batched, "warm": warm,
                       "prefix_hits": hits}

    def stream_phase(self, s, run: ServerRun) -> dict:
        """1 warm-up + 3 measured streamed requests on fresh clips (demo's measurement)."""
        from hieravid_vllm.demo import (RequestResult, RunResult, ServerConfig,
                                        _stream_request, cache_config_labels)
        from hieravid_vllm.testing.video import video_data_url

        rr = RunResult(config=ServerConfig(run.name))
        labels = cache_config_labels(s.metrics_text())
        rr.num_gpu_blocks = int(labels.get("num_gpu_blocks") or 0) or None
        rr.block_size = int(labels.get("block_size") or 0) or None
        out = {"requests": [], "block_size": rr.block_size, "num_gpu_blocks": rr.num_gpu_blocks}
        for i in range(4):
            clip = self.clip(f"t{i}", 100 + i, 2)
            res = RequestResult(clip=i, warmup=i == 0)
            _stream_request(s, video_data_url(clip), QUESTION, TIMING_TOKENS, rr, res)
            if i:
                out["requests"].append({"clip": clip, "ttft": res.ttft_s,
                                        "prefill": res.prefill_s, "kv_blocks": res.kv_blocks,
                                        "prompt_tokens": res.prompt_tokens})
        return out

    def run_preemption(self):
        if not self.want("preemption"):
            return
        from hieravid_vllm.testing.server import kv_cache_bytes

        clips = [self.clip("a", 5, 1), self.clip("b", 6, 2)]
        jobs = [(clips[0], QUESTION), (clips[1], QUESTION), (clips[0], "Describe it."),
                (clips[1], "Describe it."), (None, "Tell me a short story.")]
        # a KV cache of about one request: the longest prompt (asked once on a throw-away
        # server would cost a start; the unpruned token count bounds it) + the answer
        from hieravid_vllm.testing.hf_reference import hf_video_prompt
        from hieravid_vllm.testing.video import read_video_frames

        try:
            unpruned = max(hf_video_prompt(self.args.model, read_video_frames(c), QUESTION)
                           .prompt_tokens for c in clips)
        except Exception:  # noqa: BLE001 - processor not loadable here: a generous bound
            unpruned = 4096
        block = 32
        mml = -(-(unpruned + PREEMPT_TOKENS + 8) // block) * block
        # per worker: a TP rank holds 1/TP of the KV heads
        kv = kv_cache_bytes(self.args.model, mml + block,
                            "float32" if self.dtype_name == "float32" else "bfloat16",
                            block) // max(self.args.tensor_parallel_size, 1)
        srv, run = self.server("preemption", ["--max-num-seqs", "10", "--block-size",
                                              str(block)],
                               kv_cache_memory_bytes=kv, max_model_len=mml,
                               max_num_batched_tokens=max(mml, 512))
        result = {}

        def body(s):
            ask = lambda j: greedy_answer(s, j[0], j[1], PREEMPT_TOKENS, ignore_eos=True)  # noqa
            alone = [ask(j) for j in jobs]
            p0 = s.metric("vllm:num_preemptions_total")
            got = []
            # Whether the 10 requests overlap enough to preempt depends on how fast the API
            # server hands them over (it decodes each clip in turn): on a loaded machine
            # they can arrive one after another. The batch is sent again (at most 3 times)
            # until a preemption happened; every answer of every batch is compared.
            for _attempt in range(3):
                with cf.ThreadPoolExecutor(10) as ex:
                    got += list(ex.map(ask, jobs + jobs))
                if s.metric("vllm:num_preemptions_total") - p0 >= 1:
                    break
            result.update(alone=alone, got=got,
                          preemptions=s.metric("vllm:num_preemptions_total") - p0)

        name = "greedy: alone == under forced preemption (small KV cache)"
        if not self.phase(run, srv, body, [name]):
            return
        bad, notes = [], []
        for k, g in enumerate(result["got"]):
            ok, note = same_greedy(result["alone"][k % len(jobs)], g, self.tie)
            if note:
                (notes if ok else bad).append(f"request {k}: {note}")
        batches = len(result["got"]) // (2 * len(jobs))
        detail = (f"{2 * len(jobs)} requests at once"
                  + (f" ({batches} batches)" if batches > 1 else "")
                  + f", {result['preemptions']:.0f} "
                  f"preemptions, KV {kv / 2 ** 20:.1f} MiB, {PREEMPT_TOKENS} tokens each")
        if result["preemptions"] < 1:
            self.add(name, FAIL, detail + ": no preemption happened")
        elif bad:
            self.add(name, FAIL, detail + "; " + "; ".join(bad[:3]))
        else:
            self.add(name, PASS, detail + ("; " + "; ".join(notes[:3]) if notes else ""))

    def run_unpruned(self):
        if not self.want("timing"):
            return
        srv, run = self.server("unpruned", ["--max-num-seqs", "16"], hieravid=False)

        def body(s):
            self.timing["unpruned"] = self.stream_phase(s, run)

        self.phase(run, srv, body, ["timing: unpruned server"])

    def in_use_backend(self) -> Optional[str]:
        run = self.runs.get("hieravid")
        if run and run.workers:
            b = run.workers[0].get("attention_backends") or []
            return b[0] if b else None
        return None

    def run_backend(self):
        if not self.want("backend"):
            return
        name = "second attention backend"
        if not self.cuda:
            self.add(name, SKIP, "no CUDA: vLLM's CPU platform has one attention backend "
                                 "(CPU_ATTN)")
            return
        used = self.in_use_backend()
        alt = self.args.second_backend or next(b for b in SECOND_BACKENDS if b != used)
        srv, run = self.server(f"backend-{alt}", ["--attention-backend", alt])
        self.phase(run, srv, lambda s: collect_logits(s, run, [self.clip("a2", 15, 1),
                                                               self.clip("b2", 16, 2)]),
                   [f"{name} {alt}"])

    def run_tp(self):
        if not self.want("tp"):
            return
        name = "TP 2 vs TP 1"
        if self.gpus < 2:
            self.add(name, SKIP, f"{self.gpus} GPU(s) visible; needs 2")
            return
        other = 2 if self.args.tensor_parallel_size == 1 else 1
        srv, run = self.server(f"tp{other}", [], tp=other)
        self.phase(run, srv, lambda s: collect_logits(s, run, [self.clip("a", 5, 1),
                                                               self.clip("b", 6, 2)]),
                   [f"{name} (server with TP {other})"])

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self):
        main = self.runs.get("hieravid")
        if main is not None and main.ok and self.want("setup"):
            self.eval_setup(main)
        logit_runs = [r for r in self.runs.values() if r.ok and r.logits]
        if logit_runs:
            try:
                ref = self.reference()
            except Exception as exc:  # noqa: BLE001
                self.add("reference forward", FAIL, f"could not load: {type(exc).__name__}: "
                                                    f"{exc}")
                ref = None
            if ref is not None:
                for run in logit_runs:
                    for row in evaluate_logits(ref, run, self.atol, self.dtype):
                        self.rows.append(row)
                self.eval_tp_indices()
        if self.greedy:
            self.eval_greedy()
        if main is not None and main.ok and self.want("kv"):
            self.eval_kv()
        if self.want("timing") and "hieravid" in self.timing:
            self.eval_timing()

    def eval_setup(self, run: ServerRun):
        from hieravid_vllm.engine_setup import RUNNER_MODULES, STAGE_ATTENTION_BACKENDS

        name = "runner and attention backend in use"
        ws = run.workers
        if not ws:
            self.add(name, FAIL, "no worker-*.json in the debug folder: this plugin version "
                                 "does not record its workers, or HieraVid is off")
            return
        runners = sorted({w["runner"] for w in ws})
        backends = sorted({b for w in ws for b in w["attention_backends"]})
        modes = sorted({w["mode"] for w in ws})
        hooked = all(r.rsplit(".", 1)[0] in RUNNER_MODULES for r in runners)
        known = set(backends) <= set(STAGE_ATTENTION_BACKENDS)
        ok = hooked and known and modes == ["full"] and len(ws) == ws[0].get("tp_size", 1)
        detail = (f"{', '.join(runners)}; attention {', '.join(backends) or '-'}; mode "
                  f"{', '.join(modes)}; {len(ws)} worker(s) ({ws[0]['device']}, "
                  f"{ws[0]['dtype']})")
        if modes != ["full"]:
            detail += "; the layer-level stages are off (see the server log's HieraVid warning)"
        self.add(name, PASS if ok else FAIL, detail)

    def eval_tp_indices(self):
        import torch

        main = self.runs.get("hieravid")
        other = next((r for n, r in self.runs.items() if n.startswith("tp") and r.ok), None)
        if main is None or other is None or not main.logits:
            return
        by_clip = {rec["clip"]: rec for rec in main.logits}
        notes = []
        for rec in other.logits:
            mine = by_clip.get(rec["clip"])
            if mine is None or not rec["stage_dumps"] or not mine["stage_dumps"]:
                continue
            a = torch.load(main.dump_dir / mine["stage_dumps"][0])["stages"]
            b = torch.load(other.dump_dir / rec["stage_dumps"][0])["stages"]
            diff = [len(set(x.tolist()) ^ set(y.tolist())) // 2 for x, y in zip(a, b)]
            notes.append(f"{rec['clip'].stem}: tokens differing per stage {diff}")
        self.add(f"TP {self.args.tensor_parallel_size} vs {other.name}: kept indices", INFO,
                 "; ".join(notes) + " (differences are float noise only if the (a)/(b) rows of "
                 "both servers pass)")

    def eval_greedy(self):
        g = self.greedy
        for key, label in (("batched", "greedy: alone == mixed batch of 16 (8 video + 8 text)"),
                           ("warm", "greedy: alone == again with the prefix cache warm")):
            items = enumerate(g["batched"]) if key == "batched" else g["warm"].items()
            bad, notes = [], []
            for k, other in items:
                ok, note = same_greedy(g["alone"][k], other, self.tie)
                if note:
                    (notes if ok else bad).append(f"request {k}: {note}")
            n = len(g["batched"]) if key == "batched" else len(g["warm"])
            detail = f"{n} requests, {GREEDY_TOKENS} tokens each"
            if key == "warm":
                detail += f", prefix cache hits +{g['prefix_hits']:.0f} tokens"
            if key == "warm" and g["prefix_hits"] <= 0:
                if any(a.startswith("--no-enable-prefix-caching") for a in self.args.vllm_args):
                    self.add(label, SKIP, "prefix caching is off (--no-enable-prefix-caching)")
                    continue
                bad.append("no prefix cache hit (the shared system prompt was not reused)")
            if bad:
                self.add(label, FAIL, detail + "; " + "; ".join(bad[:3]))
            else:
                self.add(label, PASS, detail + ("; " + "; ".join(notes[:3]) if notes else ""))

    def eval_kv(self):
        name = "KV blocks per video request vs the schedule"
        t = self.timing.get("hieravid")
        if not t or not t["requests"]:
            return
        from hieravid_vllm.core import HieraVidConfig
        from hieravid_vllm.core.schedule import build_schedule
        from hieravid_vllm.testing.video import read_video_frames

        try:
            ref = self.reference()
        except Exception as exc:  # noqa: BLE001
            self.add(name, FAIL, f"reference (for the clip's grid) failed to load: {exc}")
            return
        bs = t["block_size"]
        L = ref.num_layers
        # the configuration the server ran (its input-stage dumps carry it: --hieravid-config
        # may have been passed through); the counts come from the core schedule below
        import torch

        dumps = sorted(self.runs["hieravid"].dump_dir.glob("video-*.pt"))
        cfg = HieraVidConfig.model_validate(torch.load(dumps[0])["config"]) if dumps else \
            HieraVidConfig(budget=self.args.budget)
        lps = list(cfg.layers_per_stage(L))
        per_stage_groups = len(lps) > 1 and len(set(lps)) == 1 and \
            os.environ.get("HIERAVID_KV_GROUPS", "1") != "0"
        parts, ok = [], True
        for req in t["requests"]:
            if req["kv_blocks"] is None:
                parts.append(f"{req['clip'].stem}: KV not read (the request ended first)")
                continue
            prep = ref.prepare([read_video_frames(req["clip"])], QUESTION, cfg, fps=FPS)
            T, H, W = prep.videos[0].grid
            n = T * H * W
            counts = build_schedule(cfg, n, L, max_merge=max(T - 1, 0) * H * W).counts
            text = req["prompt_tokens"] - counts[0]
            groups = counts if per_stage_groups else counts[:1]
            lo = sum(math.ceil((text + c) / bs) for c in groups)
            hi = sum(math.ceil((text + c + TIMING_TOKENS) / bs) for c in groups)
            unpruned = len(groups) * math.ceil((text + n) / bs)
            good = lo <= req["kv_blocks"] <= hi
            ok &= good
            parts.append(f"{req['clip'].stem}: {req['kv_blocks']} blocks of {bs}, schedule "
                         f"{lo}-{hi} (stages {'/'.join(map(str, counts))} + {text} text, "
                         f"{len(groups)} group(s); unpruned >= {unpruned})")
        read = [r for r in t["requests"] if r["kv_blocks"] is not None]
        if not read:
            self.add(name, FAIL, "; ".join(parts))
        else:
            self.add(name, PASS if ok else FAIL, "; ".join(parts))

    def eval_timing(self):
        h, u = self.timing.get("hieravid"), self.timing.get("unpruned")
        if not h or not u:
            return
        lim = self.args.max_time_ratio
        for key, label in (("ttft", "TTFT (client)"), ("prefill", "prefill time (engine)")):
            a = [r[key] for r in h["requests"] if r[key] is not None]
            b = [r[key] for r in u["requests"] if r[key] is not None]
            name = f"{label}: HieraVid / unpruned, median of {len(h['requests'])}"
            if not a or not b:
                self.add(name, FAIL, "not measured")
                continue
            ma, mb = statistics.median(a), statistics.median(b)
            ratio = ma / mb
            detail = f"{ratio:.2f}x ({ma:.3f} s vs {mb:.3f} s)"
            if lim is None:
                self.add(name, INFO, detail + "; no threshold (--max-time-ratio)")
            else:
                self.add(name, PASS if ratio <= lim else FAIL, detail + f"; limit {lim:g}x")

    # -- main -------------------------------------------------------------------------------
    def run(self) -> int:
        t0 = time.perf_counter()
        print(f"[selfcheck] model {self.args.model}; {'CUDA, ' + str(self.gpus) + ' GPU(s)' if self.cuda else 'CPU'}; "
              f"dtype {self.dtype_name}; budget {self.args.budget:g}; TP "
              f"{self.args.tensor_parallel_size}; checks {', '.join(self.checks)}; work "
              f"{self.work}", flush=True)
        self.run_main()
        self.run_preemption()
        self.run_unpruned()
        self.run_backend()
        self.run_tp()
        self.evaluate()
        failed = any(r.status == FAIL for r in self.rows)
        print_table(self.rows, header=(
            f"HieraVid selfcheck: {self.args.model}, {self.dtype_name}, budget "
            f"{self.args.budget:g}, TP {self.args.tensor_parallel_size}, logprob tolerance "
            f"{self.atol:g} nats, {time.perf_counter() - t0:.0f} s"))
        if failed or self.keep:
            print(f"clips, server logs and debug dumps: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        print("RESULT: FAIL" if failed else "RESULT: PASS")
        return 1 if failed else 0


def print_table(rows: Sequence[Row], header: str = "", width: int = 100) -> None:
    w0 = min(max((len(r.name) for r in rows), default=10), 64)
    print()
    if header:
        print(header)
    print("=" * width)
    for r in rows:
        name = textwrap.wrap(r.name, w0) or [""]
        detail = textwrap.wrap(r.detail, max(width - w0 - 9, 30)) or [""]
        for i in range(max(len(name), len(detail))):
            n = name[i] if i < len(name) else ""
            s = r.status if i == 0 else ""
            d = detail[i] if i < len(detail) else ""
            print(f"{n:<{w0}}  {s:<5}  {d}".rstrip())
    print("=" * width)
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP, INFO)}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if Path(args.model).is_dir():  # a local checkpoint: never reach for a model hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return SelfCheck(args).run()


if __name__ == "__main__":
    sys.exit(main())
