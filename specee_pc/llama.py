"""specee_pc.Llama: llama-cpp-python's Llama with specee-pc's native hook on its context.

Tokenizing, chat templates, sampling, stop strings and streaming are llama-cpp-python's own:
users' code written for `llama_cpp.Llama` runs unchanged.
"""
import contextlib
import ctypes
import time
from typing import Iterable, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp._utils import suppress_stdout_stderr

from .errors import ModelFileError
from .hook import LayerHook
from .model_file import open_weights
from .stats import GenerationStats


class Llama(llama_cpp.Llama):
    """A `llama_cpp.Llama` (same arguments and methods) that specee-pc can observe layer by layer.

    Extra API: `weights` (final norm and LM-head rows read from the GGUF), `capture_layers()`
    and `hidden_state()` (residual stream after a layer, last token of the last decode step),
    and `last_stats` (timing of the last generation).
    """

    def __init__(self, model_path: str, *, verbose: bool = True, **kwargs):
        # our own checks first: llama.cpp would only say "failed to load model"
        self.weights = open_weights(model_path)
        try:
            super().__init__(model_path=model_path, verbose=verbose, **kwargs)
        except ValueError as e:
            raise ModelFileError(f"{model_path}: llama.cpp cannot load it ({e})") from None
        self._check_same_model()
        self._hook = LayerHook(self.weights.n_layer, self.weights.n_embd)
        self._recreate_context_with_hook()
        self._check_graph_names()
        self.last_stats: Optional[GenerationStats] = None

    # ------------------------------------------------------------------ setup

    def _check_same_model(self) -> None:
        ours = (self.weights.n_layer, self.weights.n_embd, self.weights.n_vocab)
        theirs = (llama_cpp.llama_model_n_layer(self._model.model), self._model.n_embd(), self._model.n_vocab())
        if ours != theirs:
            raise ModelFileError(f"{self.model_path}: GGUF metadata (n_layer, n_embd, n_vocab) = {ours} "
                                 f"but llama.cpp loaded {theirs}")

    def _recreate_context_with_hook(self) -> None:
        """Replace the context llama_cpp.Llama made by one whose params carry our eval callback.

        The callback can only be given at context creation, and llama_cpp.Llama creates its
        context inside __init__; the first one is freed before the second is allocated.
        """
        self._ctx.close()
        self._hook.install(self.context_params)
        # the hook is released after the context: ExitStack unwinds in reverse order
        self._stack.callback(lambda hook=self._hook: None)
        with suppress_stdout_stderr(disable=self.verbose):
            self._ctx = self._stack.enter_context(contextlib.closing(
                internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)))
        if self._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise RuntimeError(f"failed to set LoRA adapter {self.lora_path} on the hooked context")

    def _check_graph_names(self) -> None:
        """Decode one token and check that the graph names every layer's output l_out-<i>.

        specee-pc finds layers by these tensor names; a llama.cpp or architecture that
        names them otherwise must fail here, not silently skip every exit later.
        """
        self._hook.begin_step()
        self._batch.set_batch(batch=[self.token_bos() if self.token_bos() >= 0 else 0], n_past=0, logits_all=False)
        self._ctx.decode(self._batch)
        self._ctx.kv_cache_clear()
        missing = sorted(set(range(self.weights.n_layer)) - set(self._hook.seen_layers()))
        if missing:
            raise ModelFileError(f"{self.model_path}: llama.cpp's graph for architecture '{self.weights.arch}' has no "
                                 f"tensors l_out-<i> for layers {missing[:8]}: specee-pc cannot hook this model")

    def close(self) -> None:
        # a constructor that failed on a bad file never reached llama_cpp.Llama.__init__
        if hasattr(self, "_stack"):
            super().close()

    # ------------------------------------------------------------------ observation

    def capture_layers(self, layers: Iterable[int]) -> None:
        """Keep the hidden state of these layers at every decode step (replaces the previous set)."""
        self._hook.set_capture(layers)

    def hidden_state(self, layer: int) -> np.ndarray:
        """Residual stream after `layer` for the last token of the last decode step."""
        return self._hook.hidden(layer)

    # ------------------------------------------------------------------ decoding

    def eval(self, tokens: Sequence[int]):
        self._hook.begin_step()
        super().eval(tokens)

    def generate(self, tokens: Sequence[int], **kwargs):
        """llama_cpp.Llama.generate, recording per-token timing in `last_stats`."""
        stats = self.last_stats = GenerationStats(prompt_tokens=len(tokens))
        start = time.perf_counter()
        inner = super().generate(tokens, **kwargs)
        try:
            reply = None
            while True:
                try:
                    token = inner.send(reply)
                except StopIteration:
                    return
                stats.token_times.append(time.perf_counter() - start)
                reply = yield token
        finally:
            inner.close()
