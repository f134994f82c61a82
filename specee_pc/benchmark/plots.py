"""PNG plots of a benchmark report (matplotlib, from the `train` extra): speedup against the exit
threshold, and where the steps exited."""
import os
from typing import List

import numpy as np

from .configs import unmatched_suffix


def plot_report(report: dict, prefix: str) -> List[str]:
    """Writes PREFIX-threshold.png and PREFIX-exit-layers.png; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specee = [c for c in report["configs"] if c["kind"] == "specee"]
    if not specee:
        return []
    n_layer = report["settings"]["n_layer"]
    paths = []

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = {}
    for c in specee:
        o = c["options"]
        bar = unmatched_suffix(o["threshold"], o.get("threshold_unmatched"))  # absent in older reports
        groups.setdefault(f"{o['kv_policy']} {o['drafter']} {o['exit_rule']}{bar}", []).append(c)
    for label, members in groups.items():
        members.sort(key=lambda c: c["options"]["threshold"])
        x = [c["options"]["threshold"] for c in members]
        left.plot(x, [c["speedup"] for c in members], marker="o", label=label)
        right.plot(x, [c["quality"]["agreeing_prefix"] for c in members], marker="o", label=label)
    for c in report["configs"]:
        if c["kind"] == "speculative":
            left.axhline(c["speedup"], linestyle=":", color="gray")
            left.annotate(c["name"], (left.get_xlim()[0], c["speedup"]), fontsize=8, color="gray")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set(xlabel="exit threshold", ylabel="decode speedup over vanilla (median of prompts)",
             title="speed")
    right.set(xlabel="exit threshold", ylabel="share of vanilla's greedy output reproduced",
              title="agreement with the full model", ylim=(0, 1.02))
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(report["settings"]["model_name"])
    fig.tight_layout()
    paths.append(f"{prefix}-threshold.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20(np.arange(20)))  # more configurations than the default 10 colours
    layers = np.arange(n_layer)
    for c in specee:
        hist = np.array(c["exits"]["exit_layer_histogram"], float)
        steps = max(c["exits"]["steps"], 1)
        ax.plot(layers, hist / steps, marker=".", label=f"{c['name']} (exits {c['exits']['exit_ratio']:.0%})")
    for drafter, o in (report.get("oracle") or {}).items():
        hist = np.array(o["exit_layer_histogram"], float)
        ax.plot(layers, hist / max(hist.sum(), 1), linestyle="--",
                label=f"oracle, {drafter} candidates (bound {o['bound']:.2f}x; {n_layer - 1}: no exit)")
    ax.set(xlabel="exit layer", ylabel="share of decode steps", title="where steps exit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{prefix}-exit-layers.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return [os.path.abspath(p) for p in paths]
