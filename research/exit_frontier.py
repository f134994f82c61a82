#!/usr/bin/env python3
"""Exits per step at equal greedy agreement, drafter against drafter, from `specee-pc bench` reports.

Lossy configurations trade agreement with the full model for exits, and each threshold lands a
drafter at an agreement of its own, so two drafters compare only along their curves. For every
configuration of --drafter this reads the --against drafter's exits at that agreement off its
measured trade-off curve (the upper concave hull of its configurations and of exits off: mixing
two thresholds reaches the line between them; best at that agreement or higher), and the
difference; below the other drafter's lowest measured agreement only its being ahead there
(more exits at a higher agreement) says anything. The prompts are few and they move both numbers, so the difference
comes with a paired bootstrap over prompts (every configuration resampled with the same prompts).
Reports must hold the same prompts, token counts and policy (several reports' configurations
are pooled: one threshold sweep can be extended by another). --against-reports are read for the
other drafter's configurations alone, so an experiment that re-runs configurations under their
old names (research/head_confidence_gate.py) compares with earlier sweeps.

    python research/exit_frontier.py results/bench-smollm2-mask-unmatched.json \\
        results/bench-smollm2-mask-unmatched-pairs.json --drafter head+lookup --against ngram
"""
import argparse
import json
import sys
from typing import Dict, List, Sequence

import numpy as np


def per_prompt_counts(path: str, report: dict) -> Dict[str, np.ndarray]:
    """Per lossy configuration, an array [prompt, (exits, steps, agreeing tokens, tokens)]."""
    prompts = [p["name"] for p in report["prompts"]]
    counts = {}
    for config in report["configs"]:
        if config["kind"] != "specee" or config["lossless"]:
            continue
        name = config["name"]
        exits = {r["prompt"]: r["exit"] for r in report["runs"] if r["config"] == name and r["rep"] == 0}
        checks = {c["prompt"]: c for c in config["quality"]["per_prompt"]}
        missing = [p for p in prompts if p not in exits or p not in checks]
        if missing:
            sys.exit(f"{path}: {name} has no run or output check for {', '.join(missing)}")
        counts[name] = np.array([(exits[p]["exits"], exits[p]["steps"], checks[p]["greedy_agreeing"],
                                  checks[p]["tokens"]) for p in prompts], dtype=float)
    return counts


def load(paths: List[str], against_only: Sequence[str] = (), against: str = ""):
    """The pooled configurations (name -> (drafter, counts)) of reports on the same prompts and
    policy; of the against_only reports, only the `against` drafter's."""
    configs, prompts, policies = {}, None, set()
    for path, only in [(p, None) for p in paths] + [(p, against) for p in against_only]:
        with open(path) as f:
            report = json.load(f)
        these = [(p["name"], p["tokens"]) for p in report["prompts"]]
        if prompts is not None and these != prompts:
            sys.exit(f"{path}: other prompts than {paths[0]}'s; the curves would not compare")
        prompts = these
        options = {c["name"]: c["options"] for c in report["configs"]}
        for name, counts in per_prompt_counts(path, report).items():
            if only is not None and options[name]["drafter"] != only:
                continue
            if name in configs:
                sys.exit(f"{path}: {name} is in an earlier report too; pool each configuration once")
            policies.add(options[name]["kv_policy"])
            configs[name] = (options[name]["drafter"], counts)
    if len(policies) > 1:
        sys.exit(f"the reports mix KV policies ({', '.join(sorted(policies))}); compare one at a time")
    return configs, len(prompts)


def totals(counts: np.ndarray, sample: np.ndarray):
    """(exits per step, agreement) over the sampled prompts."""
    s = counts[sample].sum(axis=0)
    return s[0] / max(s[1], 1), s[2] / max(s[3], 1)


def trade_off_curve(points):
    """The other drafter's trade-off curve, (agreement, exits) with agreement rising: the upper
    concave hull of its configurations (mixing two thresholds reaches any point on the line
    between them), anchored at no exits and full agreement (exits off)."""
    best = {1.0: 0.0}  # the most exits at each agreement
    for exits, agreement in points:
        best[agreement] = max(exits, best.get(agreement, 0.0))
    hull = []
    for point in sorted(best.items()):
        # drop the last point while it lies on or under the line from the one before to this one
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (point[1] - hull[-2][1])
                                  >= (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0])):
            hull.pop()
        hull.append(point)
    return hull


def exits_at(curve, agreement: float) -> float:
    """The curve's best at this agreement or higher (below its lowest: its most exits, reached higher up)."""
    on_curve = float(np.interp(agreement, [a for a, _ in curve], [e for _, e in curve]))
    return max([on_curve] + [e for a, e in curve if a >= agreement])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="bench JSON reports (-o PREFIX writes PREFIX.json)")
    ap.add_argument("--drafter", default="head+lookup", help="the drafter whose configurations are compared")
    ap.add_argument("--against", default="ngram", help="the drafter compared with")
    ap.add_argument("--against-reports", nargs="+", default=[], metavar="REPORT",
                    help="reports read for the --against drafter's configurations only (their own "
                         "--drafter configurations may share names with the reports compared)")
    ap.add_argument("--samples", type=int, default=2000, help="bootstrap resamples of the prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    configs, n_prompts = load(args.reports, args.against_reports, args.against)
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
    curves = [trade_off_curve([totals(c, sample) for c in theirs.values()]) for sample in samples]
    lowest = min(totals(c, samples[0])[1] for c in theirs.values())
    for name, counts in sorted(ours.items(), key=lambda item: -totals(item[1], samples[0])[1]):
        diffs = []
        for sample, curve in zip(samples, curves):
            exits, agreement = totals(counts, sample)
            diffs.append(exits - exits_at(curve, agreement))
        exits, agreement = totals(counts, samples[0])
        if agreement < lowest and diffs[0] >= 0:  # more exits than they reach higher up: they may lower theirs
            print(f"| {name} | {exits:.3f} | {agreement:.1%} | not measured this low | – | – | – |")
            continue
        higher = f" (at {lowest:.1%})" if agreement < lowest else ""  # they exit more with more agreement
        low, high = np.percentile(diffs[1:], [5, 95])
        print(f"| {name} | {exits:.3f} | {agreement:.1%} | {exits - diffs[0]:.3f}{higher} | {diffs[0]:+.3f} | "
              f"{low:+.3f} to {high:+.3f} | {np.mean(np.array(diffs[1:]) > 0):.0%} |")


if __name__ == "__main__":
    main()
