"""The reference for lossless decoding that batches several tokens: llama-cpp-python's own
speculative decoding, drafting at each position what specee-pc verified there (the exact
policy's exit token, a speculation round's chain). It runs the very batches specee-pc ran, so
its output must equal specee-pc's token for token (llama.cpp's logits for a token alone and in a
batch differ slightly, so one-token decoding is no such reference).
"""
import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel


class ReplayDrafts(LlamaDraftModel):
    def __init__(self, rounds_at):
        """rounds_at: SpeculationStats.rounds_at, (position of the batch's first token, drafts)."""
        self.by_position = {position: list(drafts) for position, drafts in rounds_at}

    def __call__(self, input_ids, **kwargs):
        return np.array(self.by_position.get(len(input_ids) - 1, []), dtype=np.intc)


class ReplayExits(ReplayDrafts):
    def __init__(self, exits_at):
        """exits_at: ExitStats.exits_at of the engine's generation, (position, layer, token)."""
        super().__init__([(position, [token]) for position, _, token in exits_at])
