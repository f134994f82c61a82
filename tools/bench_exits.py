#!/usr/bin/env python3
"""Decode-speed benchmark of the early-exit engine against llama-cpp-python, in one run.

Part 1, overhead: llama_cpp.Llama, specee_pc.Llama with exits off (or a threshold above 1,
which skips scoring), and with predictors that score far below the threshold (every scheduled
layer scored, no exit), decoding the same prompts
greedily, interleaved per repetition; reports median tok/s and the median of per-run ratios.
Part 2, the cut: forced exits at each given layer; reports the first pass's ms/step (the cut
step alone) and the exact policy's repair cost.
End-to-end comparisons (policies, drafters, thresholds, speculative decoding, output quality)
are `specee-pc bench`'s job.

    python tools/bench_exits.py [MODEL.gguf] --runs 5 -n 96 -t 2 --layers 5,10,15,20,25,28
"""
import argparse
import statistics

import llama_cpp

import specee_pc
from specee_pc.benchmark.runs import greedy_tokens
from specee_pc.predictor_file import constant_predictors

PROMPTS = ["Write a detailed essay about the history of the Roman Empire.",
           "Explain how a compiler turns source code into machine code."]


def decode_tokens_per_second(llm, prompt: str, n: int) -> float:
    _, times = greedy_tokens(llm, llm.tokenize(prompt.encode()), n)
    return (len(times) - 1) / (times[-1] - times[0])


def overhead(path, args):
    common = dict(n_ctx=1024, n_threads=args.threads, verbose=False)
    hooked = specee_pc.Llama(path, **common)
    n_layer = hooked.weights.n_layer
    # full-size MLPs (12 -> 512 -> 1) scoring far below any threshold
    predictors = constant_predictors(hooked.weights, range(n_layer // 2, n_layer - 1), -20.0, hidden=512)
    scored = specee_pc.Llama(path, **common, predictor=predictors)
    models = {"llama_cpp": llama_cpp.Llama(path, **common), "exits off": hooked,
              "threshold 1.0": specee_pc.Llama(path, **common, predictor=predictors, exit_threshold=1.0),
              "scored, no exit": scored}
    speeds = {name: [] for name in models}
    for _ in range(args.runs):
        for prompt in PROMPTS:
            for name, llm in models.items():
                speeds[name].append(decode_tokens_per_second(llm, prompt, args.n))
    print(f"overhead ({args.runs} runs x {len(PROMPTS)} prompts, {args.n} tokens, {args.threads} threads)")
    for name, values in speeds.items():
        ratios = [v / base for v, base in zip(values, speeds["llama_cpp"])]
        print(f"  {name:16s} median {statistics.median(values):7.1f} tok/s   ratio to llama_cpp: "
              f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"  scored layers per step: {scored.exit_stats.checks / max(scored.exit_stats.steps, 1):.1f}")


def cut(path, args):
    print("forced exits: the cut step alone (first pass) and the exact policy's repair, ms/step (median of runs)")
    full = specee_pc.Llama(path, n_ctx=1024, n_threads=args.threads, verbose=False)
    full_ms = [1e3 / decode_tokens_per_second(full, PROMPTS[0], args.n) for _ in range(args.runs)]
    print(f"  full model: {statistics.median(full_ms):.2f} ms/token")
    for layer in args.layers:
        llm = specee_pc.Llama(path, n_ctx=1024, n_threads=args.threads, verbose=False, force_exit_layers=[layer])
        first, repair = [], []
        for _ in range(args.runs):
            llm.create_completion(PROMPTS[0], max_tokens=args.n, temperature=0.0)
            s = llm.exit_stats
            first.append(s.first_pass_ms / s.steps)
            repair.append(s.repair_ms / s.steps)
        print(f"  exit after layer {layer:2d}: first pass {statistics.median(first):6.2f}  "
              f"repair {statistics.median(repair):6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF model (default: embedded SmolLM2-135M)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-n", type=int, default=96, help="tokens per run")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--layers", default="5,10,15,20,25,28", help="forced exit layers to time")
    ap.add_argument("--parts", default="1,2", help="which parts to run")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    path = args.model or specee_pc.default_model_path()
    parts = {"1": overhead, "2": cut}
    for part in args.parts.split(","):
        parts[part](path, args)


if __name__ == "__main__":
    main()
