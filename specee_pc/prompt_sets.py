"""The six speed prompt sets of SpecEE and EAGLE, shipped with specee-pc (data/prompts)."""
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
