"""Cost-aware speculation control: how many drafts a round verifies.

A round verifies g drafts in one batch of g + 1 tokens. With conditional acceptance a_i (draft
i is accepted given drafts 1..i-1 were), the round yields E(g) = 1 + a_1 + a_1 a_2 + ... tokens
for the batch's cost B(g + 1) plus what drafting cost. The controller picks the g that
maximises E(g) / time, where g = 0 is plain decoding (one token for B(1)). B(k) is measured
on this machine at load (cached per model, threads, offload and llama.cpp version) and kept up
to date from the rounds themselves; acceptance is tracked per drafter, chain position and the
draft's own confidence bucket (the head's probability, lookup's match length).
"""
import hashlib
import json
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CACHE_VERSION = 1


# ---------------------------------------------------------------- batch costs


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "specee-pc")


def cost_key(model_path: str, n_threads: int, n_gpu_layers: int, k_max: int) -> str:
    import llama_cpp

    st = os.stat(model_path)
    ident = f"{os.path.realpath(model_path)}|{st.st_size}|{int(st.st_mtime)}"
    return (f"{hashlib.sha1(ident.encode()).hexdigest()[:16]}|threads={n_threads}|ngl={n_gpu_layers}"
            f"|llama_cpp={llama_cpp.__version__}|k={k_max}|v{CACHE_VERSION}")


@dataclass
class BatchCosts:
    """Milliseconds of one target decode batch of k tokens (all rows' logits), k = 1..len(ms), as
    measured at load, times `scale`: how much dearer batches are now (a longer context, a busier
    machine). Rounds update the scale, not single entries: plain steps are most rounds, and
    following B(1) alone would make every longer batch look cheaper as the context grows."""

    ms: List[float]
    source: str = "measured"  # "measured" now, or "cache"
    scale: float = 1.0

    @property
    def k_max(self) -> int:
        return len(self.ms)

    def __call__(self, k: int) -> float:
        return self.ms[min(k, self.k_max) - 1] * self.scale

    def relative(self) -> List[float]:
        """c(k) = B(k) / B(1)."""
        return [m / self.ms[0] for m in self.ms]

    def observe(self, k: int, ms: float, weight: float = 0.05) -> None:
        """Follow the machine: a verification batch of k tokens took ms (an outlier moves it little)."""
        if 1 <= k <= self.k_max:
            ratio = min(max(ms / self.ms[k - 1], self.scale / 3), 3 * self.scale)
            self.scale += weight * (ratio - self.scale)

    def summary(self) -> str:
        return (f"B(1) {self(1):.1f} ms, c(k) " + " ".join(f"{c:.2f}" for c in self.relative()[1:])
                + f" for k = 2..{self.k_max}")


def measure_batch_costs(decode_batch, clear, k_max: int, budget_s: float = 1.0) -> List[float]:
    """Median ms of decode_batch(k) for k = 1..k_max, interleaved, within about budget_s.

    decode_batch(k) decodes k tokens after a fixed prefix and undoes them; clear() empties the
    cache afterwards. One untimed pass first (first-touch costs), then passes until the budget."""
    decode_batch(k_max)
    times: List[List[float]] = [[] for _ in range(k_max)]
    start = time.perf_counter()
    while True:
        for k in range(1, k_max + 1):
            t0 = time.perf_counter()
            decode_batch(k)
            times[k - 1].append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - start
        n = len(times[0])
        if n >= 7 or (n >= 2 and elapsed * (n + 1) / n > budget_s):
            break
    clear()
    ms = [statistics.median(t) for t in times]
    # a batch of more tokens never costs less: noise must not make the controller prefer one
    for k in range(1, k_max):
        ms[k] = max(ms[k], ms[k - 1])
    return ms


def load_cached_costs(key: str) -> Optional[List[float]]:
    try:
        with open(os.path.join(cache_dir(), "batch-costs.json")) as f:
            entry = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    if isinstance(entry, list) and entry and all(isinstance(x, (int, float)) and x > 0 for x in entry):
        return [float(x) for x in entry]
    return None


def store_cached_costs(key: str, ms: Sequence[float]) -> None:
    """Best effort (a read-only home must not stop decoding); written atomically."""
    path = os.path.join(cache_dir(), "batch-costs.json")
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        try:
            with open(path) as f:
                entries = json.load(f)
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = [round(float(x), 4) for x in ms]
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


