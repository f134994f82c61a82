"""Calibration data: what the predictors learn from, recorded while the full model decodes.

For every decode step (never the prompt) and every layer l: the candidates' logits at l
(LM-head rows of the drafter's k candidates on the final-normed hidden state) and the label
"the full LM head's argmax at l is the token the full model emits". Features that depend on the
schedule (softmax, change since the previous checked layer) are derived from the logits at
training time. Each prompt's records go to their own .npz shard as soon as it is done, so an
interrupted collection resumes where it stopped.

The contexts are the full model's own greedy output, or (on-policy) the output of decoding with
early exits under kv_policy "mask", which drifts from it; the labels are the full model's either way.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import llama_cpp
import numpy as np

from .drafters import Drafter


@dataclass
class Prompt:
    name: str   # "<set>-<question_id>", unique: the shard's file name
    text: str

    @property
    def set_name(self) -> str:
        return self.name.rsplit("-", 1)[0]


def load_prompts(paths: Iterable[str]) -> List[Prompt]:
    """Prompts from .jsonl files (one {"question_id", "turns": [...]} per line, the first turn
    is used) or folders holding <set>/question.jsonl."""
    prompts = []
    for path in paths:
        if os.path.isdir(path):
            files = sorted(os.path.join(path, d, "question.jsonl") for d in os.listdir(path)
                           if os.path.isfile(os.path.join(path, d, "question.jsonl")))
            if not files:
                raise ValueError(f"{path}: no <set>/question.jsonl files in this folder")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise ValueError(f"{path}: no such prompt file or folder")
        for file in files:
            set_name = os.path.basename(os.path.dirname(file)) or "prompts"
            with open(file, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        row = json.loads(line)
                        prompts.append(Prompt(f"{set_name}-{row.get('question_id', i)}", row["turns"][0]))
    return prompts


def split_held_out(prompts: Sequence[Prompt], per_set: int):
    """The first `per_set` prompts of each set are held out (benchmarks use the first ones)."""
    seen, train, held = {}, [], []
    for p in prompts:
        seen[p.set_name] = seen.get(p.set_name, 0) + 1
        (held if seen[p.set_name] <= per_set else train).append(p)
    return train, held


@dataclass
class Records:
    """Decode steps of some prompts, stacked: T steps, L layers, k candidates."""

    cand_logits: np.ndarray   # [T, L, k] float32
    label: np.ndarray         # [T, L] bool: layer argmax == emitted token
    top1_in_cands: np.ndarray  # [T, L] bool: layer argmax is a candidate (verify rule can exit)
    cand_hit: np.ndarray      # [T] bool: emitted token is a candidate
    final_index: np.ndarray   # [T] int: its index among the candidates, -1 if none

    @staticmethod
    def concat(parts: Sequence["Records"]) -> "Records":
        return Records(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("cand_logits", "label", "top1_in_cands", "cand_hit", "final_index")))


def chat_tokens(llm, text) -> List[int]:
    """A prompt (text: a single user turn) or a conversation ([{"role", "content"}]) as the chat
    template formats it."""
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return llm.tokenize("\n".join(m["content"] for m in messages).encode("utf-8"))
    formatter = Jinja2ChatFormatter(template=template, eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    return llm.tokenize(formatter(messages=messages).prompt.encode("utf-8"),
                        add_bos=False, special=True)


def record_prompt(llm, drafter: Drafter, prompt_tokens: Sequence[int], n_new: int, k: int,
                  follow: Optional[Sequence[int]] = None) -> Records:
    """Decode up to n_new tokens with the full model, recording every decode step: its own greedy
    tokens, or the tokens of `follow` (another decoding's output, fed as teacher forcing). The
    labels are always the full model's greedy token after the context."""
    if llm.exit_stats is not None:
        raise ValueError("calibration records the full model: configure_exits() off first")
    w = llm.weights
    n_layer = w.n_layer
    llm.capture_layers(range(n_layer))
    context = list(prompt_tokens)
    rows = {"cand_logits": [], "label": [], "top1_in_cands": [], "cand_hit": [], "final_index": []}
    candidates = None
    llm.reset()
    llm.eval(context)
    for i in range(n_new + 1):
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(w.n_vocab,))))
        if candidates is not None:  # this step decoded context[-1]; the full model emits `token`
            hidden = np.stack([llm.hidden_state(il) for il in range(n_layer)])
            z = w.final_norm(hidden)
            top1 = np.array([int(np.argmax(w.lm_head_logits(z[il], 2))) for il in range(n_layer)])
            rows["cand_logits"].append(z @ w.lm_head_rows(candidates).T)
            rows["label"].append(top1 == token)
            rows["top1_in_cands"].append(np.isin(top1, candidates))
            rows["cand_hit"].append(token in candidates)
            rows["final_index"].append(candidates.index(token) if token in candidates else -1)
        if follow is not None:
            token = int(follow[i]) if i < len(follow) else -1
        if i == n_new or token < 0 or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        context.append(token)
        candidates = drafter.propose(context, k)
        if len(candidates) < k:
            candidates = None  # the engine does not arm a step without k candidates either
        llm.eval([token])
    llm.capture_layers([])
    if not rows["label"]:
        return Records(np.zeros((0, n_layer, k), np.float32), np.zeros((0, n_layer), bool),
                       np.zeros((0, n_layer), bool), np.zeros(0, bool), np.zeros(0, int))
    return Records(np.stack(rows["cand_logits"]).astype(np.float32), np.stack(rows["label"]),
                   np.stack(rows["top1_in_cands"]), np.array(rows["cand_hit"]), np.array(rows["final_index"]))


