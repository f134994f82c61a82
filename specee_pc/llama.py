"""specee_pc.Llama: llama-cpp-python's Llama with specee-pc's native hook on its context.

Tokenizing, chat templates, sampling, stop strings and streaming are llama-cpp-python's own:
users' code written for `llama_cpp.Llama` runs unchanged.
"""
import contextlib
import ctypes
import time
import warnings
from dataclasses import fields
from typing import Callable, Iterable, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_tokenizer import LlamaTokenizer

from . import control as control_mod
from .chains import DraftModelChain, HeadChain, HeadLookupChain, LookupChain
from .control import BatchCosts, SpeculationControl, SpeculationStats
from .cpu_backend import AMX_FIX, has_amx_store
from .decode import speculative_generate
from .default_model import shipped_predictor_path
from .drafters import HEAD_DRAFTERS, DraftModelDrafter, Drafter, NgramDrafter
from .engine import ExitEngine, ExitStats
from .errors import ModelFileError
from .hook import LayerHook
from .model_file import open_weights
from .offload import offload_first_layers
from .options import DecodeOptions, ModelOptions
from .predictor_file import PredictorFile, read_predictor_file
from .runtime import Target
from .stats import GenerationStats


DECODE_FIELDS = tuple(f.name for f in fields(DecodeOptions))


