"""The peers specee-pc is measured against: llama-cpp-python's own decoding, plain and speculative."""
from typing import Sequence

import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel

from ..drafters import open_draft_model, sync_draft_context


class GreedyDraftModel(LlamaDraftModel):
    """Speculative decoding with a draft model, as llama.cpp's examples/speculative does it: a smaller
    GGUF model sharing the vocabulary drafts `num_pred_tokens` tokens greedily; llama_cpp.Llama
    (draft_model=...) verifies them in one batch and keeps the agreeing prefix, so the output is
    the target's own."""

    def __init__(self, path: str, *, target_vocab: int, num_pred_tokens: int = 4, n_ctx: int = 2048,
                 n_threads: int = 2, n_gpu_layers: int = 0):
        self.model = open_draft_model(path, target_vocab=target_vocab, n_ctx=n_ctx, n_threads=n_threads,
                                      n_gpu_layers=n_gpu_layers)
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids: Sequence[int], **kwargs) -> np.ndarray:
        logits = sync_draft_context(self.model, input_ids)
        drafted = []
        while True:
            drafted.append(int(np.argmax(logits)))
            if len(drafted) == self.num_pred_tokens or self.model.n_tokens + 1 >= self.model.n_ctx():
                return np.array(drafted, dtype=np.intc)
            self.model.eval([drafted[-1]])
            logits = np.ctypeslib.as_array(self.model._ctx.get_logits_ith(-1), shape=(self.model.n_vocab(),))
