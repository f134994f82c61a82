"""Is each configuration's greedy output the full model's? Lossless configurations (specee's exact
policy, speculative decoding) must give vanilla's output; where one does not, the check tells a
bug from llama.cpp's batch-shape numerics (SPEC §3) by replaying the same batches."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import llama_cpp
import numpy as np

from .runs import Run, exited_tokens, first_divergence, greedy_matches, next_logits, replay_matches


@dataclass
class OutputCheck:
    config: str
    prompt: str
    identical: bool
    first_divergence: Optional[int]   # None when identical
    reference_tokens: int             # length of vanilla's output
    logit_gap: Optional[float] = None  # full model's logit of its token minus ours, at the divergence
    replay_identical: Optional[bool] = None  # specee exact: same-batch replay gives our output
    tokens: int = 0                   # length of our output
    greedy_agreeing: Optional[int] = None  # lossy: our tokens that are the full model's greedy token
                                           # after our own prefix
    wrong_exits: Optional[int] = None      # lossy: of the others, those an exit emitted (the rest were
                                           # decoded at full depth, off through earlier exits' KV holes)

    @property
    def verdict(self) -> str:
        if self.identical:
            return "identical"
        gap = f"; full-model logit gap {self.logit_gap:.3f}" if self.logit_gap is not None else ""
        if self.replay_identical is False:
            return f"WRONG: differs from llama-cpp-python decoding the same batches (position {self.first_divergence})"
        if self.replay_identical:
            return f"batch-shape numerics: the same-batch replay is identical{gap}"
        return f"differs at position {self.first_divergence}{gap}"


def check_outputs(configs, runs: Sequence[Run], prompt_tokens: Dict[str, List[int]], vanilla: llama_cpp.Llama,
                  replay: Optional[llama_cpp.Llama]) -> List[OutputCheck]:
    """Each configuration's first-repetition output on each prompt against vanilla's.

    vanilla: a llama_cpp.Llama on the target (for logit gaps); replay: one built with a draft
    model (so it keeps all logits) and the configurations' layer placement, used to replay specee
    exact runs and to judge lossy outputs step by step (None: neither)."""
    from tqdm import tqdm

    first = {(r.config, r.prompt): r for r in runs if r.rep == 0}
    reference = {prompt: first[("vanilla", prompt)].tokens for prompt in prompt_tokens}
    rows: Dict[tuple, np.ndarray] = {}  # configurations often part from vanilla at the same near-tie

    def logit_gap(prompt: str, ours: List[int], at: int) -> Optional[float]:
        """The full model's logit of its own token minus ours at the first divergence (small: a
        near-tie that batch-shape numerics can flip); None where one output just ended."""
        theirs = reference[prompt]
        if at >= len(theirs) or at >= len(ours):
            return None
        if (prompt, at) not in rows:
            rows[(prompt, at)] = next_logits(vanilla, list(prompt_tokens[prompt]) + theirs[:at])
        row = rows[(prompt, at)]
        return float(row[theirs[at]] - row[ours[at]])

    checks = []
    pairs = [(config, prompt, tokens) for config in configs if config.name != "vanilla"
             for prompt, tokens in prompt_tokens.items()]
    for config, prompt, tokens in tqdm(pairs, desc="checking outputs", unit="output"):
        run = first[(config.name, prompt)]
        at = first_divergence(run.tokens, reference[prompt])
        check = OutputCheck(config.name, prompt, at is None, at, len(reference[prompt]), tokens=len(run.tokens))
        if not config.lossless and replay is not None:
            matches = greedy_matches(replay, tokens, run.tokens)
            check.greedy_agreeing = int(matches.sum())
            check.wrong_exits = int((exited_tokens(run.exits_at, len(tokens), len(run.tokens)) & ~matches).sum())
        if at is not None:
            check.logit_gap = logit_gap(prompt, run.tokens, at)
            if config.kind in ("specee", "spec") and config.lossless and replay is not None:
                check.replay_identical = replay_matches(replay, run, tokens)
        checks.append(check)
    return checks
