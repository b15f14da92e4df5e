#!/usr/bin/env python
"""CPU greedy MAP: the torch step loop vs the numpy host loop (``host_loop``), side by side
in one run, on random features of the shapes of one full-mode stage; prints a markdown row per
shape (ms per call, best of 2) and whether both picked the same tokens.

    python benchmarks/dpp_host_loop.py
"""
import time, torch
from hieravid_vllm.core.dpp import greedy_map_batched
torch.manual_seed(0)
rows = []
for name, lens, ks, C in [("LLaVA-Video-7B 0.3 stage 3", [906, 700, 600, 500, 500, 388], [644, 450, 390, 320, 320, 212], 3584),
                          ("bench Qwen2.5-VL 0.3 stage 1", [400, 300, 250, 132], [280, 210, 170, 90], 512)]:
    S = len(lens); n = max(lens)
    H = torch.randn(S, n, C, dtype=torch.bfloat16).float()
    w = torch.rand(S, n)
    L, K = torch.tensor(lens), torch.tensor(ks)
    t = {}
    for hl in (False, True):
        best = []
        for _ in range(2):
            t0 = time.perf_counter()
            sel = greedy_map_batched(H, L, K, weights=w, host_loop=hl)
            best.append(time.perf_counter() - t0)
        t[hl] = (min(best), sel)
    same = torch.equal(t[False][1], t[True][1])
    print(f"| {name} | {sum(lens)}->{sum(ks)}, {S} segs | {t[False][0]*1e3:.0f} | {t[True][0]*1e3:.0f} | {t[False][0]/t[True][0]:.1f}x | {same} |")
