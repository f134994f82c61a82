#!/usr/bin/env python3
"""Would filling the mask policy's KV holes beat masking them?

Under kv_policy "mask" a token that exited after layer e never writes K/V in the deeper layers,
and later tokens' deeper layers do not attend to it. CALM instead fills those cells from the
exited token's state after layer e (its K/V in each skipped layer are computed from that
state). Before building that natively, this prices it: for each configuration it decodes the
held-out prompts under "mask", then teacher-forces the same tokens through a float32 numpy
forward (tests/reference_forward.py) three ways - no exits (the full model), holes masked,
holes filled - and counts the steps whose greedy token differs from the full model's.

Full-depth steps are where the holes alone make the difference (the same computation on the
same prefix, only what deeper layers see of earlier exits changes). Exit steps are scored too
(their own skipped layers are not in question, only earlier holes below their exit layer).

--by-match adds a second table: the exits split by whether prompt lookup finds the exit token in
its context (the bar of exit_threshold_unmatched), each part's wrong exits, and the full-depth
steps that go wrong with only that part's holes masked, per 100 of its exits.

    python research/kv_hole_fill.py --config head+lookup 0.9 P.gguf --config ngram 0.7 Q.gguf -o R.md
"""
import argparse
import os
import sys

from collections import Counter

import specee_pc
from specee_pc.benchmark.report import fmt, ratio
from specee_pc.benchmark.runs import exited_tokens, greedy_tokens
from specee_pc.calibration import chat_tokens
from specee_pc.drafters import lookup_matches
from specee_pc.prompt_sets import SETS, first_prompts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference_forward import LlamaReference  # noqa: E402

HOLE_TREATMENTS = ("mask", "fill")
MATCH_CLASSES = ("matched", "unmatched")


def wrong_tokens(reference, tokens, generated):
    """wrong(exits, holes): per output token, whether its greedy token is not the full model's when
    the outputs are teacher-forced with these exits and this hole treatment."""
    sequence, first = tokens + generated[:-1], len(tokens) - 1
    full = reference.forward(sequence, first=first).argmax(axis=1)
    return lambda exits, holes="mask": (
        reference.forward(sequence, exits, holes=holes, first=first).argmax(axis=1) != full)


def by_match(wrong, tokens, generated, exits_at, exited, wrong_masked, total: Counter) -> None:
    """Counts per match class: exits, wrong exits, and full-depth steps wrong with only its holes."""
    classes = {}
    for position, layer, _ in exits_at:
        i = position - len(tokens) + 1  # the output token this exit emitted
        if 0 <= i < len(generated):
            matched = generated[i] in lookup_matches(tokens + generated[:i], 4)
            classes[position] = (MATCH_CLASSES[not matched], layer, i)
    for name in MATCH_CLASSES:
        own = {position: layer for position, (c, layer, _) in classes.items() if c == name}
        total[name, "exits"] += len(own)
        total[name, "wrong"] += sum(int(wrong_masked[i]) for c, _, i in classes.values() if c == name)
        total[name, "full depth"] += int((wrong(own) & ~exited).sum())


def measure(args, reference, drafter, threshold, predictor, prompts) -> Counter:
    llm = specee_pc.Llama(args.model, n_ctx=2048, n_threads=args.threads, verbose=False, predictor=predictor,
                          kv_policy="mask", exit_threshold=threshold, drafter=drafter)
    total = Counter()
    try:
        for i, prompt in enumerate(prompts):
            tokens = chat_tokens(llm, prompt.text)
            generated, _ = greedy_tokens(llm, tokens, args.n)
            exits_at = llm.exit_stats.exits_at
            exited = exited_tokens(exits_at, len(tokens), len(generated))
            total["steps"] += len(generated)
            total["exits"] += int(exited.sum())
            wrong = wrong_tokens(reference, tokens, generated)
            exits = {position: layer for position, layer, _ in exits_at}
            differing = {holes: wrong(exits, holes) for holes in HOLE_TREATMENTS}
            for holes, differs in differing.items():
                total[holes] += int(differs.sum())
                total[holes, "full depth"] += int((differs & ~exited).sum())
            if args.by_match:
                by_match(wrong, tokens, generated, exits_at, exited, differing["mask"], total)
            print(f"\r{drafter} {threshold}: {i + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    finally:
        llm.close()
        print(file=sys.stderr)
    return total


def row(drafter, threshold, t: Counter) -> str:
    full_depth_steps = t["steps"] - t["exits"]
    pct = lambda n, d: fmt(ratio(n, d), ".2%", none="-")  # noqa: E731
    return (f"| {drafter} {threshold:.2f} | {t['steps']} | {t['exits'] / t['steps']:.3f} | "
            + " | ".join(pct(t[holes, "full depth"], full_depth_steps) for holes in HOLE_TREATMENTS) + " | "
            + " | ".join(pct(t[holes], t["steps"]) for holes in HOLE_TREATMENTS) + " |")


def match_row(drafter, threshold, t: Counter) -> str:
    cells = [f"{t[name, 'exits']} | {fmt(ratio(t[name, 'wrong'], t[name, 'exits']), '.1%', none='-')} | "
             f"{fmt(ratio(100 * t[name, 'full depth'], t[name, 'exits']), '.1f', none='-')}" for name in MATCH_CLASSES]
    return f"| {drafter} {threshold:.2f} | " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None,
                    help="GGUF model, llama architecture (default: embedded SmolLM2-135M)")
    ap.add_argument("--config", nargs=3, action="append", required=True, metavar=("DRAFTER", "THRESHOLD", "PREDICTOR"),
                    help="a drafter (head+lookup, head, ngram), its exit threshold and the predictor file trained on "
                         "its candidates; repeatable")
    ap.add_argument("--per-set", type=int, default=4, help="held-out prompts from each of the six sets")
    ap.add_argument("-n", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--by-match", action="store_true",
                    help="also split the exits by whether prompt lookup finds their token (two more forwards a prompt)")
    ap.add_argument("-o", "--output", help="write the Markdown table here")
    args = ap.parse_args()
    args.model = args.model or specee_pc.default_model_path()
    prompts = first_prompts(SETS, args.per_set)
    reference = LlamaReference(args.model)

    lines = [f"### Mask's KV holes masked or filled: {os.path.basename(args.model)}, {len(prompts)} held-out prompts "
             f"x {args.n} tokens",
             "", "Outputs decoded under `mask`, then teacher-forced through a float32 numpy forward; a step disagrees "
             "when its greedy token is not the full model's on the same prefix.", "",
             "| configuration | steps | exits/step | full-depth steps disagreeing, masked | filled "
             "| all steps disagreeing, masked | filled |",
             "|---|---|---|---|---|---|---|"]
    matches = ["", "Exits split by whether prompt lookup finds the exit token in its context; full-depth steps "
               "disagreeing with only that part's holes masked, per 100 of its exits.", "",
               "| configuration | matched exits | wrong | full-depth disagreements / 100 | unmatched exits | wrong | "
               "full-depth disagreements / 100 |", "|---|---|---|---|---|---|---|"]
    for drafter, threshold, predictor in args.config:
        total = measure(args, reference, drafter, float(threshold), predictor, prompts)
        lines.append(row(drafter, float(threshold), total))
        print(lines[-1], file=sys.stderr, flush=True)
        if args.by_match:
            matches.append(match_row(drafter, float(threshold), total))
    if args.by_match:
        lines += matches
    if args.output:
        with open(args.output + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(args.output + ".tmp", args.output)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
