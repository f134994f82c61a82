"""Candidate drafters: each proposes k token ids for the token the next step will output."""
from typing import List, Protocol, Sequence, Tuple

import numpy as np

from . import _native


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> List[int]:
        """Up to k distinct candidate ids for the token after `context`, most likely first.

        `context` is every accepted token so far (prompt and output), ending with the token
        being decoded; a drafter with state of its own syncs it from there.
        """


def propose_flagged(drafter: Drafter, context: Sequence[int], k: int) -> Tuple[List[int], List[bool]]:
    """The drafter's candidates and whether prompt lookup found each in the context: as the
    drafter reports it when it ran lookup itself (its `propose_flagged`), else from a lookup here."""
    if hasattr(drafter, "propose_flagged"):
        return drafter.propose_flagged(context, k)
    candidates = drafter.propose(context, k)
    found = lookup_matches(context, k)
    return candidates, [c in found for c in candidates]


def check_lookup_options(max_ngram: int, search_window: int) -> None:
    if max_ngram < 1 or search_window < 1:
        raise ValueError("prompt lookup needs max_ngram and search_window of at least 1")


def lookup_matches(context: Sequence[int], k: int, max_ngram: int = 3, search_window: int = 1024) -> List[int]:
    """Prompt lookup: up to k distinct tokens that followed earlier occurrences of the context's
    last n-gram, longer n-grams first, more recent occurrences first, down to the last token alone."""
    check_lookup_options(max_ngram, search_window)
    return _native.lookup_matches(np.asarray(context[-search_window:], dtype=np.int32), k, max_ngram, search_window)


class NgramDrafter:
    """Prompt lookup (`lookup_matches`); the predictors need exactly k candidates, so the most
    frequent tokens of the window fill the rest. Costs microseconds; good on inputs that repeat
    (code, summaries)."""

    def __init__(self, max_ngram: int = 3, search_window: int = 1024):
        check_lookup_options(max_ngram, search_window)
        self.max_ngram = max_ngram
        self.search_window = search_window

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        found = lookup_matches(context, k, self.max_ngram, self.search_window)
        return found + self.frequent(context, k - len(found), found)

    def propose_flagged(self, context: Sequence[int], k: int) -> Tuple[List[int], List[bool]]:
        """The candidates, and which of them lookup found (the rest are frequent tokens)."""
        found = lookup_matches(context, k, self.max_ngram, self.search_window)
        fill = self.frequent(context, k - len(found), found)
        return found + fill, [True] * len(found) + [False] * len(fill)

    def frequent(self, context: Sequence[int], n: int, taken: List[int]) -> List[int]:
        """Up to n of the window's most frequent tokens not in taken (ties: the earliest first)."""
        if n <= 0:
            return []
        tokens, first, counts = np.unique(np.asarray(context[-self.search_window:]), return_index=True,
                                          return_counts=True)
        fill = []
        for token in tokens[np.lexsort((first, -counts))]:
            if len(fill) == n:
                break
            if token not in taken:
                fill.append(int(token))
        return fill


def open_draft_model(path: str, *, target_vocab: int, n_ctx: int, n_threads: int, n_gpu_layers: int = 0):
    """A llama_cpp.Llama on a draft GGUF model, checked to share the target's vocabulary."""
    import llama_cpp

    from .cpu_backend import check_plain_llama_cpp
    from .model_file import open_weights

    weights = open_weights(path)  # one-line errors for missing or broken files
    check_plain_llama_cpp("a draft model")
    if weights.n_vocab != target_vocab:
        raise ValueError(f"{path}: draft model has a vocabulary of {weights.n_vocab} tokens, "
                         f"the target {target_vocab}: they must share one")
    return llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=False)


def sync_draft_context(model, context: Sequence[int]) -> np.ndarray:
    """Bring a draft model's KV cache to `context` by prefix and return its logits after context[-1].

    Decodes only the tokens it has not seen, after dropping what the target rolled back.
    """
    seen = model.input_ids[:model.n_tokens]
    common = 0
    limit = min(len(seen), len(context) - 1)  # re-decode at least the last token: its logits
    while common < limit and seen[common] == context[common]:
        common += 1
    model.n_tokens = common
    model.eval(list(context[common:]))  # eval drops cache positions >= n_tokens first
    return np.ctypeslib.as_array(model._ctx.get_logits_ith(-1), shape=(model.n_vocab(),))


class DraftModelDrafter:
    """Top-k of a smaller GGUF model that shares the target's vocabulary, in its own context
    that follows the target's by prefix."""

    def __init__(self, path: str, *, target_vocab: int, n_ctx: int = 2048, n_threads: int = 2,
                 n_gpu_layers: int = 0):
        self.model = open_draft_model(path, target_vocab=target_vocab, n_ctx=n_ctx, n_threads=n_threads,
                                      n_gpu_layers=n_gpu_layers)

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        logits = sync_draft_context(self.model, context)
        top = np.argpartition(logits, -k)[-k:]
        return [int(t) for t in top[np.argsort(-logits[top])]]

    def close(self) -> None:
        self.model.close()


class HeadDrafter:
    """Top-k of the EAGLE-1 draft head a predictor file carries (native, ggml), fed with the
    target's hidden states: Llama hands them over after every decode (`set_features`)."""

    def __init__(self, predictor_path: str, weights, *, n_ctx: int, n_threads: int = 1, gpu: bool = False):
        self.head = _native.DraftHead(predictor_path, weights, n_ctx, n_threads, gpu)

    def set_features(self, position: int, hidden: np.ndarray) -> None:
        """The target's residual stream [n, n_embd] (before its final norm) at position, position+1, ..."""
        self.head.set_features(position, hidden)

    def reset(self) -> None:
        """Forget every hidden state: the target's cache was replaced (a loaded state)."""
        self.head.reset()

    def prefill(self, context: Sequence[int]) -> None:
        """After a prompt: run the rows its tokens determine now (prompt processing), so the
        first proposal runs one row like every later one."""
        self.head.prefill(np.asarray(context, dtype=np.int32))

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        return self.head.propose(np.asarray(context, dtype=np.int32), k)


class HeadLookupDrafter(HeadDrafter):
    """The head's top 2, then prompt-lookup matches, then the head's next candidates: lookup
    catches the repeats of the context that the head misses (on SmolLM2's held-out calibration
    steps the greedy token is among these 4 in 69% of steps, among the head's own 4 in 53%)."""

    lead = 2

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        # one native call: Python's share of this, on the caches a target step leaves, was 0.03-0.05 ms
        # (empty when there are no hidden states for this position: nothing to draft from)
        return self.head.lookup_propose(np.asarray(context, dtype=np.int32), k, self.lead)

    def propose_flagged(self, context: Sequence[int], k: int) -> Tuple[List[int], List[bool]]:
        """The candidates and which of them lookup found, from the same native call."""
        return self.head.lookup_propose_flagged(np.asarray(context, dtype=np.int32), k, self.lead)


HEAD_DRAFTERS = {"head": HeadDrafter, "head+lookup": HeadLookupDrafter}  # the drafters a file's head runs
