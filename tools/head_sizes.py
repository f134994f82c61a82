"""The table a draft head's size is chosen from: draft-vocabulary coverage against its LM-head
cost, and feed-forward width against the time of one proposal, beside the target's own step.

    python tools/head_sizes.py MODEL.gguf WORK_DIR/head [--vocab 1024,2048,4096,8192] [--ff 256,512,...]

WORK_DIR/head is calibrate --head's data folder (its text/, train/ and held-out/ shards): the
draft vocabulary of each size is the N tokens the target emits most often in the training data,
its coverage the share of held-out greedy tokens (the model's answers to held-out prompts) in it.
Timings use heads of random weights of each shape (what a proposal costs does not depend on the
weights), q4_0 as shipped, one row per proposal as decoding runs them.
"""
import argparse
import glob
import os
import tempfile
import time

import numpy as np
import torch

from specee_pc import _native
from specee_pc.head_data import load_text_traces
from specee_pc.head_model import DraftHeadModel
from specee_pc.head_training import head_shape
from specee_pc.llama import Llama
from specee_pc.predictor_file import PredictorFile, model_fingerprint, write_predictor_file


def label_counts(work_dir: str, n_vocab: int):
    """Training label counts (the target's greedy tokens) and held-out greedy tokens."""
    counts = np.zeros(n_vocab, np.int64)
    for trace in load_text_traces(sorted(glob.glob(os.path.join(work_dir, "text", "*.npz"))), 10 ** 12):
        np.add.at(counts, trace.greedy[1:], 1)
    for path in glob.glob(os.path.join(work_dir, "train", "*.npz")):
        with np.load(path) as f:
            np.add.at(counts, f["tokens"][int(f["n_prompt"]):], 1)
    held = []
    for path in glob.glob(os.path.join(work_dir, "held-out", "*.npz")):
        with np.load(path) as f:
            held.append(f["tokens"][int(f["n_prompt"]):])
    return counts, np.concatenate(held) if held else np.zeros(0, np.int64)


def proposal_ms(llm, vocab: np.ndarray, n_ff: int, tmp: str, steps: int = 200) -> float:
    w = llm.weights
    shape = {**head_shape(llm), "n_ff": n_ff}
    model = DraftHeadModel(w.n_embd, lm_rows=w.lm_head_rows(vocab.tolist()), **shape)
    path = os.path.join(tmp, f"head-{len(vocab)}-{n_ff}.gguf")
    write_predictor_file(path, PredictorFile(w.arch, w.n_layer, w.n_embd, w.n_vocab, 4, 0.5, [], [-2, 0, 2], {},
                                             model_fingerprint=model_fingerprint(w), drafter="head",
                                             head=model.to_weights(vocab, "q4_0", float("nan"))))
    head = _native.DraftHead(path, w, 1024, llm.n_threads)
    rng = np.random.default_rng(0)
    n = 64 + steps
    head.set_features(0, rng.standard_normal((n, w.n_embd)).astype(np.float32))
    tokens = rng.integers(0, w.n_vocab, n + 1).astype(np.int32)
    head.propose(tokens[:64], 4)
    start = time.perf_counter()
    for t in range(65, 65 + steps):
        head.propose(tokens[:t], 4)
    return (time.perf_counter() - start) * 1e3 / steps


def target_step_ms(llm, steps: int = 64) -> float:
    llm.reset()
    llm.eval(list(range(100, 164)))
    start = time.perf_counter()
    for t in range(steps):
        llm.eval([200 + t])
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("work_dir", help="calibrate --head's data folder (OUTPUT.calib/head)")
    p.add_argument("--vocab", default="1024,2048,4096,8192,16384")
    p.add_argument("--ff", default="256,512,1024")
    p.add_argument("-t", "--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    llm = Llama(args.model, n_ctx=1024, n_threads=args.threads, verbose=False)
    counts, held = label_counts(args.work_dir, llm.weights.n_vocab)
    step = target_step_ms(llm)
    sizes, widths = [int(x) for x in args.vocab.split(",")], [int(x) for x in args.ff.split(",")]
    print(f"target step {step:.2f} ms ({args.threads} threads); {int(counts.sum())} training labels, "
          f"{len(held)} held-out greedy tokens")
    print("| draft vocabulary | held-out coverage | " + " | ".join(f"proposal ms, ffn {f}" for f in widths) + " |")
    print("|---:|---:|" + "---:|" * len(widths))
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            vocab = np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)
            coverage = float(np.isin(held, vocab).mean()) if len(held) else float("nan")
            ms = [proposal_ms(llm, vocab, f, tmp) for f in widths]
            print(f"| {size} | {coverage:.3f} | " + " | ".join(f"{m:.3f} ({m / step:.2f} step)" for m in ms) + " |")


if __name__ == "__main__":
    main()
