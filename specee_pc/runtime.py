"""The decode loop's view of a specee_pc.Llama: the one place it touches llama_cpp.Llama's
private state (KV positions, token ids, the context's logits rows, the sampler)."""
import time
from typing import Sequence

import numpy as np


class Target:
    """Decodes batches on the target's context and samples from their rows, keeping
    llama_cpp.Llama's bookkeeping (n_tokens, input_ids) as its own generate() would."""

    def __init__(self, llm):
        self.llm = llm

    @property
    def n_tokens(self) -> int:
        """Positions the KV cache holds for the sequence (later cells are stale)."""
        return self.llm.n_tokens

    @property
    def n_ctx(self) -> int:
        return min(self.llm._n_ctx, len(self.llm.input_ids))

    def context(self, next_token: int) -> np.ndarray:
        """Every token so far and next_token (written at position n_tokens), as an int32 view."""
        n = self.llm.n_tokens
        self.llm.input_ids[n] = next_token
        return self.llm.input_ids[:n + 1]

    def keep_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the cached positions that start the prompt (at least one prompt token is left to
        decode: its logits are sampled) and return how many were kept."""
        llm = self.llm
        common = 0
        limit = min(llm.n_tokens, len(prompt) - 1)
        ids = llm.input_ids
        while common < limit and ids[common] == prompt[common]:
            common += 1
        self.truncate(common)
        return common

    def truncate(self, n: int) -> None:
        """Drop positions >= n from the KV cache."""
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, n, -1)
        llm.n_tokens = n
        llm._requires_eval = True  # the context's logits no longer follow its last token

    def prefill(self, tokens: Sequence[int]) -> float:
        """Decode a prompt after the kept prefix (n_batch tokens per batch); ms. A drafter fed with
        hidden states gets every position's (and runs its prompt rows) through the llama's feed."""
        start = time.perf_counter()
        self.llm.eval(list(tokens))
        return (time.perf_counter() - start) * 1e3

    def decode(self, tokens: Sequence[int]) -> float:
        """One batch at positions n_tokens.., every row's logits; ms."""
        llm = self.llm
        start = time.perf_counter()
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        llm._hook.begin_step(llm.n_tokens + len(tokens) - 1)
        llm._decode_at(llm.n_tokens, tokens, all_logits=True)
        return (time.perf_counter() - start) * 1e3

    def sample(self, row: int) -> int:
        """The user's sampler on logits row `row` of the last batch (-1: its last output row)."""
        return self.llm._sampler.sample(self.llm._ctx, row)

    def stops(self, stopping_criteria, row: int) -> bool:
        """llama_cpp's stopping criteria after sampling row `row` of the last batch, called as its
        generate() calls them: the ids up to the row's own token, the row's logits."""
        llm = self.llm
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(row), shape=(llm._n_vocab,))
        return bool(stopping_criteria(llm.input_ids[:llm.n_tokens], logits))

    def set_n_tokens(self, n: int) -> None:
        """Positions < n hold accepted tokens; those after are stale until the next batch overwrites them."""
        self.llm.n_tokens = n
        self.llm._requires_eval = True  # the context's last logits are a batch row's, maybe not n - 1's
