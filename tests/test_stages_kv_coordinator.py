"""The KV cache coordinator's fast path (``patches/engine_core/stage_kv_coordinator.py``)
against vLLM's own coordinator.

Two real vLLM ``KVCacheManager`` s with four full-attention groups (one per stage), both
with HieraVid's stage managers (group ``g`` counts compacted tokens); one also has the
coordinator fast path. The same random request lifecycles (first allocation, chunked
prefill, decode steps that cross block boundaries in some groups, frees, requests with and
without videos, with and without prefix caching) go to both: every answer and every group's
block count must be equal, and on a step where no group crosses a block boundary the fast
path must not reach any group's manager. Then real vLLM requests through ``KVCacheManager``
with prefix caching (``allocate_slots`` also caches full blocks): same block ids, same cached
blocks, same prefix hits, and ``cache_blocks`` reaches no manager when nothing is to cache.
"""
from __future__ import annotations

import random

import pytest
import torch

from hieravid_vllm.patches.engine_core.stage_kv_coordinator import wrap_stage_coordinator
from hieravid_vllm.patches.engine_core.stage_kv_manager import wrap_stage_manager
from hieravid_vllm.stages import NO_SPANS, StageSpans

pytestmark = pytest.mark.vllm033  # also run on vLLM 0.33 (make test)

BLOCK = 16
GROUPS = 4


def _manager(caching: bool, spans: dict, fast: bool, spec_cls=None):
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec)

    def spec(g):
        if spec_cls is not None and g == GROUPS - 1:
            return spec_cls(block_size=BLOCK, num_kv_heads=1, head_size=8,
                            dtype=torch.float32, sliding_window=64)
        return FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8,
                                 dtype=torch.float32)

    cfg = KVCacheConfig(num_blocks=4096, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([f"model.layers.{g}.self_attn.attn"], spec(g))
        for g in range(GROUPS)])
    kvm = KVCacheManager(cfg, max_model_len=8192, scheduler_block_size=BLOCK,
                         hash_block_size=BLOCK, enable_caching=caching)
    coord = kvm.coordinator
    spans_of = lambda rid: spans.get(rid, NO_SPANS)  # noqa: E731
    for g, m in enumerate(coord.single_type_managers):
        if g:
            wrap_stage_manager(m, g, spans_of)
    applied = wrap_stage_coordinator(coord, spans_of) if fast else None
    return kvm, coord, applied


def _random_spans(rng):
    spans, off = [], rng.randint(0, 40)
    for _ in range(rng.randint(1, 3)):
        c0 = rng.randint(20, 300)
        counts = [c0]
        for _g in range(1, GROUPS):
            counts.append(rng.randint(0, counts[-1]))
        spans.append((off, tuple(counts)))
        off += c0 + rng.randint(0, 30)
    return StageSpans(spans), off


