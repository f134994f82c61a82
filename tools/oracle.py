#!/usr/bin/env python3
"""Oracle analysis: how early could tokens exit, and how much of that do the predictors take?

From calibration records (the folder `specee-pc calibrate` fills, or collected here on held-out
prompts), reports per layer how often the layer already gives the emitted token (full
vocabulary, and best of the drafter's candidates), the oracle exit-layer distribution (earliest
layer from which the token is settled at every deeper layer and is a candidate: what a perfect
predictor could take with the verify rule), and the oracle speed bound: full step time over the
mean time of a step cut at the oracle layer (layers 0..e, timed here with forced exits less
their exit decision, plus one full LM head). Plots it beside the predictors' exit histogram.

    python tools/oracle.py [MODEL.gguf] --prompts specee_pc/data/prompts --predictor P.gguf -o oracle.png
"""
import argparse
import os
import sys

import numpy as np

import specee_pc
from specee_pc.calibration import collect, load_prompts, load_records, split_held_out
from specee_pc.drafters import NgramDrafter
from specee_pc.oracle import speed_bound, step_ms_by_exit_layer
from specee_pc.predictor_file import read_predictor_file
from specee_pc.training import oracle_exit_layers, predicted_exit_layers, settled_rates

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF model (default: embedded SmolLM2-135M)")
    ap.add_argument("--records", help="a folder of calibration records (*.npz)")
    ap.add_argument("--prompts", help="or prompts to collect held-out records from (first --per-set of each set)")
    ap.add_argument("--per-set", type=int, default=4)
    ap.add_argument("-n", "--tokens", type=int, default=64)
    ap.add_argument("--predictor", default="auto", help="predictor file for the predicted histogram (default: shipped)")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--timing-tokens", type=int, default=32)
    ap.add_argument("--timing-runs", type=int, default=3)
    ap.add_argument("-o", "--output", default="oracle.png")
    args = ap.parse_args()
    path = args.model or specee_pc.default_model_path()
    llm = specee_pc.Llama(path, n_ctx=2048, n_threads=args.threads, verbose=False)
    n_layer = llm.weights.n_layer
    if args.records:
        records = load_records(os.path.join(args.records, f)
                               for f in sorted(os.listdir(args.records)) if f.endswith(".npz"))
    elif args.prompts:
        _, held = split_held_out(load_prompts([args.prompts]), args.per_set)
        records = collect(llm, NgramDrafter(), held, args.output + ".records", args.tokens, 4, "collecting (held-out)")
    else:
        ap.error("give --records or --prompts")

    full_vocab, restricted = settled_rates(records)
    oracle = oracle_exit_layers(records)
    predictor_path = (specee_pc.default_model.shipped_predictor_path(llm.weights)
                      if args.predictor == "auto" else args.predictor)
    predictors = read_predictor_file(predictor_path)
    threshold = args.threshold if args.threshold is not None else predictors.threshold
    predicted = predicted_exit_layers(predictors.layers, records, predictors.offline_layers, threshold)
    predicted = np.where(predicted < 0, n_layer - 1, predicted)
    times = step_ms_by_exit_layer(path, args.threads, args.timing_tokens, args.timing_runs)
    bound = speed_bound(oracle, times)
    achieved = speed_bound(predicted, times)

    print(f"{len(records.label)} decode steps; full step {times[-1]:.2f} ms; "
          f"candidate hit rate {records.cand_hit.mean():.2f}")
    print("layer  settled(full vocab)  settled(best candidate)  oracle exits  predicted exits  step ms if cut here")
    for il in range(n_layer):
        print(f"{il:5d}  {full_vocab[il]:19.2f}  {restricted[il]:23.2f}  {np.mean(oracle == il):12.3f}  "
              f"{np.mean(predicted == il):15.3f}  {times[il]:8.2f}")
    print(f"oracle: mean exit layer {oracle.mean():.1f}, speed bound {bound:.2f}x (decision and repair not counted)")
    share = f" = {(achieved - 1) / (bound - 1):.0%} of the oracle's gain" if bound > 1.01 else ""
    agreeing = records.label[np.arange(len(predicted)), predicted].mean()
    print(f"predictors (offline layers, threshold {threshold}): mean exit layer {predicted.mean():.1f}, "
          f"same cost model {achieved:.2f}x{share}; tokens agreeing with the full model {agreeing:.3f} "
          f"(wrong exits count as savings here, so this can pass the bound)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = np.arange(n_layer)
    left.plot(layers, full_vocab, marker="o", label="layer argmax = emitted token")
    left.plot(layers, restricted, marker="s", label="best candidate = emitted token")
    left.set(xlabel="layer", ylabel="share of decode steps", title="settled tokens per layer", ylim=(0, 1.02))
    left.legend()
    width = 0.4
    right.bar(layers - width / 2, np.bincount(oracle, minlength=n_layer) / len(oracle), width,
              label=f"oracle ({bound:.2f}x bound)")
    right.bar(layers + width / 2, np.bincount(predicted, minlength=n_layer) / len(predicted), width,
              label=f"predictors, threshold {threshold} ({achieved:.2f}x, {agreeing:.0%} agreeing)")
    right.set(xlabel=f"exit layer ({n_layer - 1}: no exit)", ylabel="share of decode steps", title="exit layers")
    right.legend()
    fig.suptitle(f"{os.path.basename(path)}: {len(records.label)} held-out decode steps")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
