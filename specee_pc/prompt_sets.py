"""The six speed prompt sets of SpecEE and EAGLE, shipped with specee-pc (data/prompts)."""
import json
import os
from typing import List, Sequence

from .calibration import Prompt, load_prompts

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts")
SETS = ("mt_bench", "sum", "qa", "alpaca", "gsm8k", "humaneval")
# calibrate holds out the first prompts of each set; benchmarks draw from them only
HELD_OUT_PER_SET = 20


def first_prompts(sets: Sequence[str], per_set: int) -> List[Prompt]:
    """The first `per_set` prompts of each named set, in the order the sets are given."""
    unknown = [name for name in sets if name not in SETS]
    if unknown:
        raise ValueError(f"unknown prompt set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    prompts = []
    for name in sets:
        prompts += load_prompts([os.path.join(PROMPTS_DIR, name, "question.jsonl")])[:per_set]
    return prompts


def user_prompts(path: str) -> List[Prompt]:
    """Prompts from a user's JSONL file: {"prompt": text} (or EAGLE's {"turns": [text, ...]}) a line."""
    name = os.path.splitext(os.path.basename(path))[0] or "prompts"
    prompts = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = row["prompt"] if "prompt" in row else row["turns"][0]
                except (ValueError, KeyError, IndexError, TypeError):
                    raise ValueError(f"{path}:{i}: expected a JSON object with \"prompt\" (or \"turns\")") from None
                if not isinstance(text, str) or not text:
                    raise ValueError(f"{path}:{i}: the prompt must be a non-empty string")
                prompts.append(Prompt(f"{name}-{i}", text))
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts in it")
    return prompts
