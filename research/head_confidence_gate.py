#!/usr/bin/env python3
"""Would the draft head's own confidence make its exits safe under kv_policy "mask"?

Under mask, exits on tokens prompt lookup did not find cost more agreement than exits on its
matches (results/kv-hole-match-smollm2.md), so `exit_threshold_unmatched` holds them to a bar
of their own. This asks whether the head's unmatched candidates it is sure of are as safe as
lookup's matches: it runs `specee-pc bench` with every head candidate whose probability (softmax
over the head's draft vocabulary, from the same proposal) is at least --confidence counted as
matched, so with `--thresholds-unmatched 1.0` the head+lookup drafter exits on lookup's matches
and on the head's confident candidates only. Compare the report with prompt lookup's curve:

    python research/head_confidence_gate.py --confidence 0.5 --predictor P.gguf --policies mask \\
        --thresholds 0.3,0.5,0.7 --thresholds-unmatched 1.0 --baselines none --runs 1 -o R
    python research/exit_frontier.py R.json --against-reports <prompt lookup's reports>

Every other argument is the bench's (`specee-pc bench --help`). On SmolLM2-135M the answer is no
(results/exit-frontier-smollm2-mask-head-confident.md).
"""
import argparse
import sys
import weakref
from typing import List, Sequence, Tuple

import numpy as np

from specee_pc.cli import bench
from specee_pc.drafters import HeadLookupDrafter


_vocab_index = weakref.WeakKeyDictionary()  # drafter -> {target id: its row in the head's draft vocabulary}


def confident_flags(drafter: HeadLookupDrafter, context: Sequence[int], k: int,
                    confidence: float) -> Tuple[List[int], List[bool]]:
    """The drafter's candidates and flags, with the head's confident candidates flagged too."""
    ids, matched = drafter.head.lookup_propose_flagged(np.asarray(context, dtype=np.int32), k, drafter.lead)
    if len(ids) < k or all(matched):
        return ids, matched
    logits = drafter.head.logits().astype(np.float64)  # this proposal's draft-vocabulary logits
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    index = _vocab_index.get(drafter)
    if index is None:  # once per drafter (the bench holds one per configuration)
        index = _vocab_index[drafter] = {token: i for i, token in enumerate(drafter.head.vocab())}
    return ids, [m or (c in index and probs[index[c]] >= confidence) for c, m in zip(ids, matched)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s --confidence P [specee-pc bench arguments]")
    ap.add_argument("--confidence", type=float, required=True,
                    help="a head candidate with at least this probability counts as found by lookup")
    args, rest = ap.parse_known_args()
    if not 0.0 < args.confidence <= 1.0:
        sys.exit("--confidence is a probability in (0, 1]")
    if not any(a.startswith("--thresholds-unmatched") for a in rest):
        sys.exit("the gate acts through the unmatched bar: give --thresholds-unmatched (e.g. 1.0)")
    HeadLookupDrafter.propose_flagged = (
        lambda self, context, k: confident_flags(self, context, k, args.confidence))
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
