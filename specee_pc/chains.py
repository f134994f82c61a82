"""Chain drafters for speculative decoding: each proposes the next few tokens after a context.

A chain drafter's draft(context, control) returns a Draft: tokens, the drafter's confidence in
each (what acceptance is tracked by), and which drafter made them. Drafters that read the
target's hidden states (the EAGLE head) also take set_features / prefill / reset, the feeding
interface specee_pc.Llama drives after every decode.
"""
import time
from dataclasses import dataclass, field
from typing import List, Protocol

import numpy as np

from . import _native
from .control import SpeculationControl
from .drafters import HeadDrafter, check_lookup_options, open_draft_model, sync_draft_context


@dataclass
class Draft:
    source: str                                            # "lookup", "head" or "model"
    tokens: List[int] = field(default_factory=list)
    confidence: List[float] = field(default_factory=list)  # lookup: match length; head, model: probability


class ChainDrafter(Protocol):
    name: str

    def draft(self, context: np.ndarray, control: SpeculationControl) -> List[Draft]:
        """Drafts for the tokens after context (int32, every accepted token, ending with the
        token the round's batch starts with), as many as control says are worth it; one chain
        per way of drafting (the control picks which one a round verifies)."""


class LookupChain:
    """Prompt lookup (llama.cpp's ngram-simple): what followed the latest earlier occurrence of the
    context's longest suffix n-gram, min_ngram..max_ngram tokens long. Costs microseconds."""

    name = "lookup"

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, search_window: int = 1024):
        check_lookup_options(max_ngram, search_window)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("prompt lookup needs 1 <= min_ngram <= max_ngram")
        self.min_ngram, self.max_ngram, self.search_window = min_ngram, max_ngram, search_window

    def draft(self, context: np.ndarray, control: SpeculationControl) -> List[Draft]:
        return [self.chain(context, control)]

    def chain(self, context: np.ndarray, control: SpeculationControl) -> Draft:
        tokens, match = _native.lookup_continuation(context[-self.search_window:], self.min_ngram, self.max_ngram,
                                                    max(2, self.search_window), max(1, control.max_drafts))
        return Draft("lookup", tokens, [float(match)] * len(tokens))


class HeadChain(HeadDrafter):
    """The predictor file's EAGLE-1 head drafting a chain (each draft reads the head's own predicted
    feature), as far as its tracked acceptance makes worth verifying."""

    name = "head"

    def draft(self, context: np.ndarray, control: SpeculationControl) -> List[Draft]:
        n, _ = control.plan("head")
        return [self.chain(context, n, control)] if n > 0 else []

    def chain(self, context: np.ndarray, n: int, control: SpeculationControl) -> Draft:
        start = time.perf_counter()
        tokens, probs = self.head.draft(context, n)
        control.observe_draft("head", len(tokens), (time.perf_counter() - start) * 1e3)
        return Draft("head", tokens, [float(p) for p in probs])


class HeadLookupChain(HeadChain):
    """Prompt lookup's chain, and the head's where its tracked acceptance promises more tokens per
    ms than lookup's (the head costs a row per draft, lookup nothing): the control verifies the
    better of the two by their drafts' own confidences."""

    name = "head+lookup"

    def __init__(self, *args, lookup: LookupChain = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lookup = lookup or LookupChain()

    def draft(self, context: np.ndarray, control: SpeculationControl) -> List[Draft]:
        found = self.lookup.chain(context, control)
        n_head, head_rate = control.plan("head")
        if n_head <= 0 or (found.tokens and control.rate("lookup", found.confidence)[1] >= head_rate > 0):
            return [found]
        return [found, self.chain(context, n_head, control)]


class DraftModelChain:
    """A smaller GGUF model sharing the target's vocabulary drafts greedily, in a context of its own
    that follows the target's by prefix (llama.cpp's examples/speculative)."""

    name = "model"

    def __init__(self, path: str, *, target_vocab: int, n_ctx: int, n_threads: int, n_gpu_layers: int = 0):
        self.model = open_draft_model(path, target_vocab=target_vocab, n_ctx=n_ctx, n_threads=n_threads,
                                      n_gpu_layers=n_gpu_layers)

    def draft(self, context: np.ndarray, control: SpeculationControl) -> List[Draft]:
        n, _ = control.plan("model")
        if n <= 0:
            return []
        out = Draft("model")
        start = time.perf_counter()
        logits = sync_draft_context(self.model, context)
        while True:
            token = int(np.argmax(logits))
            shifted = np.exp(logits - logits[token])
            out.tokens.append(token)
            out.confidence.append(float(1.0 / shifted.sum()))
            if len(out.tokens) == n or self.model.n_tokens + 1 >= self.model.n_ctx():
                break
            self.model.eval([token])
            logits = np.ctypeslib.as_array(self.model._ctx.get_logits_ith(-1), shape=(self.model.n_vocab(),))
        control.observe_draft("model", len(out.tokens), (time.perf_counter() - start) * 1e3)
        return [out]

    def close(self) -> None:
        self.model.close()



