"""One timed greedy generation of one configuration on one prompt, and the checks of its output."""
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import llama_cpp
import numpy as np

from ..replay import ReplayDrafts, ReplayExits


@dataclass
class Run:
    config: str
    prompt: str
    rep: int
    prompt_tokens: int
    tokens: List[int]
    prompt_seconds: float   # prompt processing and the first token
    decode_seconds: float   # the tokens after the first
    exit: Optional[dict] = None  # specee: the generation's ExitStats (exits_at as exit layers)
    exits_at: list = field(default_factory=list, repr=False)
    spec: Optional[dict] = None  # spec: the generation's SpeculationStats (rounds_at apart)
    rounds_at: list = field(default_factory=list, repr=False)

    @property
    def decode_tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def greedy_tokens(llm: llama_cpp.Llama, prompt_tokens: Sequence[int], n_new: int,
                  prefill: Optional[Callable[[Sequence[int]], None]] = None):
    """Greedy decode of up to n_new tokens (stops at end of generation); their tokens and the
    time each was produced, in seconds from the start (which includes prefill(prompt_tokens))."""
    llm.reset()  # process the whole prompt every run: generate() would reuse a cached prefix
    tokens, times = [], []
    start = time.perf_counter()
    if prefill is not None:
        prefill(prompt_tokens)
    generator = llm.generate(prompt_tokens, temp=0.0)
    try:
        for token in generator:
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            tokens.append(token)
            times.append(time.perf_counter() - start)
            if len(tokens) == n_new:
                break
    finally:
        generator.close()
    return tokens, times


def timed_run(config, prompt_name: str, prompt_tokens: Sequence[int], n_new: int, rep: int) -> Run:
    tokens, times = greedy_tokens(config.llm, prompt_tokens, n_new, config.prefill_draft)
    run = Run(config.name, prompt_name, rep, len(prompt_tokens), tokens,
              times[0] if times else 0.0, times[-1] - times[0] if times else 0.0)
    stats = getattr(config.llm, "exit_stats", None)
    if stats is not None:
        run.exit = {k: v for k, v in dataclasses.asdict(stats).items() if k != "exits_at"}
        run.exit["exit_layers"] = [layer for _, layer, _ in stats.exits_at]
        run.exits_at = list(stats.exits_at)
    spec = getattr(config.llm, "speculation_stats", None)
    if spec is not None:
        run.spec = {k: v for k, v in dataclasses.asdict(spec).items() if k != "rounds_at"}
        run.rounds_at = list(spec.rounds_at)
    return run


def first_divergence(ours: Sequence[int], reference: Sequence[int]) -> Optional[int]:
    """First position where two outputs differ (a length difference counts); None if identical."""
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


def next_logits(vanilla: llama_cpp.Llama, tokens: Sequence[int]) -> np.ndarray:
    """The full model's logits after `tokens` (a copy)."""
    vanilla.reset()
    vanilla.eval(list(tokens))
    return np.ctypeslib.as_array(vanilla._ctx.get_logits_ith(-1), shape=(vanilla.n_vocab(),)).copy()


def greedy_matches(every_row: llama_cpp.Llama, prompt_tokens: Sequence[int], output: Sequence[int]) -> np.ndarray:
    """Per output token, whether it is the full model's greedy token after the output's own prefix
    (every_row keeps all logits). A lossy configuration whose output departed is judged step by
    step on its own path, not against a text it no longer follows."""
    if not output:
        return np.zeros(0, bool)
    every_row.reset()
    every_row.eval(list(prompt_tokens) + list(output[:-1]))
    n = len(prompt_tokens)
    return np.argmax(every_row.scores[n - 1:n - 1 + len(output)], axis=1) == np.asarray(output)


def exited_tokens(exits_at: Sequence[tuple], n_prompt: int, n_output: int) -> np.ndarray:
    """Per output token, whether an exit emitted it: the step that decoded position p emits output
    token p - n_prompt + 1 (the first comes from the prompt's full-depth pass)."""
    exited = np.zeros(n_output, bool)
    for position, _, _ in exits_at:
        if 0 <= position - n_prompt + 1 < n_output:
            exited[position - n_prompt + 1] = True
    return exited


def replay_matches(replay: llama_cpp.Llama, run: Run, prompt_tokens: Sequence[int]) -> bool:
    """Whether llama-cpp-python's own speculative decoding, drafting what the run verified where it
    did (exit tokens, speculation chains), gives the run's output: the same batch shapes, so a
    lossless run must match it."""
    replay.draft_model = ReplayDrafts(run.rounds_at) if run.spec is not None else ReplayExits(run.exits_at)
    tokens, _ = greedy_tokens(replay, prompt_tokens, len(run.tokens))
    return tokens == run.tokens
