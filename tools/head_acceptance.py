"""Held-out chain acceptance of the draft heads in predictor files, on the same recorded answers.

    python tools/head_acceptance.py MODEL.gguf HELD_OUT_DIR FILE.specee.gguf [FILE...]

HELD_OUT_DIR holds calibrate --head's held-out shards (OUTPUT.calib/head/held-out: the model's
greedy answers to held-out prompts, with its hidden states). For each file's head: the share of
chain positions 1..4 whose draft (the head's top-1, fed its own predicted features) is the
model's greedy token, given the drafts before it were accepted; top-1 and top-4 of single steps.
"""
import argparse
import glob
import os

from specee_pc.head_model import DraftHeadModel
from specee_pc.head_training import build_rows, chain_acceptance, hit_rates, load_trace
from specee_pc.llama import Llama
from specee_pc.predictor_file import read_predictor_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("held_out")
    p.add_argument("files", nargs="+")
    args = p.parse_args()
    llm = Llama(args.model, n_ctx=512, n_threads=2, verbose=False)
    traces = [load_trace(path) for path in sorted(glob.glob(os.path.join(args.held_out, "*.npz")))]
    rows = build_rows(llm.weights, traces)
    print(f"{len(traces)} held-out answers, {sum(int(r.generated.sum()) for r in rows)} generated tokens")
    print("| file | position 1 | 2 | 3 | 4 | top-1 | top-4 | vocabulary coverage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in args.files:
        head = read_predictor_file(path).head
        model = DraftHeadModel.from_weights(head, llm.weights.lm_head_rows(head.vocab.tolist()))
        chain = chain_acceptance(model, rows, head.vocab)
        rates = hit_rates(model, rows, head.vocab, 4)
        print(f"| {os.path.basename(path)} | " + " | ".join(f"{a:.3f}" for a in chain.acceptance)
              + f" | {rates.top1:.3f} | {rates.topk:.3f} | {rates.coverage:.3f} |")


if __name__ == "__main__":
    main()
