#!/usr/bin/env python3
"""Exits per step at equal greedy agreement, drafter against drafter, from `specee-pc bench` reports.

Lossy configurations trade agreement with the full model for exits, and each threshold lands a
drafter at an agreement of its own, so two drafters compare only along their curves. For every
configuration of --drafter this reads the --against drafter's exits at that agreement off its
measured trade-off curve (its configurations no other beats on both counts, joined by straight
lines), and the difference. The prompts are few and they move both numbers, so the difference
comes with a paired bootstrap over prompts (every configuration resampled with the same prompts).
Reports must hold the same prompts, token counts and policy (several reports' configurations
are pooled: one threshold sweep can be extended by another).

    python tools/exit_frontier.py results/bench-smollm2-mask-unmatched.json \\
        results/bench-smollm2-mask-unmatched-pairs.json --drafter head+lookup --against ngram
"""
import argparse
import json
import sys
from typing import Dict, List

import numpy as np


def per_prompt_counts(report: dict) -> Dict[str, np.ndarray]:
    """Per lossy configuration, an array [prompt, (exits, steps, agreeing tokens, tokens)]."""
    prompts = [p["name"] for p in report["prompts"]]
    counts = {}
    for config in report["configs"]:
        if config["kind"] != "specee" or config["lossless"]:
            continue
        name = config["name"]
        rows = {p: np.zeros(4) for p in prompts}
        for run in report["runs"]:
            if run["config"] == name and run["rep"] == 0:
                rows[run["prompt"]][:2] = run["exit"]["exits"], run["exit"]["steps"]
        for check in config["quality"]["per_prompt"]:
            rows[check["prompt"]][2:] = check["greedy_agreeing"], check["tokens"]
        counts[name] = np.stack([rows[p] for p in prompts])
    return counts


def load(paths: List[str]):
    """The pooled configurations (name -> (drafter, counts)) of reports on the same prompts."""
    configs, prompts = {}, None
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        these = [(p["name"], p["tokens"]) for p in report["prompts"]]
        if prompts is not None and these != prompts:
            sys.exit(f"{path}: other prompts than {paths[0]}'s; the curves would not compare")
        prompts = these
        drafters = {c["name"]: c["options"].get("drafter") for c in report["configs"]}
        for name, counts in per_prompt_counts(report).items():
            configs[name] = (drafters[name], counts)
    return configs, len(prompts)


def totals(counts: np.ndarray, sample: np.ndarray):
    """(exits per step, agreement) over the sampled prompts."""
    s = counts[sample].sum(axis=0)
    return s[0] / max(s[1], 1), s[2] / max(s[3], 1)


def frontier_at(points, agreement: float) -> float:
    """The other drafter's exits per step at this agreement: on the line between its two
    measured trade-offs either side (mixing two thresholds reaches any point between them), or
    its best at a higher agreement when none is lower; nan above its highest agreement."""
    pareto = [(e, a) for e, a in points if not any(e2 >= e and a2 >= a and (e2, a2) != (e, a) for e2, a2 in points)]
    above = [(a, e) for e, a in pareto if a >= agreement]
    below = [(a, e) for e, a in pareto if a < agreement]
    if not above:
        return float("nan")
    a_hi, e_hi = min(above)
    if not below:
        return e_hi
    a_lo, e_lo = max(below)
    return e_lo + (e_hi - e_lo) * (agreement - a_lo) / (a_hi - a_lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="bench JSON reports (-o PREFIX writes PREFIX.json)")
    ap.add_argument("--drafter", default="head+lookup", help="the drafter whose configurations are compared")
    ap.add_argument("--against", default="ngram", help="the drafter compared with")
    ap.add_argument("--samples", type=int, default=2000, help="bootstrap resamples of the prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    configs, n_prompts = load(args.reports)
    ours = {n: c for n, (d, c) in configs.items() if d == args.drafter}
    theirs = {n: c for n, (d, c) in configs.items() if d == args.against}
    if not ours or not theirs:
        sys.exit(f"need lossy configurations of both drafters; found {sorted({d for d, _ in configs.values()})}")
    rng = np.random.default_rng(args.seed)
    samples = [np.arange(n_prompts)] + [rng.integers(0, n_prompts, n_prompts) for _ in range(args.samples)]
    print(f"{len(ours)} {args.drafter} and {len(theirs)} {args.against} configurations, {n_prompts} prompts, "
          f"{args.samples} paired resamples\n")
    print(f"| {args.drafter} configuration | exits/step | agreement | {args.against} at that agreement "
          f"| difference | 90% interval | resamples ahead |")
    print("|---|---|---|---|---|---|---|")
    for name, counts in sorted(ours.items(), key=lambda item: -totals(item[1], samples[0])[1]):
        diffs = []
        for sample in samples:
            exits, agreement = totals(counts, sample)
            diffs.append(exits - frontier_at([totals(c, sample) for c in theirs.values()], agreement))
        exits, agreement = totals(counts, samples[0])
        boot = np.array(diffs[1:])
        boot = boot[np.isfinite(boot)]  # resamples where the other drafter reached no such agreement
        low, high = np.percentile(boot, [5, 95]) if len(boot) else (float("nan"),) * 2
        print(f"| {name} | {exits:.3f} | {agreement:.1%} | {exits - diffs[0]:.3f} | {diffs[0]:+.3f} | "
              f"{low:+.3f} to {high:+.3f} | {np.mean(boot > 0):.0%} of {len(boot)} |")


if __name__ == "__main__":
    main()
