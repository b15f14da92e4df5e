"""Engine-vs-reference check of the in-LLM stages on a served tiny model (tests only).

:func:`check_against_reference` asks a server started with ``HIERAVID_DEBUG_DIR`` for the first
token of a video question with top logprobs and compares, against
:class:`hieravid_vllm.reference.HieraVidReference` (transformers, float32, written
independently of the vLLM path):

* (a) the computation: the server's first-token logprobs equal the reference's log-softmax;
* (b) the selection: at every stage boundary the server kept exactly what the core selects on
  the hidden states the server dumped, and those states are the reference's given the same
  kept tokens (so the kept tokens equal the free-running reference's up to near-ties of the
  greedy DPP on float noise, the first one checked to be a near-tie).

Shared by the CPU_ATTN engine tests (``tests/test_stages_engine.py``) and the GPU-backend
engine tests on CPU (``tests/test_stages_backends.py``).
"""
from __future__ import annotations

import math

import torch

from hieravid_vllm.core import HieraVidConfig
from hieravid_vllm.core.pipeline import select_layer_stage
from hieravid_vllm.reference import HieraVidReference
from hieravid_vllm.stages import STAGES_DUMP_PREFIX
from hieravid_vllm.testing.models import build_tiny_model
from hieravid_vllm.testing.server import chat, video_messages
from hieravid_vllm.testing.video import read_video_frames

#: the frame rate the servers sample the clips at (every frame of the suite's clips)
FPS = 8.0
QUESTION = "What happens in this video, and which shapes move first?"
#: top logprobs compared (servers need ``--max-logprobs`` at least this)
TOP = 20


def stage_dumps(debug_dir):
    return [torch.load(p) for p in sorted(debug_dir.glob(f"{STAGES_DUMP_PREFIX}-*.pt"))]


_REFS: dict = {}


def reference(arch):
    if arch not in _REFS:
        _REFS[arch] = HieraVidReference(build_tiny_model(arch))
    return _REFS[arch]


def check_against_reference(server, arch, video, budget, debug_dir, extra_body=None,
                            strict=True, fps=FPS):
    """Server logprobs / kept tokens vs the reference forward of the same frames (module
    docstring); ``strict``: kept tokens must equal the reference's exactly (off where the
    vision towers differ by float noise). Returns the reference's output.

    Greedy DPP is discontinuous, so once a near-tie flips one stage's pick the later stages'
    states legitimately differ from the free-running reference: (a) is then checked against
    the reference forward *holding the server's selections* (``keep=``), at every stage and
    for the logits; the free-running reference is compared with up to the first stage that
    differs, which must be a DPP near-tie."""
    before = len(stage_dumps(debug_dir))
    r = chat(server, video_messages(video, QUESTION), max_tokens=1, logprobs=True,
             top_logprobs=TOP, extra_body=extra_body or {})
    frames = read_video_frames(video)
    ref = reference(arch).forward([frames], QUESTION, HieraVidConfig(budget=budget), fps=fps,
                                   return_boundary_states=True)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    dumps = stage_dumps(debug_dir)[before:]
    assert len(dumps) == 1, "one selecting video -> one stage dump"
    stages, seen = dumps[0]["stages"], dumps[0]["boundaries"]
    want = ref.kept_indices[0]
    assert [len(s) for s in stages] == [len(w) for w in want] == list(ref.counts[0])
    assert torch.equal(stages[0].long(), want[0].long()), "input stage"
    # (b) the server selects exactly what the core selects on the stream it saw
    server_keep = []
    for g in range(1, len(stages)):
        d = seen[g - 1]
        core_keep = select_layer_stage(d["hidden_visual"], d["query"], d["segment_ids"],
                                       d["target"], HieraVidConfig.model_validate(d["config"]),
                                       use_dpp=d["use_dpp"], num_segments=d["num_segments"])
        assert torch.equal(stages[g - 1].long()[core_keep], stages[g].long()), \
            f"stage {g}: plumbing"
        server_keep.append(core_keep.long())
    same = [torch.equal(stages[g].long(), want[g].long()) for g in range(len(stages))]
    if strict:
        assert all(same), f"stages {[g for g, ok in enumerate(same) if not ok]} differ"
    # (a) the computation given the server's kept tokens: the reference holding them
    held = ref if all(same) else reference(arch).forward(
        ref.prepared, keep=[server_keep], return_boundary_states=True)
    logp = torch.log_softmax(held.prompt_logits.double(), dim=-1)
    tops = r.choices[0].logprobs.content[0].top_logprobs
    assert len(tops) == TOP
    got_ids = []
    for t in tops:
        tid = token_id(arch, t.token)
        got_ids.append(tid)
        assert math.isclose(t.logprob, float(logp[tid]), abs_tol=2e-3), (t.token, t.logprob,
                                                                          float(logp[tid]))
    want_top = torch.topk(logp, TOP).indices.tolist()
    # same ranking up to near-ties of the (random, tiny) model's logits
    assert got_ids[0] == want_top[0] or \
        abs(float(logp[got_ids[0]]) - float(logp[want_top[0]])) < 1e-4
    video = ref.prepared.videos[0]
    last = ref.prepared.num_prompt_tokens - 1
    for g in range(1, len(stages)):
        d = seen[g - 1]
        # the stream the server saw is the reference's given the same kept tokens (float32,
        # different kernels)
        rows = held.rows[g - 1]
        vis = (rows >= video.start) & (rows < video.start + video.num_kept)
        assert torch.allclose(d["hidden_visual"], held.boundary_states[g - 1][vis], rtol=1e-3,
                              atol=1e-3), f"stage {g}"
        assert torch.allclose(d["query"][-1], held.boundary_states[g - 1][rows == last][-1],
                              rtol=1e-3, atol=1e-3), f"stage {g}"
    # the free-running reference: the same tokens up to the first stage that differs, which
    # is a near-tie of the greedy DPP on float noise (counted: none on the Qwen clips, a
    # handful at most otherwise); later stages select on other states
    if not all(same):
        g = same.index(False)
        d = seen[g - 1]
        assert d["use_dpp"], f"stage {g}: relevance-only stage differs"
        diff = len(set(stages[g].tolist()) ^ set(want[g].tolist())) // 2
        assert diff <= max(2, len(want[g]) // 50), f"stage {g}: {diff} tokens differ"
        rows = ref.rows[g - 1]
        vis = (rows >= video.start) & (rows < video.start + video.num_kept)
        ref_keep = select_layer_stage(ref.boundary_states[g - 1][vis],
                                      ref.boundary_states[g - 1][rows == last][-1][None],
                                      d["segment_ids"], d["target"],
                                      HieraVidConfig.model_validate(d["config"]),
                                      use_dpp=True, num_segments=d["num_segments"])
        assert torch.equal(stages[g - 1].long()[ref_keep], want[g].long()), \
            f"stage {g}: reference"
    return ref


_TOKENIZERS: dict = {}


def token_id(arch, token_str):
    from transformers import AutoTokenizer

    if arch not in _TOKENIZERS:
        _TOKENIZERS[arch] = AutoTokenizer.from_pretrained(build_tiny_model(arch))
    tok = _TOKENIZERS[arch]
    ids = tok.convert_tokens_to_ids([token_str])
    if ids and ids[0] is not None and ids[0] != tok.unk_token_id:
        return ids[0]
    enc = tok.encode(token_str, add_special_tokens=False)
    assert len(enc) == 1, token_str
    return enc[0]
