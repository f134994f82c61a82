"""The oracle bound of early exit: how fast could a perfect predictor make a decode step?

From calibration records, the oracle exit layer of a step is the earliest layer from which the
token is settled and is a candidate (training.oracle_exit_layers); the bound is the full step's
time over the mean time of steps cut at those layers, each timed here with forced exits (layers
0..e, less the exit decision, plus one full LM head). Exit decisions and KV repair are not in it.
"""
import contextlib
import statistics
import time

import numpy as np

from .llama import Llama

TIMING_PROMPT = "Write a detailed essay about the history of the Roman Empire."


@contextlib.contextmanager
def timing_model(path: str, threads: int, **llama_kwargs):
    """A Llama whose exits are forced (force_exits picks the layers), for timing cut steps."""
    llm = Llama(path, n_ctx=1024, n_threads=threads, verbose=False, force_exit_layers=[0], kv_policy="mask",
                **llama_kwargs)
    try:
        yield llm
    finally:
        llm.close()


def step_ms_by_exit_layer(path: str, threads: int, n_tokens: int = 32, runs: int = 3, **llama_kwargs) -> np.ndarray:
    """ms of a decode step cut after each layer plus one full LM head; the last entry is the full step."""
    with timing_model(path, threads, **llama_kwargs) as llm:
        return _step_ms(llm, threads, n_tokens, runs)


def _decode_ms(llm: Llama, layers, n_tokens: int, runs: int) -> float:
    """Median ms per step in llama_decode with exits forced at `layers` (sampling and exit
    decisions left out)."""
    llm.force_exits(layers)
    per_run = []
    for _ in range(runs):
        llm.create_completion(TIMING_PROMPT, max_tokens=n_tokens, temperature=0.0)
        s = llm.exit_stats
        if s.steps:  # a generation that ended at once has no decode step to time
            per_run.append((s.first_pass_ms - s.predictor_ms) / s.steps)
    return statistics.median(per_run)


def _step_ms(llm: Llama, threads: int, n_tokens: int, runs: int) -> np.ndarray:
    n_layer = llm.weights.n_layer
    times = np.zeros(n_layer)
    times[n_layer - 1] = _decode_ms(llm, [], n_tokens, runs)
    weights = llm.weights
    z = weights.final_norm(np.random.default_rng(0).normal(size=weights.n_embd).astype(np.float32))
    lm_head = []
    for _ in range(50):
        start = time.perf_counter()
        weights.lm_head_logits(z, threads)
        lm_head.append((time.perf_counter() - start) * 1e3)
    lm_head_ms = statistics.median(lm_head)
    for layer in range(n_layer - 1):
        times[layer] = _decode_ms(llm, [layer], n_tokens, runs) + lm_head_ms
    return times


def layer_ms_of(llm: Llama, n_tokens: int = 32, runs: int = 3) -> float:
    """ms of one target layer in a decode step of a timing model: the slope of step time between
    exits forced after the first and after the second-to-last layer."""
    n_layer = llm.weights.n_layer
    first = _decode_ms(llm, [0], n_tokens, runs)
    return (_decode_ms(llm, [n_layer - 2], n_tokens, runs) - first) / (n_layer - 2)


def speed_bound(exit_layers: np.ndarray, step_ms: np.ndarray) -> float:
    """Full step time over the mean time of steps cut at these layers (n_layer - 1: no exit)."""
    return float(step_ms[-1] / step_ms[exit_layers].mean()) if len(exit_layers) else 1.0


def oracle_exits(path: str, drafter, prompts, n_new: int, k: int = 4, threads: int = 2, n_ctx: int = 2048,
                 **llama_kwargs) -> np.ndarray:
    """Oracle exit layers of every decode step of greedy generations on `prompts` (calibration
    Prompt objects), with this drafter's candidates."""
    import tempfile

    from .calibration import collect
    from .training import oracle_exit_layers

    llm = Llama(path, n_ctx=n_ctx, n_threads=threads, verbose=False, **llama_kwargs)
    llm.feed_hidden_states(drafter)  # a draft head reads the target's hidden states
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            records = collect(llm, drafter, prompts, work_dir, n_new, k, "oracle records")
    finally:
        llm.close()
    return oracle_exit_layers(records)
