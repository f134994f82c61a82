"""The oracle bound of early exit: how fast could a perfect predictor make a decode step?

From calibration records, the oracle exit layer of a step is the earliest layer from which the
token is settled and is a candidate (training.oracle_exit_layers); the bound is the full step's
time over the mean time of steps cut at those layers, each timed here with forced exits (layers
0..e, less the exit decision, plus one full LM head). Exit decisions and KV repair are not in it.
"""
import statistics
import time

import numpy as np

from .llama import Llama

TIMING_PROMPT = "Write a detailed essay about the history of the Roman Empire."


def step_ms_by_exit_layer(path: str, threads: int, n_tokens: int = 32, runs: int = 3, **llama_kwargs) -> np.ndarray:
    """ms of a decode step cut after each layer plus one full LM head; the last entry is the full step."""
    llm = Llama(path, n_ctx=1024, n_threads=threads, verbose=False, force_exit_layers=[0], kv_policy="mask",
                **llama_kwargs)
    try:
        return _step_ms(llm, threads, n_tokens, runs)
    finally:
        llm.close()


def _step_ms(llm: Llama, threads: int, n_tokens: int, runs: int) -> np.ndarray:
    n_layer = llm.weights.n_layer

    def decode_ms(layers):
        """Median ms per step in llama_decode (sampling and exit decisions left out)."""
        llm.force_exits(layers)
        per_run = []
        for _ in range(runs):
            llm.create_completion(TIMING_PROMPT, max_tokens=n_tokens, temperature=0.0)
            s = llm.exit_stats
            if s.steps:  # a generation that ended at once has no decode step to time
                per_run.append((s.first_pass_ms - s.predictor_ms) / s.steps)
        return statistics.median(per_run)

    times = np.zeros(n_layer)
    times[n_layer - 1] = decode_ms([])
    weights = llm.weights
    z = weights.final_norm(np.random.default_rng(0).normal(size=weights.n_embd).astype(np.float32))
    lm_head = []
    for _ in range(50):
        start = time.perf_counter()
        weights.lm_head_logits(z, threads)
        lm_head.append((time.perf_counter() - start) * 1e3)
    lm_head_ms = statistics.median(lm_head)
    for layer in range(n_layer - 1):
        times[layer] = decode_ms([layer]) + lm_head_ms
    return times


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
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            records = collect(llm, drafter, prompts, work_dir, n_new, k, "oracle records")
    finally:
        llm.close()
    return oracle_exit_layers(records)
