"""``vllm.v1.core.sched.scheduler.Scheduler``'s methods that
:class:`hieravid_vllm.scheduler.HieraVidScheduler` overrides: ``add_request``,
``_free_request``, ``_reserve_prefill_lookahead``, ``_get_local_prefix_cache_hit``.

What: not a patch (the HieraVid scheduler is a subclass, installed as ``scheduler_cls`` in full
mode); the registry checks that the methods it overrides still exist, so a vLLM without them
stops a HieraVid start-up with an error naming this entry instead of a scheduler that
silently skips its constraint.
Why: these are private methods of vLLM's scheduler; the HieraVid scheduler needs them to keep
a video's prefill in one step and to cut prefix-cache hits before a video.
Per vLLM version: ``_get_local_prefix_cache_hit(request)`` (0.32) gained
``max_cache_hit_length=None`` in 0.33; the override forwards every further argument, so one
override serves both (same entry for both versions).
When it can go: when vLLM lets a scheduler plugin constrain chunking and prefix hits.
"""
from __future__ import annotations

MODULE = "vllm.v1.core.sched.scheduler"
TARGETS = ("Scheduler.add_request", "Scheduler._free_request",
           "Scheduler._reserve_prefill_lookahead", "Scheduler._get_local_prefix_cache_hit")
