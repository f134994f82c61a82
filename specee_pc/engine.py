"""The early-exit engine: per-step setup of the native exit controller, and its statistics.

The decode mechanics (batches, KV repair) are in llama.py; this module decides what a step
checks (candidates, layers) and accounts for what happened.
"""
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from . import _native
from .drafters import Drafter, propose_flagged
from .predictor_file import PredictorFile
from .schedule import ExitSchedule

NATIVE_RULES = {"verify": _native.RULE_VERIFY, "candidates": _native.RULE_CANDIDATES}


@dataclass
class ExitStats:
    """Decode steps of one generation: how many exited, where, and what the decision cost."""

    n_layer: int
    steps: int = 0
    exits: int = 0
    accepted: int = 0          # exit tokens that the full model confirmed
    layers_used: int = 0       # layers computed by first passes (the exit layer + 1, or n_layer)
    checks: int = 0            # predictor evaluations
    lm_heads: int = 0          # full LM heads computed for exit decisions
    predictor_ms: float = 0.0  # features + MLPs + full LM heads of exit decisions
    drafter_ms: float = 0.0
    first_pass_ms: float = 0.0  # decodes that may stop early
    repair_ms: float = 0.0      # exact policy: full re-runs of exited tokens with their exit token
    candidate_steps: int = 0   # steps whose final token is known and that had candidates
    candidate_hits: int = 0    # ... whose emitted token was among the candidates (under "mask",
                               # an exit's token is one by construction)
    exits_at: List[Tuple[int, int, int]] = field(default_factory=list)  # (position, layer, exit token)

    @property
    def mean_layers(self) -> float:
        return self.layers_used / self.steps if self.steps else float(self.n_layer)

    @property
    def exit_ratio(self) -> float:
        return self.exits / self.steps if self.steps else 0.0

    def summary(self) -> str:
        hit = f", candidate hits {self.candidate_hits / self.candidate_steps:.0%}" if self.candidate_steps else ""
        steps = max(self.steps, 1)
        repair = f", repair {self.repair_ms / steps:.2f}" if self.repair_ms else ""
        confirmed = f" ({self.accepted} confirmed)" if self.repair_ms else ""
        return (f"mean layers {self.mean_layers:.1f}/{self.n_layer}, exits {self.exits}/{self.steps}{confirmed}{hit};"
                f" ms/step: first pass {self.first_pass_ms / steps:.2f}"
                f" (predictor {self.predictor_ms / steps:.2f}){repair}")


@dataclass
class _OpenStep:
    position: int            # position of the token this step decoded
    candidates: List[int]
    exited: bool


class ExitEngine:
    """Sets up each decode step of a hooked context and records what it did."""

    def __init__(self, weights, hook, *, n_threads: int, drafter: Drafter, predictors: Optional[PredictorFile],
                 rule: str = "verify", threshold: Optional[float] = None,
                 threshold_unmatched: Optional[float] = None, kv_policy: str = "exact",
                 force_exit_layers: Sequence[int] = (), offline_layers: Optional[Sequence[int]] = None,
                 online_offsets: Optional[Sequence[int]] = None):
        n_layer = self.n_layer = weights.n_layer
        self.kv_policy = kv_policy
        self.drafter = drafter
        self.k = predictors.k if predictors else 0
        self.controller = _native.ExitController(weights, n_threads)
        if predictors is not None:
            for il, p in predictors.layers.items():
                self.controller.set_predictor(il, p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias)
        if threshold is None:
            threshold = predictors.threshold if predictors else 0.5
        # candidates prompt lookup did not find in the context may be held to a stricter bar
        threshold_unmatched = threshold if threshold_unmatched is None else threshold_unmatched
        self.controller.set_rule(NATIVE_RULES[rule], threshold, threshold_unmatched)
        self.flags_matches = threshold_unmatched != threshold
        self.set_forced(force_exit_layers)
        offline = offline_layers if offline_layers is not None else (predictors.offline_layers if predictors else [])
        bad = [il for il in offline if not 0 <= il <= n_layer - 2]
        if bad:  # online layers that fall outside are dropped, but offline ones were asked for
            raise ValueError(f"offline layers must be in [0, {n_layer - 2}] (an exit after the last layer "
                             f"saves nothing), got {bad}")
        offsets = online_offsets if online_offsets is not None else (predictors.online_offsets if predictors else [])
        self.schedule = ExitSchedule(n_layer, offline, offsets)
        # a threshold a sigmoid never passes turns exits off: then do not score at all
        self.has_predictors = (predictors is not None and bool(predictors.layers)
                               and min(threshold, threshold_unmatched) < 1.0)
        self.hook = hook
        hook.set_exit(self.controller, False)
        self.stats = ExitStats(n_layer)
        self._open: Optional[_OpenStep] = None

    def set_forced(self, layers: Sequence[int]) -> None:
        bad = [il for il in layers if not 0 <= il <= self.n_layer - 2]
        if bad:
            raise ValueError(f"forced exit layers must be in [0, {self.n_layer - 2}], got {bad}")
        self.forced = list(layers)
        self.controller.set_forced(self.forced)

    def reset_stats(self) -> None:
        """A new generation: fresh statistics, and an online schedule built from its own exits only
        (so a generation's output does not depend on what was generated before)."""
        self.stats = ExitStats(self.n_layer)
        self.schedule.reset()
        self._open = None

    def settle(self, input_ids, n_tokens: int, next_token: int) -> None:
        """Account for the previous step now that its final token is known.

        That token sits at position+1: the exit token if the full model confirmed it (the
        context kept it), else the token sampled from the full logits, passed in now.
        """
        step, self._open = self._open, None
        if step is None or n_tokens < step.position + 1:
            return
        final = int(input_ids[step.position + 1]) if n_tokens >= step.position + 2 else next_token
        if step.exited:
            self.stats.accepted += n_tokens >= step.position + 2
        if step.candidates:
            self.stats.candidate_steps += 1
            self.stats.candidate_hits += final in step.candidates

    def arm(self, context: Sequence[int]) -> bool:
        """Choose candidates and layers for the step decoding context[-1]; True if it may exit."""
        start = time.perf_counter()
        candidates, matched = [], []
        if self.has_predictors:
            candidates, matched = (propose_flagged(self.drafter, context, self.k) if self.flags_matches
                                   else (self.drafter.propose(context, self.k), []))
        usable = len(candidates) == self.k
        self.stats.drafter_ms += (time.perf_counter() - start) * 1e3
        self.controller.set_candidates(candidates if usable else [], matched if usable else [])
        self.controller.set_schedule(self.schedule.layers() if usable else [])
        self._open = _OpenStep(len(context) - 1, candidates if usable else [], False)
        armed = usable or bool(self.forced)
        self.hook.set_exit(self.controller, armed)
        return armed

    def disarm(self) -> dict:
        """After the step's decode: stop deciding, record the step and return what happened."""
        self.hook.set_exit(self.controller, False)
        step = self.controller.step()
        exit_layer = step["exit_layer"]
        s = self.stats
        s.steps += 1
        s.checks += step["n_checks"]
        s.lm_heads += step["n_lm_heads"]
        s.predictor_ms += (step["predictor_us"] + step["lm_head_us"]) / 1e3
        s.layers_used += exit_layer + 1 if exit_layer >= 0 else s.n_layer
        if exit_layer >= 0:
            s.exits += 1
            s.exits_at.append((self._open.position, exit_layer, step["exit_token"]))
            self.schedule.record_exit(exit_layer)
            self._open.exited = True
        return step
