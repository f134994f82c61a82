#!/usr/bin/env python3
"""Decode speed of specee_pc.Llama (native hook installed) against llama_cpp.Llama.

Both decode the same prompts greedily on the same model with the same threads, interleaved
per repetition so that machine noise hits both alike; reports the median tokens/s of each
and the median of the per-run ratios.

    python tools/bench_hook_overhead.py [MODEL.gguf] --runs 7 -n 128 -t 2
"""
import argparse
import statistics
import time

import llama_cpp

import specee_pc

PROMPTS = ["Write a detailed essay about the history of the Roman Empire.",
           "Explain how a compiler turns source code into machine code."]


def decode_tokens_per_second(llm, prompt: str, n: int) -> float:
    tokens = llm.tokenize(prompt.encode())
    llm.reset()
    times = []
    start = time.perf_counter()
    for _, _token in zip(range(n), llm.generate(tokens, temp=0.0, reset=True)):
        times.append(time.perf_counter() - start)
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF model (default: embedded SmolLM2-135M)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("-n", type=int, default=128, help="tokens per run")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or specee_pc.default_model_path()
    common = dict(n_ctx=1024, n_threads=args.threads, verbose=False)
    models = {"llama_cpp": llama_cpp.Llama(path, **common), "specee_pc": specee_pc.Llama(path, **common)}
    speeds = {name: [] for name in models}
    for _ in range(args.runs):
        for prompt in PROMPTS:
            for name, llm in models.items():
                speeds[name].append(decode_tokens_per_second(llm, prompt, args.n))
    ratios = [s / v for s, v in zip(speeds["specee_pc"], speeds["llama_cpp"])]
    for name, values in speeds.items():
        print(f"{name:10s} median {statistics.median(values):7.1f} tok/s over {len(values)} runs")
    print(f"specee_pc / llama_cpp: median ratio {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