# ---------------------------------------------------------------- acceptance


HEAD_BUCKETS = (0.2, 0.4, 0.6, 0.8)  # head probability: 5 buckets
MAX_TRACKED_POSITION = 4             # positions 4 and later share statistics
PRIOR_WEIGHT = 4.0                   # pseudo-observations behind a prior


def confidence_bucket(source: str, confidence: float) -> int:
    if source == "lookup":  # match length 1, 2, 3, 4+
        return min(int(confidence), 4) - 1 if confidence >= 1 else 0
    if source == "head" or source == "model":
        return sum(confidence >= b for b in HEAD_BUCKETS)
    return 0


@dataclass
class HeadPriors:
    """A draft head's acceptance measured on held-out prompts when it was trained, stored with it
    (predictor_file.HeadWeights): by chain position, and by position and probability bucket."""

    acceptance: np.ndarray         # [P]
    bucket_acceptance: np.ndarray  # [P, len(HEAD_BUCKETS) + 1]
    bucket_share: np.ndarray       # [P, len(HEAD_BUCKETS) + 1]

    @staticmethod
    def of(head) -> Optional["HeadPriors"]:
        """The priors of a HeadWeights (None for a head trained before they were measured)."""
        if head is None or head.acceptance is None or \
                np.shape(head.bucket_acceptance) != (len(head.acceptance), len(HEAD_BUCKETS) + 1):
            return None
        return HeadPriors(np.clip(head.acceptance, 0.01, 0.99), np.clip(head.bucket_acceptance, 0.01, 0.99),
                          np.asarray(head.bucket_share))

    def at(self, position: int, bucket: Optional[int] = None) -> float:
        row = min(position, len(self.acceptance)) - 1
        return float(self.acceptance[row] if bucket is None else self.bucket_acceptance[row, bucket])

    def profile(self):
        """(share, acceptance) of each probability bucket of the first draft (head_gain's profile)."""
        return tuple((float(f), float(a)) for f, a in zip(self.bucket_share[0], self.bucket_acceptance[0]))


def prior_acceptance(source: str, bucket: int, position: int, head: Optional[HeadPriors] = None) -> float:
    """Where tracking starts: for a head, what was measured when it was trained (`head`), else
    (docs/speculation.md: measured on SmolLM2's held-out prompts) a head's or draft model's
    probability is about its acceptance; lookup's first draft is accepted more often the longer
    its match, and once one holds, the next ones mostly do."""
    if source == "head" and head is not None:
        return head.at(position, bucket)
    if source == "lookup":
        return (0.17, 0.42, 0.75, 0.8)[bucket] if position == 1 else (0.6, 0.67, 0.8, 0.85)[bucket]
    return (0.1, 0.2, 0.4, 0.6, 0.85)[bucket]


@dataclass
class AcceptanceTracker:
    """Accepted/verified counts per (drafter, chain position, confidence bucket), each cell
    starting from a prior; only drafts whose predecessors were all accepted are counted."""

    cells: Dict[Tuple[str, int, int], List[float]] = field(default_factory=dict)
    head: Optional[HeadPriors] = None

    def _cell(self, source: str, position: int, bucket: int) -> List[float]:
        key = (source, min(position, MAX_TRACKED_POSITION), bucket)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = [prior_acceptance(source, bucket, key[1], self.head) * PRIOR_WEIGHT,
                                      PRIOR_WEIGHT]
        return cell

    def estimate(self, source: str, position: int, confidence: float) -> float:
        accepted, seen = self._cell(source, position, confidence_bucket(source, confidence))
        return accepted / seen

    def mean(self, source: str, position: int) -> float:
        """Acceptance at a position over all confidences, weighted by what was seen."""
        cells = [c for (s, p, _), c in self.cells.items() if s == source and p == min(position, MAX_TRACKED_POSITION)]
        if not cells:
            if source == "head" and self.head is not None:
                return self.head.at(position)
            return prior_acceptance(source, 1, position)
        return sum(c[0] for c in cells) / sum(c[1] for c in cells)

    def record(self, source: str, confidences: Sequence[float], n_accepted: int) -> None:
        for i, confidence in enumerate(confidences[:n_accepted + 1]):
            cell = self._cell(source, i + 1, confidence_bucket(source, confidence))
            cell[0] += i < n_accepted
            cell[1] += 1


# ---------------------------------------------------------------- the choice