class Llama(llama_cpp.Llama):
    """A `llama_cpp.Llama` (same arguments and methods) that specee-pc can observe layer by layer.

    How it decodes is a `DecodeOptions` (specee_pc.options: every option, its meaning and its
    checks), given as `options=` or as its fields' keyword arguments, which override it:
        speculate          lossless speculative decoding with this chain drafter ("auto",
                           "head+lookup", "head", "lookup", or a draft model .gguf); off by default
        predictor          early exit with this predictor file (path, PredictorFile, or "auto":
                           the one shipped for this model); with speculation, its draft head
        exit_rule, exit_threshold, exit_threshold_unmatched, kv_policy, drafter,
        offline_layers, online_offsets, force_exit_layers, draft, draft_max, draft_length
    Neither speculate nor predictor: llama-cpp-python's plain decoding. With speculation on, early
    exit is off. `configure()` changes the options later.

    Offload: `offload_first_layers=True` puts the first `n_gpu_layers` layers and the LM head on
    the GPU and the rest on the CPU (SpecEE's reversed offload: exits skip the CPU layers);
    llama.cpp's default offloads the last layers.

    Extra API: `weights` (final norm and LM-head rows read from the GGUF), `capture_layers()`
    and `hidden_state()` (residual stream after a layer, last token of the last decode step),
    `last_stats` (timing of the last generation), `exit_stats` (its early exits),
    `speculation_stats` (its rounds) and `on_generation_end` (called after each generation).
    """

    def __init__(self, model_path: str, *, verbose: bool = True, options: Optional[DecodeOptions] = None,
                 offload_first_layers: bool = False, **kwargs):
        # the loading options specee-pc's commands set are checked as theirs are (None: llama_cpp's default)
        ModelOptions(**{name: kwargs[name] for name in ("n_ctx", "n_threads", "n_gpu_layers")
                        if kwargs.get(name) is not None})
        decode = {name: kwargs.pop(name) for name in DECODE_FIELDS if name in kwargs}
        options = (options or DecodeOptions()).replace(**decode)
        # our own checks first: llama.cpp would only say "failed to load model"
        self.weights = open_weights(model_path)
        n_gpu_layers = kwargs.get("n_gpu_layers", 0)
        self._draft_gpu_layers = n_gpu_layers  # a draft model goes where the target's layers go
        # without a GPU there is nothing to place (and overrides to the plain CPU buffer type
        # would only turn llama.cpp's repacked CPU kernels off)
        reverse = (offload_first_layers and 0 < n_gpu_layers < self.weights.n_layer
                   and llama_cpp.llama_supports_gpu_offload())
        amx = has_amx_store()  # its kernels crash: the weights stay out of its store
        if amx:
            warnings.warn(f"llama.cpp was built with AMX kernels, which crash in this version: loading the "
                          f"model without repacked weights (possibly slower); to avoid it: {AMX_FIX}",
                          RuntimeWarning, stacklevel=2)
        if reverse or amx:
            kwargs["n_gpu_layers"] = 0  # loaded again below with the layers placed
        try:
            super().__init__(model_path=model_path, verbose=verbose, **kwargs)
            if reverse or amx:
                self._reload_model(n_gpu_layers, first_layers_on_gpu=reverse, extra_buffer_types=not amx)
        except ValueError as e:
            raise ModelFileError(f"{model_path}: llama.cpp cannot load it ({e})") from None
        self._check_same_model()
        self._hook = LayerHook(self.weights.n_layer, self.weights.n_embd)
        self._recreate_context_with_hook()
        self._check_graph_names()
        self.last_stats: Optional[GenerationStats] = None
        self._engine: Optional[ExitEngine] = None
        self._owned_drafter = None  # a draft model this object loaded (closed with it)
        self._feature_sink = None   # who gets the target's last hidden states after each decode
        self._decoding = False  # prompt processing never exits
        self._speculation = None  # (chain drafter, control) while speculative decoding is on
        self._owned_chain = None  # a draft model speculation loaded (closed with it)
        self.speculation_stats: Optional[SpeculationStats] = None
        self.options = DecodeOptions()
        self.on_generation_end: Optional[Callable[["Llama"], None]] = None
        self.configure(options)

    # ------------------------------------------------------------------ setup

    def _check_same_model(self) -> None:
        ours = (self.weights.n_layer, self.weights.n_embd, self.weights.n_vocab)
        theirs = (llama_cpp.llama_model_n_layer(self._model.model), self._model.n_embd(), self._model.n_vocab())
        if ours != theirs:
            raise ModelFileError(f"{self.model_path}: GGUF metadata (n_layer, n_embd, n_vocab) = {ours} "
                                 f"but llama.cpp loaded {theirs}")

    def _reload_model(self, n_gpu_layers: int, first_layers_on_gpu: bool, extra_buffer_types: bool) -> None:
        """Load the model again, n_gpu_layers on the GPU, with what llama_cpp.Llama cannot pass:
        SpecEE's reversed offload (the first layers on the GPU, by tensor buffer-type overrides)
        and the extra buffer types switch. The first load was CPU-only: mapped, so cheap, except
        on an AMX build, which repacked the weights once."""
        self._ctx.close()
        self._model.close()
        overrides = None
        if first_layers_on_gpu:
            overrides = offload_first_layers(self.model_params, self.weights.n_layer, n_gpu_layers)
        else:  # as llama_cpp.Llama sets it
            self.model_params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
        self.model_params.use_extra_bufts = extra_buffer_types
        with suppress_stdout_stderr(disable=self.verbose):
            self._model = self._stack.enter_context(contextlib.closing(
                internals.LlamaModel(path_model=self.model_path, params=self.model_params, verbose=self.verbose)))
        self.model_params.tensor_buft_overrides = None  # read during the load only
        del overrides
        if type(self.tokenizer_) is LlamaTokenizer:  # it holds the model it was made with
            self.tokenizer_ = LlamaTokenizer(self)

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
        self._hook.begin_step(0)
        self._batch.set_batch(batch=[self.token_bos() if self.token_bos() >= 0 else 0], n_past=0, logits_all=False)
        self._ctx.decode(self._batch)
        self._ctx.kv_cache_clear()
        missing = sorted(set(range(self.weights.n_layer)) - set(self._hook.seen_layers()))
        if missing:
            raise ModelFileError(f"{self.model_path}: llama.cpp's graph for architecture '{self.weights.arch}' has no "
                                 f"tensors l_out-<i> for layers {missing[:8]}: specee-pc cannot hook this model")

    def close(self) -> None:
        for name in ("_owned_drafter", "_owned_chain"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        # a constructor that failed on a bad file never reached llama_cpp.Llama.__init__
        if hasattr(self, "_stack"):
            super().close()

    # ------------------------------------------------------------------ early exit

    def configure(self, options: Optional[DecodeOptions] = None, **changes) -> None:
        """Decode the next generations with these options, or the current ones with `changes`:
        speculation, early exit or plain, as options.mode says. The new configuration is built and
        checked first: on an error the current one stays."""
        options = (options or self.options).replace(**changes)
        if options.mode == "speculate":
            self._configure_speculation(options)
        else:
            self._configure_exits(options if options.mode == "exit" else None)
        self.options = options

    def configure_exits(self, **options) -> None:
        """Early exit with these DecodeOptions fields, the others at their defaults (no predictor and
        no forced layers: plain decoding)."""
        self.configure(DecodeOptions(**options))

    def configure_speculation(self, drafter: Optional[str] = "auto", **options) -> None:
        """Lossless speculative decoding with this chain drafter and these DecodeOptions fields, the
        others at their defaults, the predictor "auto" (drafter None or "none": plain decoding)."""
        if drafter in (None, "none"):
            self.configure(DecodeOptions())
            return
        options.setdefault("predictor", "auto")
        self.configure(DecodeOptions(speculate=drafter, **options))

    def _configure_exits(self, options: Optional[DecodeOptions]) -> None:
        """Early exit as options say (None: off)."""
        options = options or DecodeOptions()
        predictor, drafter, kv_policy = options.predictor, options.exit_drafter, options.kv_policy
        force_exit_layers = options.force_exit_layers
        if predictor == "auto":
            predictor = shipped_predictor_path(self.weights)
        engine, owned = None, None
        if predictor is not None or force_exit_layers:
            if kv_policy == "mask" and self._sliding_window_layers():
                raise ValueError("kv_policy 'mask' does not handle sliding-window attention (two KQ masks, other "
                                 "cell numbering): use kv_policy 'exact' with this model")
            if isinstance(predictor, str):
                path, predictor = predictor, read_predictor_file(predictor)
                predictor.check_model(self.weights, path, self.model_path)
            has_head = isinstance(predictor, PredictorFile) and predictor.head is not None
            if drafter == "auto":
                drafter = predictor.trained_drafter() if isinstance(predictor, PredictorFile) else "ngram"
            if isinstance(drafter, str) and drafter in HEAD_DRAFTERS:
                if not has_head:
                    raise ValueError(f"drafter {drafter!r}: the predictor file carries no draft head "
                                     "(calibrate with --head)")
                if not predictor.path:
                    raise ValueError(f"drafter {drafter!r}: the head is loaded from its file; "
                                     "pass the predictor's path")
                drafter = HEAD_DRAFTERS[drafter](predictor.path, self.weights, n_ctx=self._n_ctx,
                                                 n_threads=self.n_threads, gpu=self._draft_gpu_layers != 0)
            elif drafter == "ngram":
                drafter = NgramDrafter()
            elif isinstance(drafter, str):  # a draft model's path (options checked the rest)
                drafter = owned = DraftModelDrafter(drafter, target_vocab=self.weights.n_vocab, n_ctx=self._n_ctx,
                                                    n_threads=self.n_threads, n_gpu_layers=self._draft_gpu_layers)
            # one thread: the exit decision runs inside the eval callback while ggml's own CPU
            # workers spin-wait, so a second thread of ours only competes with them (measured)
            engine = ExitEngine(self.weights, self._hook, n_threads=1, drafter=drafter,
                                predictors=predictor, rule=options.exit_rule, threshold=options.exit_threshold,
                                threshold_unmatched=options.exit_threshold_unmatched,
                                kv_policy=kv_policy, force_exit_layers=force_exit_layers,
                                offline_layers=options.offline_layers, online_offsets=options.online_offsets)
        if engine is not None:
            self._stop_speculation()
        if self._hook.n_holes:
            # cached positions with holes are only valid under masking: start from an empty cache
            self._ctx.kv_cache_clear()
            self.n_tokens = 0
        self._hook.set_masking(engine is not None and kv_policy == "mask")
        self._hook.set_exit(engine.controller if engine else None)
        self._engine = engine
        if self._owned_drafter is not None:
            self._owned_drafter.close()
        self._owned_drafter = owned
        self.feed_hidden_states(engine.drafter if engine else None)

    # ------------------------------------------------------------------ speculative decoding

    def _configure_speculation(self, options: DecodeOptions) -> None:
        """Speculative decoding as options say; early exit off. The first time for a model, thread
        count and offload, the cost of a decode batch of 1..draft_max+1 tokens is measured (about a
        second) and cached in the user's cache directory. "auto" takes the predictor file's draft
        head (merged with prompt lookup) only where those costs let a head pay, else prompt lookup
        alone."""
        drafter, draft_max = options.chain_drafter, options.draft_max
        predictor = "auto" if options.predictor is None else options.predictor
        name, path, head = self._chain_source(drafter, predictor)
        priors = control_mod.HeadPriors.of(head)
        self._configure_exits(None)
        self._stop_speculation()
        costs = self._batch_costs(draft_max + 1)
        # auto: a head only where it can pay here (a head row costs about a target layer and a half;
        # its features make prompt processing compute every row's logits)
        if drafter == "auto" and name != "lookup" and \
                control_mod.head_gain(costs, 1.5 * costs(1) / self.weights.n_layer, priors) <= 0.01:
            name = "lookup"
        chain = self._open_chain(name, path)
        self._owned_chain = chain if isinstance(chain, DraftModelChain) else None
        self._speculation = (chain, SpeculationControl(costs, fixed_length=options.draft_length,
                                                       head=priors))
        self.feed_hidden_states(chain)

    def _chain_source(self, drafter: str, predictor):
        """(chain drafter name, the predictor file with its head or the draft model path, the head's
        HeadWeights or None) for the drafter asked for; checked before anything changes."""
        if drafter in ("auto", "head", "head+lookup"):
            path = shipped_predictor_path(self.weights) if predictor == "auto" else predictor
            predictor_file = None
            if path is not None:
                predictor_file = read_predictor_file(path)
                predictor_file.check_model(self.weights, path, self.model_path)
            has_head = predictor_file is not None and predictor_file.head is not None
            if drafter == "auto":
                return ("head+lookup" if has_head else "lookup"), path, predictor_file.head if has_head else None
            if not has_head:
                raise ValueError(f"speculation with {drafter!r} needs a predictor file with a draft head for this "
                                 "model (calibrate --head), or use 'lookup'")
            return drafter, path, predictor_file.head
        if drafter == "lookup":
            return drafter, None, None
        return "model", drafter, None  # a draft model's path (options checked the rest)

    def _open_chain(self, name: str, path: Optional[str]):
        if name == "lookup":
            return LookupChain()
        if name == "model":
            return DraftModelChain(path, target_vocab=self.weights.n_vocab, n_ctx=self._n_ctx,
                                   n_threads=self.n_threads, n_gpu_layers=self._draft_gpu_layers)
        kind = HeadLookupChain if name == "head+lookup" else HeadChain
        return kind(path, self.weights, n_ctx=self._n_ctx, n_threads=self.n_threads, gpu=self._draft_gpu_layers != 0)

    def _stop_speculation(self) -> None:
        if self._speculation is not None and self._feature_sink is self._speculation[0]:
            self.feed_hidden_states(None)
        self._speculation = None
        if self._owned_chain is not None:
            self._owned_chain.close()
            self._owned_chain = None

    def _batch_costs(self, k_max: int) -> BatchCosts:
        """B(k) for this model, thread count and offload: from the cache, else measured here."""
        key = control_mod.cost_key(self.model_path, self.n_threads, self._draft_gpu_layers, k_max)
        cached = control_mod.load_cached_costs(key)
        if cached is not None and len(cached) == k_max:
            return BatchCosts(cached, source="cache")
        self.feed_hidden_states(None)  # no drafter reads these dummy positions
        target, prefix = Target(self), 16
        token = max(self.token_bos(), 0)
        self.reset()
        self._ctx.kv_cache_clear()
        target.decode([token] * prefix)

        def decode_batch(k: int) -> None:
            target.truncate(prefix)
            target.decode([token] * k)

        def clear() -> None:
            self._ctx.kv_cache_clear()
            self.n_tokens = 0

        ms = control_mod.measure_batch_costs(decode_batch, clear, k_max)
        control_mod.store_cached_costs(key, ms)
        return BatchCosts(ms)

    @property
    def speculation_control(self) -> Optional[SpeculationControl]:
        """Batch costs and tracked acceptance behind speculation's choices (None when it is off)."""
        return self._speculation[1] if self._speculation else None

    @property
    def speculation_drafter(self):
        return self._speculation[0] if self._speculation else None

    def feed_hidden_states(self, sink) -> None:
        """After every decode, hand the target's residual stream at its last computed layer (the
        last, or the exit layer) to sink.set_features(position, rows); None, or an object without
        set_features (a drafter that reads no hidden states), stops. While a sink is
        set, prompts are decoded with an output for every token, so that every position has one,
        and a sink with a prefill(tokens) method is handed the context after each prompt batch
        (a draft head runs its prompt rows then, as prompt processing, not in the first step)."""
        if not hasattr(sink, "set_features"):
            sink = None
        if sink is not None and sink is not self._feature_sink:
            # positions already cached were never fed to this sink: decode them again
            self._ctx.kv_cache_clear()
            self.n_tokens = 0
        self._feature_sink = sink
        self._hook.set_row_capture(self.weights.n_layer - 1 if sink is not None else -1)

    def _sliding_window_layers(self) -> bool:
        return any(key.endswith(".attention.sliding_window") for key in self.metadata)

    def force_exits(self, layers: Sequence[int]) -> None:
        """Debug: from the next decode step on, exit at the first of these layers that a step
        reaches (an empty list stops forcing); keeps the cache, unlike configure_exits."""
        if self._engine is None:
            raise ValueError("early exit is off: configure_exits() first")
        self._engine.set_forced(layers)

    @property
    def exit_drafter(self) -> Optional[Drafter]:
        """The drafter proposing the exit candidates (None when early exit is off)."""
        return self._engine.drafter if self._engine else None

    @property
    def exit_stats(self) -> Optional[ExitStats]:
        """Early exits of the last generation (None when early exit is off)."""
        return self._engine.stats if self._engine else None

    def reset_exit_stats(self) -> None:
        """Start exit_stats and the online exit schedule afresh (generate() does this itself;
        decode_step() accumulates)."""
        if self._engine is not None:
            self._engine.reset_stats()

    # ------------------------------------------------------------------ observation

    def capture_layers(self, layers: Iterable[int]) -> None:
        """Keep the hidden state of these layers at every decode step (replaces the previous set)."""
        self._hook.set_capture(layers)

    def hidden_state(self, layer: int) -> np.ndarray:
        """Residual stream after `layer` for the last token of the last decode step."""
        return self._hook.hidden(layer)

    def output_logits(self, n_rows: int) -> np.ndarray:
        """The last decode batch's logits, [n_rows, n_vocab] (a view; valid until the next decode)."""
        return np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n_rows * self._n_vocab,)).reshape(n_rows, -1)

    # ------------------------------------------------------------------ decoding

    def eval(self, tokens: Sequence[int]):
        # an exit re-runs its token with the exit token: both must fit (llama_cpp's own buffers
        # hold the n_ctx asked for, llama.cpp's context may be padded beyond it)
        room = min(self._n_ctx, len(self.input_ids)) - self.n_tokens
        self._hook.prune_holes(self.n_tokens)  # eval overwrites positions from n_tokens on
        if self._engine is not None and self._decoding and tokens:
            self._engine.settle(self.input_ids, self.n_tokens, tokens[0])
        # the 2-token repair batch must fit llama_cpp's batch too
        if self._engine is None or not self._decoding or len(tokens) != 1 or room < 2 or self.n_batch < 2:
            # a fed sink needs every position's state: every token's output then
            self._eval_batches(tokens, all_logits=self._feature_sink is not None)
            if len(tokens) > 1 and hasattr(self._feature_sink, "prefill"):
                self._feature_sink.prefill(self.input_ids[:self.n_tokens])
            return
        t = self.n_tokens
        try:
            self._eval_with_exit(tokens[0])
        except BaseException:
            # an exit step is all or nothing: leave the cache as before it (an interrupt between
            # the cut and the repair would otherwise leave stale cells and stale logits)
            self._ctx.kv_cache_seq_rm(-1, t, -1)
            self._hook.prune_holes(t)
            self.n_tokens = t
            self._requires_eval = True
            raise

    def _eval_batches(self, tokens: Sequence[int], all_logits: bool) -> None:
        """llama_cpp's eval (n_batch tokens per decode), through _decode_at."""
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i:i + self.n_batch]
            self._hook.begin_step(self.n_tokens + len(batch) - 1)
            self._decode_at(self.n_tokens, batch, all_logits)

    def _eval_with_exit(self, token: int) -> None:
        """One decode step that may stop after a scheduled layer."""
        t = self.n_tokens
        self._ctx.kv_cache_seq_rm(-1, t, -1)
        self.input_ids[t] = token  # the drafter sees the context as a view, no per-step copy
        self._engine.arm(self.input_ids[:t + 1])
        self._hook.begin_step(t)
        start = time.perf_counter()
        try:
            self._decode_at(t, [token], all_logits=False)
        finally:
            step = self._engine.disarm()
        stats = self._engine.stats
        stats.first_pass_ms += (time.perf_counter() - start) * 1e3
        if step["exit_layer"] < 0:
            return
        if self._engine.kv_policy == "mask":
            # llama.cpp left stale logits behind the cut: the sampler must see the exit layer's
            self._set_last_logits(self._engine.controller.logits())
            if self._feature_sink is not None:  # the exit layer's state stands in for the last layer's
                self._feature_sink.set_features(t, self._hook.hidden(step["exit_layer"])[None])
            return
        # Layers after the exit never saw this token (their K/V cells are stale), and the exit
        # token is only a guess: re-run the token in full together with its exit token. The
        # batch's logits verify the guess (llama_cpp's generate samples the first row and rolls
        # back on a mismatch) and, when it holds, give the next token's logits for free.
        start = time.perf_counter()
        self._ctx.kv_cache_seq_rm(-1, t, -1)
        self._hook.begin_step(t + 1)
        self._decode_at(t, [token, step["exit_token"]], all_logits=True)
        stats.repair_ms += (time.perf_counter() - start) * 1e3

    def decode_step(self, token: int) -> np.ndarray:
        """Decode one token as a generation step does (so it may exit early) and return the logits a
        sampler would see for the next token: teacher forcing with early exit, for evaluation.

        The context keeps exactly this token: an exact-policy exit token is dropped again."""
        t = self.n_tokens
        self._decoding = True
        try:
            self.eval([token])
        finally:
            self._decoding = False
        repaired = self.n_tokens == t + 2  # the exact policy's repair batch: its first row is ours
        logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(0 if repaired else -1), shape=(self._n_vocab,)).copy()
        if repaired:
            self.n_tokens = t + 1
            self._requires_eval = True  # llama.cpp's last logits follow the dropped exit token
        return logits

    def _generate_speculative(self, tokens: Sequence[int], reset: bool = True, stopping_criteria=None,
                              **sampling):
        """The speculative decode loop (decode.py) with the sampler llama_cpp's generate would build."""
        drafter, control = self._speculation
        self._mirostat_mu = ctypes.c_float(2.0 * sampling.get("mirostat_tau", 5.0))
        self._sampler = self._init_sampler(**sampling)
        prompt = list(tokens) if reset else list(self.input_ids[:self.n_tokens]) + list(tokens)
        self.speculation_stats = SpeculationStats()
        return speculative_generate(Target(self), drafter, control, prompt, self.speculation_stats,
                                    stop=stopping_criteria)

    def _check_grammar(self, grammar) -> None:
        """llama_cpp hands its sampler chain whatever llama.cpp makes of a grammar, and a grammar
        llama.cpp cannot parse makes none: the process would crash at the first sample."""
        sampler = llama_cpp.llama_sampler_init_grammar(self._model.vocab, grammar._grammar.encode("utf-8"),
                                                       grammar._root.encode("utf-8"))
        if not sampler:
            raise ValueError("grammar: llama.cpp cannot parse it (GBNF; its log says where)")
        llama_cpp.llama_sampler_free(sampler)

    def load_state(self, state) -> None:
        # a saved state knows nothing of the holes its cache may hold or lack
        if self._hook.n_holes or (self._engine is not None and self._engine.kv_policy == "mask"):
            raise ValueError("load_state is not supported with kv_policy 'mask'")
        super().load_state(state)
        if self._feature_sink is not None:
            # nor of hidden states: a draft head proposes nothing for this context rather than
            # draft from another sequence's states
            self._feature_sink.reset()

    def _set_last_logits(self, logits: np.ndarray) -> None:
        """Write logits where llama.cpp's (and so llama_cpp's) samplers read the last token's."""
        np.ctypeslib.as_array(self._ctx.get_logits_ith(-1), shape=(self._n_vocab,))[:] = logits
        if self._logits_all:
            self.scores[self.n_tokens - 1, :] = logits

    def _decode_at(self, n_past: int, tokens: Sequence[int], all_logits: bool) -> None:
        """llama_decode tokens at positions n_past..., keeping llama_cpp.Llama's bookkeeping."""
        n = len(tokens)
        self._batch.set_batch(batch=tokens, n_past=n_past, logits_all=all_logits or self._logits_all)
        self._ctx.decode(self._batch)
        self.input_ids[n_past:n_past + n] = tokens
        if self._logits_all:
            rows = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n * self._n_vocab,))
            self.scores[n_past:n_past + n, :].reshape(-1)[::] = rows
        self.n_tokens = n_past + n
        self._requires_eval = False
        if self._feature_sink is not None:
            # the last layer's rows are the batch's outputs, its last tokens (none after a cut)
            rows = self._hook.rows()
            if len(rows):
                self._feature_sink.set_features(n_past + n - len(rows), rows)

    def generate(self, tokens: Sequence[int], **kwargs):
        """llama_cpp.Llama.generate (speculative when configured), recording per-token timing in
        `last_stats` and speculation's rounds in `speculation_stats`."""
        if kwargs.get("grammar") is not None:
            self._check_grammar(kwargs["grammar"])
        stats = self.last_stats = GenerationStats(prompt_tokens=len(tokens))
        if self._engine is not None:
            self._engine.reset_stats()
        start = time.perf_counter()
        # a logits processor reads llama_cpp's own token buffer as it samples: plain decoding then
        if self._speculation is not None and kwargs.get("logits_processor") is None:
            inner = self._generate_speculative(tokens, **kwargs)
        else:
            inner = super().generate(tokens, **kwargs)
        try:
            reply = None
            while True:
                try:
                    token = inner.send(reply)
                except StopIteration:
                    return
                stats.token_times.append(time.perf_counter() - start)
                self._decoding = True
                reply = yield token
        finally:
            self._decoding = False
            inner.close()
            if self.on_generation_end is not None:
                self.on_generation_end(self)
