"""Candidate drafters: each proposes k token ids for the token the next step will output."""
from collections import Counter
from typing import List, Protocol, Sequence


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> List[int]:
        """Up to k distinct candidate ids for the token after `context`, most likely first.

        `context` is every accepted token so far (prompt and output), ending with the token
        being decoded; a drafter with state of its own syncs it from there.
        """


class NgramDrafter:
    """Prompt lookup: the tokens that followed earlier occurrences of the context's last n-gram.

    Longer n-grams first, more recent occurrences first, down to the last token alone; the
    predictors need exactly k candidates, so the most frequent tokens of the window fill the
    rest. Costs microseconds; good on inputs that repeat (code, summaries).
    """

    def __init__(self, max_ngram: int = 3, search_window: int = 1024):
        self.max_ngram = max_ngram
        self.search_window = search_window

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        tail = list(context[-self.search_window:])
        found: List[int] = []
        for n in range(min(self.max_ngram, len(tail) - 1), 0, -1):
            pattern = tail[-n:]
            for start in range(len(tail) - n - 1, -1, -1):
                if tail[start:start + n] == pattern:
                    follower = tail[start + n]
                    if follower not in found:
                        found.append(follower)
                        if len(found) == k:
                            return found
        for token, _ in Counter(tail).most_common():
            if len(found) == k:
                break
            if token not in found:
                found.append(token)
        return found
