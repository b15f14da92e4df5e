#!/usr/bin/env python
"""Median of N rounds of ``benchmarks/serve.py``, and side-by-side ratios between configs.

    python benchmarks/serve_repeat.py --rounds 3 -- --configs hieravid,evs --budgets 0.3,0.1 \\
        --concurrency 1,16 --requests 4,16
    python benchmarks/serve_repeat.py --rounds 3 -- --configs hieravid,evs --budgets 0.3 \\
        --workload decode-heavy

Everything after ``--`` goes to ``serve.py`` unchanged. Each round is one whole
``serve.py`` run (every configuration, one server after another) into
``<out-dir>/round-<k>``, so slow drift of the machine hits every configuration alike. The
report (``<out-dir>/serve_repeat.md`` / ``.json``) gives, per (configuration, concurrency),
the median over the rounds of each measured value, and the ratios of those medians for
every HieraVid configuration against vLLM's EVS and against HieraVid ``input_only`` at the
same budget (requests/s, TTFT p50, decode tokens/s, TPOT p50, steady decode tokens/s, steady
requests/s; the per-round ratios of requests/s and the two steady rates), plus the
input-stage pruning seconds per video (``hieravid_prune_seconds``) next to the unpruned TTFT
at concurrency 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _ratio, percentile  # noqa: E402  (benchmarks/serve.py)

METRICS = ("prompt_tokens_mean", "ttft_p50_s", "ttft_p90_s", "latency_p50_s", "requests_per_s",
           "output_tokens_per_s", "tpot_p50_s", "decode_tokens_per_s",
           "steady_decode_tokens_per_s", "steady_requests_per_s", "kv_cache_usage_peak")
# (key, label, higher is better)
COMPARED = (("requests_per_s", "req/s", True), ("ttft_p50_s", "TTFT p50", False),
            ("decode_tokens_per_s", "decode tok/s", True), ("tpot_p50_s", "TPOT p50", False),
            ("steady_decode_tokens_per_s", "steady decode tok/s", True),
            ("steady_requests_per_s", "steady req/s", True))
# compared round by round too (the spread of the rounds around the ratio of the medians)
PER_ROUND = ("requests_per_s", "steady_decode_tokens_per_s", "steady_requests_per_s")


def _median(xs):
    return percentile(xs, 50)  # None values are left out; None when nothing is left


def median_report(rounds: list[dict]) -> dict:
    """{config: {level: {metric: median}}} plus the per-round values and prune seconds."""
    out: dict = {}
    for rep in rounds:
        for c in rep["configs"]:
            e = out.setdefault(c["name"], {"levels": {}, "prune": [], "status": []})
            e["status"].append(c.get("status"))
            hv = c.get("hieravid_metrics") or {}
            if hv.get("hieravid_prune_seconds_count"):
                e["prune"].append(hv["hieravid_prune_seconds_sum"]
                                  / hv["hieravid_prune_seconds_count"])
            for level, s in c.get("levels", {}).items():
                lv = e["levels"].setdefault(level, {m: [] for m in METRICS})
                for m in METRICS:
                    lv[m].append(s.get(m))
    for e in out.values():
        e["median"] = {lvl: {m: _median(v) for m, v in vals.items()}
                       for lvl, vals in e["levels"].items()}
        e["prune_median_s"] = _median(e["prune"])
    return out


def comparisons(med: dict) -> list[dict]:
    """HieraVid configs against EVS and input_only at the same budget, per level."""
    rows = []
    for name, e in med.items():
        if not name.startswith("hieravid-"):
            continue
        budget = name.rsplit("-", 1)[-1]
        peers = [f"evs-{budget}"]
        if name.startswith("hieravid-full-"):
            peers.append(f"hieravid-input_only-{budget}")
        for peer in peers:
            if peer not in med:
                continue
            for level, s in e["median"].items():
                p = med[peer]["median"].get(level)
                if p is None:
                    continue
                mine, theirs = e["levels"][level], med[peer]["levels"][level]
                per_round = {k: [_ratio(a, b) for a, b in zip(mine[k], theirs[k])]
                             for k in PER_ROUND}
                rows.append({"config": name, "vs": peer, "level": level,
                             **{k: _ratio(s.get(k), p.get(k)) for k, _, _ in COMPARED},
                             "per_round": per_round})
    return rows


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(med: dict, rows: list[dict], n_rounds: int, argv: list[str]) -> str:
    lines = [f"Median of {n_rounds} rounds of `python benchmarks/serve.py {' '.join(argv)}` "
             "(each round: every configuration, one server after another).", "",
             "| config | conc. | prompt tok | TTFT p50 (s) | E2E p50 (s) | req/s | out tok/s | "
             "TPOT p50 (ms) | decode tok/s | steady decode tok/s | steady req/s | KV peak | "
             "rounds ok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in med.items():
        for level, s in e["median"].items():
            ok = sum(1 for st in e["status"] if st == "ok")
            lines.append(
                f"| {name} | {level} | {_f(s['prompt_tokens_mean'], '.0f')} | "
                f"{_f(s['ttft_p50_s'])} | {_f(s['latency_p50_s'])} | "
                f"{_f(s['requests_per_s'], '.3f')} | {_f(s['output_tokens_per_s'], '.1f')} | "
                f"{_f(None if s['tpot_p50_s'] is None else s['tpot_p50_s'] * 1e3, '.1f')} | "
                f"{_f(s['decode_tokens_per_s'], '.1f')} | "
                f"{_f(s.get('steady_decode_tokens_per_s'), '.1f')} | "
                f"{_f(s.get('steady_requests_per_s'), '.3f')} | "
                f"{_f(None if s['kv_cache_usage_peak'] is None else s['kv_cache_usage_peak'] * 100, '.2f')}% | "
                f"{ok}/{len(e['status'])} |")
    if rows:
        lines += ["", "Ratios of the medians (config / peer, same budget and concurrency; "
                  "req/s and decode tok/s: higher is better, TTFT and TPOT: lower is better; "
                  "steady decode: every request of the level decoding, no prefill in the "
                  "window; steady req/s: completions between the first wave's and the last "
                  "wave's, every slot busy):",
                  "", "| config | vs | conc. | " + " | ".join(l for _, l, _ in COMPARED)
                  + " | " + " | ".join(f"{l} per round" for k, l, _ in COMPARED
                                       if k in PER_ROUND) + " |",
                  "|---|---|---:|" + "---:|" * len(COMPARED) + "---|" * len(PER_ROUND)]
        for r in rows:
            pr = r.get("per_round", {})
            lines.append(f"| {r['config']} | {r['vs']} | {r['level']} | "
                         + " | ".join(_f(r[k]) for k, _, _ in COMPARED) + " | "
                         + " | ".join(", ".join(_f(x) for x in pr.get(k, []))
                                      for k in PER_ROUND) + " |")
    base = med.get("unpruned", {}).get("median", {}).get("1", {}).get("ttft_p50_s")
    prunes = [(n, e["prune_median_s"]) for n, e in med.items() if e["prune_median_s"]]
    if prunes:
        lines += ["", "Input-stage pruning per video (`hieravid_prune_seconds` sum / count, "
                  "worker side), against the unpruned TTFT p50 at concurrency 1 "
                  f"({_f(base, '.3f')} s):", "", "| config | prune s / video | share |",
                  "|---|---:|---:|"]
        for n, p in prunes:
            lines.append(f"| {n} | {p:.4f} | "
                         f"{'-' if not base else format(p / base * 100, '.2f') + '%'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out-dir", default=str(REPO / "out" / "serve_repeat"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    if "--out-dir" in rest:
        raise SystemExit("give --out-dir to serve_repeat.py (before --), not to serve.py")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for k in range(1, args.rounds + 1):
        rd = out / f"round-{k}"
        print(f"[serve_repeat] round {k}/{args.rounds} -> {rd}", flush=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), *rest,
                        "--out-dir", str(rd), "--no-progress"], check=True)
        reports.append(json.loads((rd / "serve.json").read_text()))
    med = median_report(reports)
    rows = comparisons(med)
    md = markdown(med, rows, args.rounds, rest)
    (out / "serve_repeat.md").write_text(md)
    (out / "serve_repeat.json").write_text(json.dumps(
        {"argv": rest, "rounds": args.rounds, "configs": med, "comparisons": rows,
         "meta": [r.get("meta") for r in reports]}, indent=1, default=str))
    print(md)
    return {"configs": med, "comparisons": rows}


if __name__ == "__main__":
    main()