def expected_tokens(acceptance: Sequence[float]) -> List[float]:
    """E(g) for g = 0..len(acceptance): tokens a round yields verifying the first g drafts."""
    out, run, total = [1.0], 1.0, 1.0
    for a in acceptance:
        run *= a
        total += run
        out.append(total)
    return out


def best_length(acceptance: Sequence[float], costs: BatchCosts, draft_ms: float = 0.0, margin: float = 1.0) -> int:
    """The g in 0..len(acceptance) with the most expected tokens per ms; 0 when nothing pays.

    draft_ms: what drafting cost (spent whatever g is; a round that verifies no draft would
    have been a plain step without it); margin: how much more than a plain step's rate drafting
    must promise."""
    expected = expected_tokens(acceptance[:costs.k_max - 1])
    best, best_rate = 0, margin / costs(1)
    for g in range(1, len(expected)):
        rate = expected[g] / (costs(g + 1) + draft_ms)
        if rate > best_rate:
            best, best_rate = g, rate
    return best


# A draft head's first draft by its probability bucket (HEAD_BUCKETS): how often the bucket
# comes and how often its draft is accepted (docs/speculation.md: SmolLM2's shipped head on
# held-out prompts; a calibrated head's probability is about its acceptance).
HEAD_PROFILE = ((0.35, 0.10), (0.32, 0.19), (0.15, 0.37), (0.11, 0.59), (0.07, 0.82))


def head_gain(costs: BatchCosts, row_ms: float, priors: Optional[HeadPriors] = None) -> float:
    """Expected tokens per ms with a draft head over plain decoding's, minus one: every round
    runs at least one head row (to know its confidence), and rounds whose drafts promise more
    verify the best chain of them. With the head's measured priors, its first draft by bucket and
    the later positions' acceptance; without, HEAD_PROFILE and later drafts as likely as the first."""
    profile = priors.profile() if priors is not None else HEAD_PROFILE
    later = [priors.at(p) for p in range(2, costs.k_max)] if priors is not None else None
    tokens = ms = 0.0
    for freq, a in profile:
        best_tokens, best_ms = 1.0, costs(1) + row_ms
        expected = expected_tokens([a] + (later if later is not None else [a] * (costs.k_max - 2)))
        for g in range(1, len(expected)):
            t = costs(g + 1) + g * row_ms
            if expected[g] / t > best_tokens / best_ms:
                best_tokens, best_ms = expected[g], t
        tokens += freq * best_tokens
        ms += freq * best_ms
    return tokens / ms * costs(1) - 1.0


@dataclass
class SpeculationStats:
    """Rounds of one generation: what was drafted, accepted and what it cost."""

    rounds: int = 0
    tokens: int = 0                  # tokens emitted by rounds (the prompt's first token apart)
    drafted: int = 0                 # drafts verified
    accepted: int = 0
    gammas: Dict[int, int] = field(default_factory=dict)             # drafts verified per round -> rounds
    sources: Dict[str, int] = field(default_factory=dict)            # drafter of each round that drafted
    by_position: List[List[int]] = field(default_factory=list)       # [accepted, verified] per chain position
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    prefill_ms: float = 0.0
    prefill_tokens: int = 0
    rounds_at: List[Tuple[int, List[int]]] = field(default_factory=list)  # (position of t, drafts verified)

    def record_round(self, source: str, verified: Sequence[int], n_accepted: int) -> None:
        g = len(verified)
        self.rounds += 1
        self.gammas[g] = self.gammas.get(g, 0) + 1
        if g:
            self.sources[source] = self.sources.get(source, 0) + 1
        self.drafted += g
        self.accepted += n_accepted
        for i in range(min(g, n_accepted + 1)):
            while len(self.by_position) <= i:
                self.by_position.append([0, 0])
            self.by_position[i][0] += i < n_accepted
            self.by_position[i][1] += 1

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def acceptance_by_position(self) -> List[float]:
        return [a / n if n else 0.0 for a, n in self.by_position]

    def summary(self) -> str:
        gammas = " ".join(f"{g}:{n}" for g, n in sorted(self.gammas.items()))
        positions = " ".join(f"{a:.2f}" for a in self.acceptance_by_position())
        return (f"{self.tokens_per_round:.2f} tokens/round, acceptance {self.acceptance:.0%}"
                f" (by position {positions or '-'}), drafts per round {gammas or '-'}")


