"""Running evaluation items on a specee_pc.Llama, with early exit as configured on it.

Only decode steps may exit (the prompt never does), so each way of answering puts the answer in
decode steps: GSM8K generates its chain of thought; a multiple-choice answer is the next token
after the prompt's last token, which is decoded as a generation step; LAMBADA's passages are
teacher-forced one decode step per token after a short prompt. After each scorer, the Llama's
exit_stats hold that item's exits.
"""
import re
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .tasks import ChoiceItem, GenerationItem, TextItem

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
PROMPT_TOKENS = 16  # LAMBADA: tokens processed as the prompt; every later one is a decode step


@dataclass
class ExitCounts:
    steps: int = 0
    exits: int = 0
    layers_used: int = 0

    def add(self, stats) -> None:
        if stats is not None:
            self.steps += stats.steps
            self.exits += stats.exits
            self.layers_used += stats.layers_used


def final_number(text: str) -> Optional[str]:
    """The number after "answer is", else the last number; commas, "$" and a final "." dropped."""
    tail = text.split("answer is")[-1] if "answer is" in text else text
    numbers = NUMBER.findall(tail)
    return numbers[0 if "answer is" in text else -1].replace(",", "").rstrip(".") if numbers else None


def same_number(a: Optional[str], b: str) -> bool:
    try:
        return a is not None and float(a) == float(b.replace(",", ""))
    except ValueError:
        return False


def solve(llm, item: GenerationItem, max_tokens: int) -> bool:
    out = llm.create_completion(item.prompt, max_tokens=max_tokens, temperature=0.0,
                                stop=["Question:", "\n\n"])
    return same_number(final_number(out["choices"][0]["text"]), item.answer)


def continuation_token(llm, context: List[int], text: str, continuation: str) -> int:
    """The first token of `continuation` as the tokenizer splits context + continuation."""
    whole = llm.tokenize((text + continuation).encode("utf-8"))
    if whole[:len(context)] == context and len(whole) > len(context):
        return whole[len(context)]
    return llm.tokenize(continuation.encode("utf-8"), add_bos=False)[0]


def choose(llm, item: ChoiceItem) -> int:
    """The choice whose first token the model ranks highest after the prompt (-1: none ranked)."""
    tokens = llm.tokenize(item.prompt.encode("utf-8"))
    llm.reset()
    llm.reset_exit_stats()
    llm.eval(tokens[:-1])
    logits = llm.decode_step(tokens[-1])
    scores = logits[[continuation_token(llm, tokens, item.prompt, c) for c in item.choices]]
    # the candidates exit rule leaves -inf outside its candidates: no choice among them, no answer
    return int(np.argmax(scores)) if np.isfinite(scores.max()) else -1


@dataclass
class ForcedText:
    """Log-probabilities of a teacher-forced passage, for its tokens after the prompt part."""
    tokens: List[int]
    log_probs: np.ndarray        # [n, vocab] log-softmax of the logits predicting each token
    continuation_start: int      # index (into tokens) of the continuation's first token


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def teacher_force(llm, item: TextItem) -> ForcedText:
    tokens = llm.tokenize((item.context + item.continuation).encode("utf-8"))
    n_context = len(llm.tokenize(item.context.encode("utf-8")))
    start = min(PROMPT_TOKENS, n_context - 1)
    llm.reset()
    llm.reset_exit_stats()
    llm.eval(tokens[:start])
    rows = [llm.decode_step(t) for t in tokens[start:-1]]  # each predicts the token after it
    return ForcedText(tokens[start + 1:], log_softmax(np.stack(rows).astype(np.float64)), n_context - start - 1)
