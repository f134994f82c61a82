#!/usr/bin/env python3
"""A PROJECTION, not a measurement: decode speed of SpecEE for a 7B-class model on a laptop with
partial GPU offload, from what `specee-pc bench --oracle` measured on a small model here.

Measured (from the bench JSON): each specee configuration's exit-layer distribution (as a share
of the model's depth), its predictor checks and verifying LM heads per step, its drafter's cost as
a share of a vanilla step, and the exact policy's confirmed-exit ratio; the small model's per-layer
step time on this CPU (reported, and the CPU bandwidth used unless --cpu-gbps is given).
Assumed (flags): a Llama-2-7B Q4_K_M (32 layers of ~122 MB, LM head ~107 MB), decode limited by
memory bandwidth on both devices, the bandwidths of a laptop (RTX 4060 Laptop ~200 GB/s effective,
DDR5 dual channel ~45 GB/s effective), and the cost of a 2-token batch relative to one token.

Per token: vanilla = sum of layer times + LM head. A mask-policy configuration (SpecEE) = layers
0..e + one full LM head under the verify rule (none under the candidates rule) + the decision; an
exact one = the same first pass, then on an exit a 2-token batch through every layer, which also
yields the next token when the exit is confirmed.
Offload: llama.cpp puts the last -ngl layers on the GPU; SpecEE's reversed offload the first
ones and the LM head, so exits skip CPU layers.

    python research/project_7b.py bench-smollm2.json --ngl 0,8,16,24,33
"""
import argparse
import json
import os

import numpy as np


def layer_bytes(model_path: str) -> float:
    import gguf

    reader = gguf.GGUFReader(model_path)
    blocks = [t for t in reader.tensors if t.name.startswith("blk.")]
    n_layer = 1 + max(int(t.name.split(".")[1]) for t in blocks)
    return sum(int(t.n_bytes) for t in blocks) / n_layer


def layer_times(n_layer: int, ngl: int, reversed_offload: bool, gpu_ms: float, cpu_ms: float) -> np.ndarray:
    on_gpu = np.arange(n_layer) < ngl if reversed_offload else np.arange(n_layer) >= n_layer - ngl
    return np.where(on_gpu, gpu_ms, cpu_ms)


def project(config: dict, small_layers: int, args, ngl: int, reversed_offload: bool, vanilla_ms: float) -> dict:
    n = args.layers
    t = layer_times(n, ngl, reversed_offload, args.layer_mb / args.gpu_gbps, args.layer_mb / args.cpu_gbps)
    head_on_gpu = reversed_offload and ngl > 0 or ngl > n  # llama.cpp offloads the output layer last
    head = args.head_mb / (args.gpu_gbps if head_on_gpu else args.cpu_gbps)
    full = t.sum() + head
    e = config["exits"]
    hist = np.array(e["exit_layer_histogram"], float)
    steps = max(e["steps"], 1)
    p_exit = hist / steps  # per small-model layer; the rest ran every layer
    # an exit after small layer l keeps the same share of the 7B's depth
    depth = np.minimum(np.ceil((np.arange(small_layers) + 1) / small_layers * n).astype(int), n)
    # the verify rule computes a full LM head at the exit; the candidates rule only the candidates' rows
    exit_head = head if config["options"]["exit_rule"] == "verify" else 0.0
    cut = np.array([t[:d].sum() + exit_head for d in depth])
    gpu_share = (t < args.layer_mb / args.cpu_gbps).mean() if ngl else 0.0
    batch2 = args.batch2_gpu * gpu_share + args.batch2_cpu * (1 - gpu_share)
    # the exit's own LM head is in `cut`; verifications that did not exit computed one each
    decision = ((args.sync_ms + args.check_ms) * e["checks"] + head * (e["lm_heads"] - e["exits"])) / steps
    # the drafter keeps the share of a vanilla step it took here (a draft model scales with its target)
    decision += full * (e["drafter_ms_per_token"] or 0.0) / vanilla_ms
    no_exit = 1 - p_exit.sum()
    if config["options"]["kv_policy"] == "mask":
        ms_per_token = no_exit * full + (p_exit * cut).sum() + decision
    else:  # exact: an exit's repair batch runs every layer, and yields the next token when confirmed
        time = no_exit * full + (p_exit * (cut + full * batch2)).sum() + decision
        ms_per_token = time / (no_exit + p_exit.sum() * (1 + (e["confirmed_ratio"] or 0.0)))
    return {"vanilla_tps": 1e3 / full, "specee_tps": 1e3 / ms_per_token, "speedup": full / ms_per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", help="a report of specee-pc bench --oracle")
    ap.add_argument("--ngl", default="0,8,16,24,33", help="GPU layer counts to project (33: all and the LM head)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--layer-mb", type=float, default=122.0, help="MB of weights per layer (Llama-2-7B Q4_K_M)")
    ap.add_argument("--head-mb", type=float, default=107.0, help="MB of the LM head (32000 x 4096, Q6_K)")
    ap.add_argument("--gpu-gbps", type=float, default=200.0, help="effective GPU bandwidth, GB/s")
    ap.add_argument("--cpu-gbps", type=float, default=45.0,
                    help="effective CPU bandwidth, GB/s (this machine's is printed)")
    ap.add_argument("--batch2-gpu", type=float, default=1.05, help="2-token batch time / 1-token, GPU")
    ap.add_argument("--batch2-cpu", type=float, default=1.3, help="2-token batch time / 1-token, CPU")
    ap.add_argument("--sync-ms", type=float, default=0.03, help="host sync per predictor check, ms")
    ap.add_argument("--check-ms", type=float, default=0.02, help="features and MLP per check, ms (12-512-1 MLP)")
    args = ap.parse_args()
    with open(args.bench_json) as f:
        report = json.load(f)
    if not report.get("oracle"):
        raise SystemExit("project_7b: the bench report has no per-layer times: run specee-pc bench with --oracle")
    step_ms = np.array(next(iter(report["oracle"].values()))["step_ms_by_exit_layer"])
    small_layers = report["settings"]["n_layer"]
    vanilla_ms = 1e3 / report["configs"][0]["decode_tokens_per_second"]
    per_layer_ms = np.polyfit(np.arange(small_layers - 1), step_ms[:-1], 1)[0]
    measured_gbps = layer_bytes(report["settings"]["model"]) / 1e6 / per_layer_ms  # MB/ms = GB/s
    print(f"PROJECTION for a {args.layers}-layer 7B-class model from {os.path.basename(args.bench_json)}: "
          f"this CPU ran {report['settings']['model_name']} at {per_layer_ms:.3f} ms/layer "
          f"({measured_gbps:.1f} GB/s effective); assumed GPU {args.gpu_gbps:.0f} GB/s, CPU {args.cpu_gbps:.0f} GB/s")
    print("| configuration | offload | -ngl | vanilla tok/s | specee tok/s | speedup |")
    print("|---|---|---|---|---|---|")
    for config in (c for c in report["configs"] if c["kind"] == "specee"):
        for ngl in (int(x) for x in args.ngl.split(",")):
            for reversed_offload in ((False, True) if 0 < ngl < args.layers else (False,)):
                p = project(config, small_layers, args, ngl, reversed_offload, vanilla_ms)
                print(f"| {config['name']} | "
                      f"{'first layers (SpecEE)' if reversed_offload else 'last layers (llama.cpp)'} "
                      f"| {ngl} | {p['vanilla_tps']:.1f} | {p['specee_tps']:.1f} | {p['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