def decode_with_exits(llm, predictors, drafter: Drafter, prompt_tokens: Sequence[int], n_new: int) -> List[int]:
    """The greedy output of up to n_new tokens that the engine emits with these predictors under
    kv_policy "mask". Exits make it drift from the full model's output (small models fall into
    repetition more often), into contexts that predictors trained on the full model's alone have
    not seen. Afterwards exits are off and the llm feeds `drafter` hidden states, as recording needs."""
    llm.configure_exits(predictor=predictors, kv_policy="mask", drafter=drafter)
    output = []
    try:
        for token in llm.generate(prompt_tokens, temp=0.0):
            output.append(token)
            if len(output) == n_new or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
    finally:
        llm.configure_exits(predictor=None)
        llm.feed_hidden_states(drafter)  # recording feeds a draft head the full model's states again
    return output


def record_shards(prompts: Sequence[Prompt], work_dir: str, record: Callable[[Prompt], dict],
                  description: str) -> List[str]:
    """One .npz shard per prompt in work_dir holding record(prompt)'s arrays; prompts that already
    have one are not recorded again (an interrupted collection resumes). The shard paths, in order."""
    from tqdm import tqdm

    os.makedirs(work_dir, exist_ok=True)
    paths = [os.path.join(work_dir, f"{p.name}.npz") for p in prompts]
    todo = [(p, path) for p, path in zip(prompts, paths) if not os.path.exists(path)]
    for prompt, path in tqdm(todo, desc=description, unit="prompt", initial=len(prompts) - len(todo),
                             total=len(prompts)):
        arrays = record(prompt)
        np.savez(path + ".part.npz", **arrays)
        os.replace(path + ".part.npz", path)  # a shard exists only when complete
    return paths


def collect(llm, drafter: Drafter, prompts: Sequence[Prompt], work_dir: str, n_new: int, k: int,
            description: str = "collecting", exits=None) -> Records:
    """Record every prompt not already in work_dir, then return all their records. With `exits` (a
    PredictorFile), along the output of decoding with those exits under mask (decode_with_exits)."""
    def record(prompt: Prompt) -> dict:
        tokens = chat_tokens(llm, prompt.text)
        follow = decode_with_exits(llm, exits, drafter, tokens, n_new) if exits is not None else None
        return record_prompt(llm, drafter, tokens, n_new, k, follow).__dict__

    return load_records(record_shards(prompts, work_dir, record, description))


def load_records(paths: Iterable[str]) -> Records:
    parts = []
    for path in paths:
        with np.load(path) as f:
            if set(f.files) != set(Records.__dataclass_fields__):
                raise ValueError(f"{path}: records from another specee-pc version; delete the folder to collect again")
            parts.append(Records(**{name: f[name] for name in f.files}))
    return Records.concat(parts)