class SpeculationControl:
    """What the decode loop asks each round: how far to draft with a drafter, how many of the
    drafts to verify; and what it tells afterwards (batch times, acceptance, drafting times)."""

    PROBE_EVERY = 16  # a drafter not worth running is still run every this many rounds, to follow it
    # drafting must promise this much more than a plain step: a round verifies the draft estimated
    # best, so its estimate errs high more often than low
    MARGIN = 1.05

    def __init__(self, costs: BatchCosts, fixed_length: Optional[int] = None, head: Optional[HeadPriors] = None):
        self.costs = costs
        self.tracker = AcceptanceTracker(head=head)
        self.fixed_length = fixed_length     # verify exactly this many drafts when there are as many
        self.draft_ms: Dict[str, float] = {}  # per draft token, per drafter (followed as they run)
        self.rounds = 0
        # drafts not yet scored: (position of the token before them, drafter, tokens, confidences)
        self._pending: deque = deque()

    @property
    def max_drafts(self) -> int:
        return self.fixed_length if self.fixed_length is not None else self.costs.k_max - 1

    def plan(self, source: str) -> Tuple[int, float]:
        """(drafts worth asking for, expected tokens per ms) from the drafter's average acceptance;
        every PROBE_EVERY rounds at least the longest chain, so that acceptance is followed."""
        if self.fixed_length is not None:
            return self.fixed_length, 0.0
        if self.rounds % self.PROBE_EVERY == 0:
            return self.max_drafts, 0.0
        per_token = self.draft_ms.get(source, 0.0)
        acceptance = [self.tracker.mean(source, i + 1) for i in range(self.max_drafts)]
        expected = expected_tokens(acceptance)
        best, best_rate = 0, self.MARGIN / self.costs(1)
        for g in range(1, len(expected)):
            rate = expected[g] / (self.costs(g + 1) + g * per_token)
            if rate > best_rate:
                best, best_rate = g, rate
        return best, best_rate

    def rate(self, source: str, confidences: Sequence[float]) -> Tuple[int, float]:
        """(drafts to verify, expected tokens per ms) for drafts already made, from their confidences."""
        acceptance = [self.tracker.estimate(source, i + 1, c) for i, c in enumerate(confidences)]
        g = best_length(acceptance, self.costs, margin=self.MARGIN)
        return g, expected_tokens(acceptance)[g] / self.costs(g + 1)

    def choose(self, drafts: Sequence) -> Tuple[int, int]:
        """(index of the draft to verify, how many of its tokens) among a round's drafts (objects
        with source, confidence); (-1, 0): plain decoding pays best."""
        best, best_g, best_rate = -1, 0, self.MARGIN / self.costs(1)
        for i, d in enumerate(drafts):
            if not d.confidence:
                continue
            if self.fixed_length is not None:
                return i, min(self.fixed_length, len(d.confidence))
            g, rate = self.rate(d.source, d.confidence)
            if g > 0 and rate > best_rate:
                best, best_g, best_rate = i, g, rate
        return best, best_g

    def begin(self) -> None:
        """A new generation: drafts of the last one are no longer scored."""
        self._pending.clear()

    def observe_draft(self, source: str, n: int, ms: float) -> None:
        if n > 0:
            old = self.draft_ms.get(source)
            per = ms / n
            self.draft_ms[source] = per if old is None else old + 0.1 * (per - old)

    def drafted(self, position: int, source: str, tokens: Sequence[int], confidences: Sequence[float]) -> None:
        """Drafts made after the token at position (verified or not: each is scored against the
        tokens decoding emits there, which are the same either way)."""
        if tokens:
            self._pending.append((position, source, list(tokens), list(confidences)))

    def score(self, context) -> None:
        """Score the drafts whose outcome context (every token known so far) now settles."""
        n = len(context)
        while self._pending:
            position, source, tokens, confidences = self._pending[0]
            known = min(len(tokens), n - position - 1)
            accepted = 0
            while accepted < known and context[position + 1 + accepted] == tokens[accepted]:
                accepted += 1
            if accepted == known and known < len(tokens):
                break  # undecided: wait for more tokens (later drafts start later)
            self._pending.popleft()
            self.tracker.record(source, confidences, accepted)

    def observe_round(self, k: int, ms: float) -> None:
        """A verification batch of k tokens took ms."""
        self.rounds += 1
        self.costs.observe(k, ms)
