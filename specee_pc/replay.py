"""The reference for the exact policy: llama-cpp-python's own speculative decoding, drafting at
each position where the engine exited the engine's exit token. It runs the very batches the
exact policy ran, so its output must equal the engine's token for token (llama.cpp's logits for
a token alone and in a 2-token batch differ slightly, so one-token decoding is no such reference).
"""
import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel


class ReplayExits(LlamaDraftModel):
    def __init__(self, exits_at):
        """exits_at: ExitStats.exits_at of the engine's generation, (position, layer, token)."""
        self.by_position = {position: token for position, _, token in exits_at}

    def __call__(self, input_ids, **kwargs):
        position = len(input_ids) - 1
        return np.array([self.by_position[position]] if position in self.by_position else [], dtype=np.intc)
