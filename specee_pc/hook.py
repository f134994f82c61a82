"""The native eval-callback hook, attached to a llama.cpp context through its params."""
import ctypes
from typing import Iterable, List

import llama_cpp
import numpy as np

from . import _native


class LayerHook:
    """Owns a native hook that copies the hidden state of chosen layers during llama_decode.

    It must outlive every context it is installed on: llama.cpp keeps raw pointers to it.
    """

    def __init__(self, n_layer: int, n_embd: int):
        self.n_layer = n_layer
        self._native = _native.Hook(n_layer, n_embd)
        # a ctypes function object wrapping the native address: no Python runs per node
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._native.callback_address)

    def install(self, context_params: llama_cpp.llama_context_params) -> None:
        """Make contexts created from these params call the hook while computing graphs."""
        context_params.cb_eval = self._callback
        context_params.cb_eval_user_data = ctypes.c_void_p(self._native.user_data_address)

    def set_capture(self, layers: Iterable[int]) -> None:
        self._native.set_capture(sorted(set(int(il) for il in layers)))

    def set_row_capture(self, layer: int) -> None:
        """Keep every output row of `layer` (-1: none) in each step; see rows()."""
        self._native.set_row_capture(layer)

    def rows(self) -> np.ndarray:
        """The row-capture layer's output rows [n, n_embd] in the last step, in batch order (the last
        layer has rows only for tokens whose output was requested; none after a cut)."""
        return self._native.rows()

    def begin_step(self, position: int = -1) -> None:
        """Before llama_decode; position: the batch's last token (a cut leaves it as a KV hole)."""
        self._native.begin_step(position)

    def set_masking(self, on: bool) -> None:
        """Record a KV hole at each cut and hide it from deeper layers in later steps."""
        self._native.set_masking(on)

    def prune_holes(self, n_pos: int) -> None:
        """Forget holes at positions >= n_pos: they are leaving the KV cache."""
        self._native.prune_holes(n_pos)

    @property
    def n_holes(self) -> int:
        return self._native.n_holes

    def hidden(self, layer: int) -> np.ndarray:
        return self._native.hidden(layer)

    def set_exit(self, controller, armed: bool = False) -> None:
        """Attach a native ExitController (None detaches); while armed, it may cut the graph."""
        self._native.set_exit(controller, armed)

    def seen_layers(self) -> List[int]:
        return self._native.seen_layers()