def _calls(coord):
    """Count calls to every group's manager methods (the fast path must make none)."""
    n = {"calls": 0}
    for m in coord.single_type_managers:
        for name in ("get_num_blocks_to_allocate", "allocate_new_blocks"):
            orig = getattr(m, name)

            def counted(*a, _orig=orig, **k):
                n["calls"] += 1
                return _orig(*a, **k)
            setattr(m, name, counted)
    return n


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_answers_what_vllms_coordinator_answers(caching, seed):
    rng = random.Random(seed)
    spans: dict = {}
    _, ref, _ = _manager(caching, spans, fast=False)
    _, fast, applied = _manager(caching, spans, fast=True)
    assert applied is True
    calls = _calls(fast)
    empty = tuple(() for _ in range(GROUPS))
    live: dict = {}  # request -> tokens with slots
    skipped = crossed = 0
    for step in range(600):
        if len(live) < 6 and rng.random() < 0.3:  # a new request: its first allocation
            rid = f"r{step}"
            if rng.random() < 0.75:
                spans[rid], prompt = _random_spans(rng)
                prompt += rng.randint(1, 20)
            else:
                prompt = rng.randint(1, 200)  # text only: every group counts n
            live[rid] = 0
            n_new = prompt if rng.random() < 0.7 else rng.randint(1, prompt)
        elif live and rng.random() < 0.05:  # a request ends
            rid = rng.choice(sorted(live))
            ref.free(rid)
            fast.free(rid)
            del live[rid]
            spans.pop(rid, None)
            continue
        elif live:
            rid = rng.choice(sorted(live))
            n_new = 1 if rng.random() < 0.9 else rng.randint(2, 40)  # decode / a chunk
        else:
            continue
        n = live[rid] + n_new
        kw = dict(request_id=rid, num_tokens=n, new_computed_blocks=empty,
                  num_encoder_tokens=0, total_computed_tokens=live[rid],
                  num_local_computed_tokens=0, num_tokens_main_model=n)
        before = calls["calls"]
        want = ref.get_num_blocks_to_allocate(**kw)
        got = fast.get_num_blocks_to_allocate(**kw)
        assert got == want, (rid, n)
        want_new = ref.allocate_new_blocks(rid, n, n)
        got_new = fast.allocate_new_blocks(rid, n, n)
        assert [len(b) for b in got_new] == [len(b) for b in want_new], (rid, n)
        assert len(got_new) == GROUPS and all(isinstance(b, list) for b in got_new)
        held = [len(m.req_to_blocks[rid]) for m in fast.single_type_managers]
        assert held == [len(m.req_to_blocks[rid]) for m in ref.single_type_managers]
        sp = spans.get(rid, NO_SPANS)
        # the stage counts, by the independent formula (ceil of compacted tokens / block)
        assert held == [-(-sp.compact(g, n) // BLOCK) for g in range(GROUPS)]
        if live[rid] and want == 0:  # a running request with room in every group
            assert calls["calls"] == before, "fast path reached a group's manager"
            skipped += 1
        elif want:
            crossed += 1
        live[rid] = n
    assert skipped > 100 and crossed > 20  # both paths were exercised


def test_no_fast_path_unless_every_group_is_plain_full_attention():
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    _, coord, applied = _manager(False, {}, fast=True, spec_cls=SlidingWindowSpec)
    assert applied is False
    assert not hasattr(coord.get_num_blocks_to_allocate, "_hieravid_patched")



def _request(rid, prompt, hasher):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, prompt, SamplingParams(max_tokens=4096), None, block_hasher=hasher)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scheduler_lifecycle_with_prefix_caching_matches_vllm(seed):
    """Real vLLM requests through ``KVCacheManager`` as the scheduler drives it (prefix-cache
    lookup, ``allocate_slots`` -- which also caches the full blocks --, ``free``), prompts
    sharing prefixes, chunked prefill and decode: with the fast path (``cache_blocks``
    included) every group holds the same block ids and has cached as many blocks as with
    vLLM's path, and the prefix-cache lookups find the same hits."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    rng = random.Random(seed)
    spans: dict = {}
    sides = {fast: _manager(True, spans, fast=fast) for fast in (False, True)}
    assert hasattr(sides[True][1].cache_blocks, "_hieravid_patched")
    cache_calls = {"n": 0}
    for m in sides[True][1].single_type_managers:  # the fast side's managers, counted
        def counted(*a, _orig=m.cache_blocks, **k):
            cache_calls["n"] += 1
            return _orig(*a, **k)
        m.cache_blocks = counted
    skipped = 0
    prefixes = [[rng.randint(1, 5000) for _ in range(rng.randint(20, 90))] for _ in range(3)]
    live = {False: {}, True: {}}  # rid -> (request, prefix hit, hit blocks)
    cached_after = 0
    for step in range(500):
        if len(live[True]) < 5 and rng.random() < 0.2:  # a new request
            rid = f"r{step}"
            prompt = rng.choice(prefixes) + [rng.randint(1, 5000)
                                             for _ in range(rng.randint(1, 120))]
            if rng.random() < 0.7:
                spans[rid], _end = _random_spans(rng)
            hits = []
            for fast, (kvm, _c, _a) in sides.items():
                req = _request(rid, list(prompt), hasher)
                blocks, n_hit = kvm.get_computed_blocks(req)[:2]
                hits.append(n_hit)
                live[fast][rid] = (req, n_hit, blocks)
            assert hits[0] == hits[1], rid
            left = len(prompt) - hits[0]
            n_new, first = rng.choice([left, max(1, left // 2)]), True
        elif live[True] and rng.random() < 0.04:  # a request ends
            rid = rng.choice(sorted(live[True]))
            for fast, (kvm, _c, _a) in sides.items():
                kvm.free(live[fast].pop(rid)[0])
            spans.pop(rid, None)
            continue
        elif live[True]:  # the rest of a prefill, or a decode step
            rid = rng.choice(sorted(live[True]))
            req = live[True][rid][0]
            left = req.num_prompt_tokens - req.num_computed_tokens
            n_new, first = (left if left > 0 else 1), False
        else:
            continue
        token = rng.randint(1, 5000)
        before = [m.num_cached_block.get(rid, 0) for m in sides[True][1].single_type_managers]
        calls0 = cache_calls["n"]
        held = []
        for fast, (kvm, coord, _a) in sides.items():
            req, n_hit, blocks = live[fast][rid]
            if first:
                out = kvm.allocate_slots(req, n_new, n_hit, blocks)
                req.num_computed_tokens = n_hit
            else:
                out = kvm.allocate_slots(req, n_new)
            assert out is not None
            req.num_computed_tokens += n_new
            if req.num_computed_tokens >= req.num_prompt_tokens:  # sampled a token
                req.append_output_token_ids(token)
            held.append(([[b.block_id for b in m.req_to_blocks[rid]]
                          for m in coord.single_type_managers],
                         [m.num_cached_block.get(rid) for m in coord.single_type_managers]))
        assert held[0] == held[1], (rid, step)
        if [c or 0 for c in held[1][1]] == before:  # no group had a new full block to cache
            assert cache_calls["n"] == calls0, "cache fast path reached a group's manager"
            skipped += 1
        cached_after += req.num_computed_tokens > req.num_prompt_tokens + BLOCK
    assert cached_after > 50 and skipped > 100  # both paths were exercised
