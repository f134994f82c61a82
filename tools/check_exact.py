#!/usr/bin/env python3
"""Is the "exact" KV policy lossless? Greedy outputs on the six prompt sets, three ways:

  engine     specee_pc.Llama with exits happening (kv_policy "exact")
  replay     llama-cpp-python's own speculative decoding, drafting at each position where the
             engine exited the engine's exit token: the same batch shapes, so it must be
             token-for-token identical (anything else is a bug)
  vanilla    llama-cpp-python decoding one token at a time: llama.cpp's logits for a token
             alone and in a 2-token batch differ slightly, so outputs may part at near-ties;
             each first divergence is reported with the full model's logit gap there

Exits come from predictors that always fire (a learned predictor only fires less often), with
the SpecEE verify rule and prompt-lookup candidates, or forced layers with --force.

    python tools/check_exact.py --prompts specee_pc/data/prompts -n 128 --per-set 10
"""
import argparse
import json
import os
import sys
import time

import llama_cpp

import specee_pc
from specee_pc.benchmark.runs import greedy_tokens
from specee_pc.calibration import chat_tokens
from specee_pc.predictor_file import constant_predictors
from specee_pc.replay import ReplayExits

SETS = ["mt_bench", "sum", "qa", "alpaca", "gsm8k", "humaneval"]


def greedy(llm, tokens, n):
    return greedy_tokens(llm, tokens, n)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF model (default: embedded SmolLM2-135M)")
    ap.add_argument("--prompts", required=True, help="folder with <set>/question.jsonl")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--per-set", type=int, default=10)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--layers", default="16,20,24,27", help="layers where the always-firing predictors sit")
    ap.add_argument("--force", action="store_true", help="force exits at the first of --layers instead")
    ap.add_argument("--json", help="write the per-prompt results here")
    args = ap.parse_args()
    path = args.model or specee_pc.default_model_path()
    layers = [int(x) for x in args.layers.split(",")]
    common = dict(n_ctx=2048, n_threads=args.threads, verbose=False)
    weights = specee_pc.model_file.open_weights(path)
    exits = dict(force_exit_layers=layers) if args.force else dict(predictor=constant_predictors(weights, layers, 10.0))
    engine = specee_pc.Llama(path, logits_all=True, **common, **exits)
    vanilla = llama_cpp.Llama(path, logits_all=True, **common)

    results, bugs = [], 0
    for name in args.sets.split(","):
        with open(os.path.join(args.prompts, name, "question.jsonl")) as f:
            questions = [json.loads(line)["turns"][0] for line in f][:args.per_set]
        for i, question in enumerate(questions):
            tokens = chat_tokens(engine, question)
            start = time.perf_counter()
            ours = greedy(engine, tokens, args.n)
            seconds = time.perf_counter() - start
            stats = engine.exit_stats
            replay = llama_cpp.Llama(path, logits_all=True, draft_model=ReplayExits(stats.exits_at), **common)
            same_batches = greedy(replay, tokens, args.n)
            replay.close()
            plain = greedy(vanilla, tokens, args.n)
            first = next((j for j, (a, b) in enumerate(zip(ours, plain)) if a != b), None)
            gap = None
            if first is not None:
                row = vanilla.scores[len(tokens) - 1 + first]
                gap = float(row[plain[first]] - row[ours[first]])
            elif len(ours) != len(plain):
                first = min(len(ours), len(plain))
            result = dict(set=name, prompt=i, tokens=len(ours), exits=stats.exits, steps=stats.steps,
                          accepted=stats.accepted, identical_to_replay=ours == same_batches,
                          identical_to_vanilla=ours == plain, first_divergence=first, logit_gap=gap,
                          seconds=round(seconds, 2))
            bugs += not result["identical_to_replay"]
            results.append(result)
            print(json.dumps(result), flush=True)

    n = len(results)
    print(f"\n{n} prompts; exits {sum(r['exits'] for r in results)} of {sum(r['steps'] for r in results)} steps "
          f"({sum(r['accepted'] for r in results)} confirmed)")
    print(f"identical to llama-cpp-python in the same batch shapes: {n - bugs}/{n}")
    gaps = [r["logit_gap"] for r in results if r["logit_gap"] is not None]
    print(f"identical to one-token-at-a-time decoding: {sum(r['identical_to_vanilla'] for r in results)}/{n}; "
          f"divergences at near-ties, full-model logit gaps: {sorted(round(g, 3) for g in gaps)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
