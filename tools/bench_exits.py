#!/usr/bin/env python3
"""Decode-speed benchmark of the early-exit engine against llama-cpp-python, in one run.

Part 1, overhead: llama_cpp.Llama, specee_pc.Llama with exits off (or a threshold above 1,
which skips scoring), and with predictors that score far below the threshold (every scheduled
layer scored, no exit), decoding the same prompts
greedily, interleaved per repetition; reports median tok/s and the median of per-run ratios.
Part 2, the cut: forced exits at each given layer; reports the first pass's ms/step (the cut
step alone) and the exact policy's repair cost.
Part 3, the KV policies with --predictor (default: predictors that always fire, i.e. a step
exits whenever the layer's top-1 is a prompt-lookup candidate), verify rule: tok/s against
llama_cpp, exits, and how long the greedy output stays identical to llama_cpp's.

    python tools/bench_exits.py [MODEL.gguf] --runs 5 -n 96 -t 2 --layers 5,10,15,20,25,28
"""
import argparse
import statistics
import time

import llama_cpp

import specee_pc
from specee_pc.predictor_file import constant_predictors

PROMPTS = ["Write a detailed essay about the history of the Roman Empire.",
           "Explain how a compiler turns source code into machine code."]


def decode_tokens_per_second(llm, prompt: str, n: int) -> float:
    tokens = llm.tokenize(prompt.encode())
    times = []
    start = time.perf_counter()
    for _, _token in zip(range(n), llm.generate(tokens, temp=0.0)):
        times.append(time.perf_counter() - start)
    return (len(times) - 1) / (times[-1] - times[0])


def overhead(path, args):
    common = dict(n_ctx=1024, n_threads=args.threads, verbose=False)
    hooked = specee_pc.Llama(path, **common)
    n_layer = hooked.weights.n_layer
    # full-size MLPs (12 -> 512 -> 1) scoring far below any threshold
    predictors = constant_predictors(hooked.weights, range(n_layer // 2, n_layer - 1), -20.0, hidden=512)
    scored = specee_pc.Llama(path, **common, predictor=predictors)
    models = {"llama_cpp": llama_cpp.Llama(path, **common), "exits off": hooked,
              "threshold 1.5": specee_pc.Llama(path, **common, predictor=predictors, exit_threshold=1.5),
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


def policies(path, args):
    weights = specee_pc.model_file.open_weights(path)
    if args.predictor:
        predictors, what = args.predictor, f"{args.predictor}, threshold {args.threshold or 'of the file'}"
    else:
        predictors, what = constant_predictors(weights, args.fire_layers, 20.0, hidden=512), \
            f"predictors always firing at layers {args.fire_layers}"
    print(f"KV policies, {what} (median of {args.runs} runs)")
    common = dict(n_ctx=1024, n_threads=args.threads, verbose=False)
    vanilla = llama_cpp.Llama(path, **common)
    for policy in ("exact", "mask"):
        llm = specee_pc.Llama(path, **common, predictor=predictors, kv_policy=policy, exit_threshold=args.threshold)
        ratios, agree = [], []
        for prompt in PROMPTS:
            for _ in range(args.runs):
                ratios.append(decode_tokens_per_second(llm, prompt, args.n) / decode_tokens_per_second(vanilla, prompt, args.n))
            tokens = llm.tokenize(prompt.encode())
            ours = [t for _, t in zip(range(args.n), llm.generate(tokens, temp=0.0))]
            theirs = [t for _, t in zip(range(args.n), vanilla.generate(tokens, temp=0.0))]
            agree.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), args.n))
        s = llm.exit_stats
        print(f"  {policy:5s}: {statistics.median(ratios):.3f}x llama_cpp tok/s, exits {s.exits}/{s.steps}, "
              f"mean layers {s.mean_layers:.1f}; identical greedy tokens before the first divergence: {agree}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF model (default: embedded SmolLM2-135M)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-n", type=int, default=96, help="tokens per run")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--layers", default="5,10,15,20,25,28", help="forced exit layers to time")
    ap.add_argument("--fire-layers", default="16,20,24,27", help="layers of the always-firing predictors")
    ap.add_argument("--predictor", help="predictor file for part 3 (default: always-firing predictors)")
    ap.add_argument("--threshold", type=float, default=None, help="exit threshold for part 3")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    args.fire_layers = [int(x) for x in args.fire_layers.split(",")]
    path = args.model or specee_pc.default_model_path()
    parts = {"1": overhead, "2": cut, "3": policies}
    for part in args.parts.split(","):
        parts[part](path, args)


if __name__ == "__main__":
    main()
