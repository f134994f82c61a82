"""Training the EAGLE-1 draft head: data from the target's own decoding, torch training, hit rates.

Data: for each prompt the full model decodes greedily while Llama feeds a recorder the
residual stream after its last layer at every position (prompt included); each prompt's
sequence goes to its own .npz shard as soon as it is done, so an interrupted run resumes.
Training (EAGLE-1): row j reads (f_j, embedding of token j+1) and must predict f_{j+1}
(smooth-L1) and the target's greedy token after it (cross-entropy over the draft vocabulary,
weight 0.1); input features get uniform noise, as EAGLE's.

Exit-layer states: after an early exit the engine feeds the head the exit layer's state
instead of the last layer's, which a head trained on final states only has never seen. So at
every generated position the recorder also keeps the state after one random layer of the
upper half (where exits happen), and training swaps it in as the input for a share of rows
(`exit_mix`); the regression target stays the final state.
"""
import itertools
import math
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import llama_cpp
import numpy as np

from .calibration import Prompt, chat_tokens, record_shards

MAX_ROWS = 1024       # rows per training sequence (longer prompts keep their end)
MAX_ASKED_CHARS = 2000  # ShareGPT first turns the model answers: longer ones are mostly pasted documents
TOKENS_PER_BATCH = 2048


def exit_state_layers(n_layer: int) -> List[int]:
    """Layers whose state may stand in for the last layer's after an exit: the upper half."""
    return list(range(n_layer // 2, n_layer - 1))


class FeatureRecorder:
    """A feature sink (Llama.feed_hidden_states) that keeps every position's hidden state and,
    at single-token steps, the state after one random exit-state layer (the hook captures them)."""

    def __init__(self, llm, layers: Sequence[int], rng: np.random.Generator):
        n_ctx, n_embd = llm.n_ctx(), llm.weights.n_embd
        self.llm, self.layers, self.rng = llm, list(layers), rng
        self.hidden = np.zeros((n_ctx, n_embd), np.float32)
        self.exit_hidden = np.zeros((n_ctx, n_embd), np.float32)
        self.exit_layer = np.full(n_ctx, -1, np.int16)
        self.n = 0

    def set_features(self, position: int, hidden: np.ndarray) -> None:
        self.hidden[position:position + len(hidden)] = hidden
        if len(hidden) == 1 and self.layers:  # a batch's hook states are its last token's: steps only
            layer = int(self.rng.choice(self.layers))
            self.exit_hidden[position] = self.llm.hidden_state(layer)
            self.exit_layer[position] = layer
        self.n = max(self.n, position + len(hidden))

    def reset(self) -> None:
        self.n = 0
        self.exit_layer[:] = -1


@dataclass
class Trace:
    tokens: np.ndarray       # [T] int32: prompt then greedy output (or teacher-forced text)
    hidden: np.ndarray       # [T-1, d] float16: residual stream after the last layer at positions 0..T-2
    n_prompt: int
    exit_hidden: Optional[np.ndarray] = None  # [T-1, d] float16: ... after exit_layer (zeros where it is -1)
    exit_layer: Optional[np.ndarray] = None   # [T-1] int16: the layer of exit_hidden, -1: none (prompt positions)
    greedy: Optional[np.ndarray] = None       # [T] int32: the target's greedy token after each position
                                              # (teacher-forced text: tokens are the text's, not the target's)


def record_sequence(llm, prompt_tokens: Sequence[int], n_new: int, rng: np.random.Generator) -> Trace:
    """Greedy decode of up to n_new tokens by the full model, keeping every position's state."""
    if llm.exit_stats is not None:
        raise ValueError("head data comes from the full model: configure_exits() off first")
    layers = exit_state_layers(llm.weights.n_layer)
    recorder = FeatureRecorder(llm, layers, rng)
    llm.feed_hidden_states(recorder)
    llm.capture_layers(layers)
    tokens = list(prompt_tokens)
    try:
        for i, token in enumerate(llm.generate(prompt_tokens, temp=0.0)):
            tokens.append(token)
            if i + 1 == n_new or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(tokens) >= llm.n_ctx():
                break
    finally:
        llm.feed_hidden_states(None)
        llm.capture_layers([])
    n = len(tokens) - 1  # the last token was emitted, never decoded
    if recorder.n < n:
        raise RuntimeError(f"hidden states missing: {recorder.n} of {n} positions recorded")
    return Trace(np.asarray(tokens, np.int32), recorder.hidden[:n].astype(np.float16), len(prompt_tokens),
                 recorder.exit_hidden[:n].astype(np.float16), recorder.exit_layer[:n].copy())


def collect_sequences(llm, prompts: Sequence[Prompt], work_dir: str, n_new: int,
                      description: str = "head data") -> List[Trace]:
    """Record every prompt not already in work_dir, then return all of them."""
    def record(prompt: Prompt) -> dict:
        tokens = chat_tokens(llm, prompt.text)
        if len(tokens) + 2 > llm.n_ctx():
            tokens = tokens[-(llm.n_ctx() // 2):]  # keep the end: the chat template's assistant turn
        rng = np.random.default_rng(zlib.crc32(prompt.text.encode()))  # per prompt: a resumed run draws the same
        return record_sequence(llm, tokens, n_new, rng).__dict__

    recorded = [name for name in (os.listdir(work_dir) if os.path.isdir(work_dir) else [])
                if name.endswith(".npz") and not name.endswith(".part.npz")]
    if recorded:  # before recording anything more
        with np.load(os.path.join(work_dir, recorded[0])) as f:
            if "exit_layer" not in f:
                raise ValueError(f"{work_dir}: head data from an older specee-pc (no exit-layer states): "
                                 f"delete it to record the data again")
    return [load_trace(path) for path in record_shards(prompts, work_dir, record, description)]


def load_trace(path: str) -> Trace:
    """One prompt's shard as collect_sequences recorded it."""
    with np.load(path) as f:
        return Trace(f["tokens"], f["hidden"], int(f["n_prompt"]), f["exit_hidden"], f["exit_layer"])


@dataclass
class Rows:
    """One sequence as head training rows j = 0..R-1."""
    feat: np.ndarray    # [R+1, d] normed features f_0..f_R (input rows 0..R-1, targets 1..R)
    embd: np.ndarray    # [R, d] embeddings of tokens 1..R
    label: np.ndarray   # [R] target's greedy token after f_{j+1}
    generated: np.ndarray  # [R] bool: that token is one the model generated (what decoding drafts)
    exit_feat: Optional[np.ndarray]  # [R, d] normed exit-layer states standing in for input rows 0..R-1
    has_exit: np.ndarray   # [R] bool: exit_feat holds one


def greedy_labels(lm, feat: np.ndarray, chunk: int = 512) -> np.ndarray:
    """argmax of the target's full LM head (a torch [n_vocab, d] tensor) on normed features."""
    import torch

    out = []
    for i in range(0, len(feat), chunk):
        out.append((torch.from_numpy(feat[i:i + chunk]) @ lm.T).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def build_rows(weights, sequences: Sequence[Trace]) -> List[Rows]:
    import torch

    lm = None
    out = []
    for seq in sequences:
        if len(seq.hidden) < 2:
            continue
        feat = weights.final_norm(seq.hidden.astype(np.float32))
        start = max(0, len(feat) - 1 - MAX_ROWS)  # positions are relative: a cut sequence is still a sequence
        feat = feat[start:]
        tokens = seq.tokens[start:]
        n_rows = len(feat) - 1
        exit_layer = seq.exit_layer[start:start + n_rows] if seq.exit_layer is not None else np.full(n_rows, -1)
        has_exit = exit_layer >= 0
        exit_feat = None
        if has_exit.any():
            exit_feat = np.zeros((n_rows, feat.shape[1]), np.float32)
            exit_feat[has_exit] = weights.final_norm(seq.exit_hidden[start:start + n_rows][has_exit].astype(np.float32))
        if seq.greedy is not None:  # teacher-forced text: the target's choices were recorded
            generated = np.zeros(n_rows, bool)
            label = seq.greedy[start + 1:start + 1 + n_rows].astype(np.int64)
        else:
            # the token after f_{j+1}: the one decoding emitted where it generated, else the LM head's argmax
            generated = np.arange(start, start + n_rows) + 2 >= seq.n_prompt
            label = tokens[np.minimum(np.arange(n_rows) + 2, len(tokens) - 1)].astype(np.int64)
            if (~generated).any():
                if lm is None:
                    lm = torch.from_numpy(weights.lm_head_rows(list(range(weights.n_vocab))))  # dequantized once
                label[~generated] = greedy_labels(lm, feat[1:][~generated])
        out.append(Rows(feat, weights.embd_rows(tokens[1:n_rows + 1].tolist()), label, generated, exit_feat, has_exit))
    return out


def choose_vocab(rows: Sequence[Rows], n_vocab: int, size: int, always: Iterable[int] = ()) -> np.ndarray:
    """The `size` tokens the target emits most often in these rows (and `always`), sorted ids."""
    counts = np.zeros(n_vocab, np.int64)
    for r in rows:
        np.add.at(counts, r.label, 1)
    for t in always:
        counts[t] = counts.max() + 1
    order = np.argsort(-counts, kind="stable")[:min(size, n_vocab)]
    return np.sort(order).astype(np.int32)


def draft_ids(vocab: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Target token ids -> their index in the draft vocabulary (sorted ids), -1 outside it."""
    at = np.minimum(np.searchsorted(vocab, tokens), len(vocab) - 1)
    return np.where(vocab[at] == tokens, at, -1)


@dataclass
class HitRates:
    top1: float
    topk: float        # target's greedy token among the head's top k
    coverage: float    # ... in the draft vocabulary at all (the bound on topk)
    steps: int


def hit_rates(model, rows: Sequence[Rows], vocab: np.ndarray, k: int, exit_fed: bool = False) -> HitRates:
    """On the rows' generated tokens (what decoding drafts); exit_fed: every input with an
    exit-layer state reads it instead of the final state (as if every step had exited)."""
    import torch

    top1 = topk = covered = steps = 0
    model.eval()
    with torch.no_grad():
        for r in rows:
            feat = np.where(r.has_exit[:, None], r.exit_feat, r.feat[:-1]) if exit_fed and r.exit_feat is not None \
                else r.feat[:-1]
            _, logits = model(torch.from_numpy(r.embd)[None], torch.from_numpy(feat)[None])
            best = torch.topk(logits[0], k, dim=-1).indices.numpy()                     # [R, k] draft ids
            want = draft_ids(vocab, r.label)
            use = r.generated
            steps += int(use.sum())
            covered += int(((want >= 0) & use).sum())
            top1 += int(((best[:, 0] == want) & use).sum())
            topk += int(((best == want[:, None]).any(1) & use).sum())
    n = max(steps, 1)
    return HitRates(top1 / n, topk / n, covered / n, steps)


def native_hit_rate(head, weights, traces: Sequence[Trace], k: int) -> float:
    """The native head's top-k hit rate on generated tokens, proposing step by step as decoding does."""
    hits = steps = 0
    for trace in traces:
        head.set_features(0, trace.hidden.astype(np.float32))
        for t in range(max(trace.n_prompt, 2), len(trace.tokens)):  # propose token t from tokens[:t]
            candidates = head.propose(trace.tokens[:t], k)
            hits += int(trace.tokens[t]) in candidates
            steps += 1
    return hits / max(steps, 1)


def batches(rows: Sequence[Rows], rng: np.random.Generator):
    """Rows grouped by similar length, about TOKENS_PER_BATCH rows per batch, in random order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].label))
    groups, current = [], []
    for i in order:
        current.append(i)
        if len(current) * len(rows[i].label) >= TOKENS_PER_BATCH:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [groups[i] for i in rng.permutation(len(groups))]


def pad(rows: Sequence[Rows], vocab: np.ndarray):
    import torch

    T = max(len(r.label) for r in rows)
    d = rows[0].feat.shape[1]
    feat = np.zeros((len(rows), T + 1, d), np.float32)
    exit_feat = np.zeros((len(rows), T, d), np.float32)
    embd = np.zeros((len(rows), T, d), np.float32)
    label = np.full((len(rows), T), -100, np.int64)
    valid = np.zeros((len(rows), T), bool)
    has_exit = np.zeros((len(rows), T), bool)
    for b, r in enumerate(rows):
        R = len(r.label)
        feat[b, :R + 1], embd[b, :R], valid[b, :R] = r.feat, r.embd, True
        has_exit[b, :R] = r.has_exit
        if r.exit_feat is not None:
            exit_feat[b, :R] = r.exit_feat
        mapped = draft_ids(vocab, r.label)
        label[b, :R] = np.where(mapped >= 0, mapped, -100)
    return tuple(torch.from_numpy(a) for a in (feat, embd, label, valid, exit_feat, has_exit))


LEVEL_WEIGHTS = (1.0, 0.8, 0.6, 0.4)  # loss weight of chain positions 1..4 in training
CHAIN_WINDOW = 128  # rows per sequence trained at chain positions 2.. (a random window per batch)


def chain_loss(model, feat, embd, label, valid, inputs, scale: float, cls_weight: float, levels: int,
               start: int = 0):
    """EAGLE-1's loss (smooth-L1 on the predicted feature + cls_weight x cross-entropy on the
    target's greedy token) summed over chain positions 1..levels, each fed the head's own
    predictions as decoding feeds them (HeadModel.forward_chain; positions 2.. over the rows
    start..start+CHAIN_WINDOW); (loss, (reg, ce) of position 1)."""
    import torch
    import torch.nn.functional as F

    total, first = 0.0, None
    T = valid.shape[1]
    window = slice(start, min(start + CHAIN_WINDOW, T))
    rows = torch.arange(T)
    for level, (predicted, logits) in enumerate(model.forward_chain(embd, inputs, levels, start, CHAIN_WINDOW)):
        if level == 0:
            use, target, want = valid, feat[:, 1:], label
        else:
            use = valid[:, window] & (rows[window] >= start + level)[None, :]
            target, want = feat[:, 1:][:, window], label[:, window]
        reg = F.smooth_l1_loss(predicted[use] / scale, target[use] / scale)
        known = want[use] != -100  # tokens outside the draft vocabulary have no class
        ce = F.cross_entropy(logits[use][known], want[use][known]) if known.any() else torch.zeros(())
        total = total + LEVEL_WEIGHTS[min(level, len(LEVEL_WEIGHTS) - 1)] * (reg + cls_weight * ce)
        first = first or (reg.item(), ce.item())
    return total, first


def train_head(model, train: Sequence[Rows], vocab: np.ndarray, *, epochs: int, lr: float, seed: int = 0,
               checkpoint: Optional[str] = None, noise: float = 0.1, cls_weight: float = 0.1, exit_mix: float = 0.0,
               levels: int = 1, progress: bool = True, evaluate=None):
    """AdamW with warm-up and cosine decay; saves a checkpoint after every epoch and resumes from it.
    exit_mix: share of inputs with an exit-layer state that read it instead of the final state;
    levels: chain positions trained (1: EAGLE-1's teacher forcing alone).
    `evaluate(model)` (optional) returns a line printed after each epoch."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    plan = [batches(train, rng) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    warmup = max(1, total // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    first_epoch = 0
    fingerprint = {"vocab": vocab, "epochs": epochs, "exit_mix": exit_mix, "shape": model.shape, "levels": levels,
                   "rows": sum(len(r.label) for r in train)}
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        if all(np.array_equal(state.get(k), v) if k == "vocab" else state.get(k) == v for k, v in fingerprint.items()):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            first_epoch = state["epoch"] + 1
    scale = float(np.sqrt(np.mean([np.mean(r.feat.astype(np.float64) ** 2) for r in train])))
    for epoch in range(first_epoch, epochs):
        model.train()
        bar = tqdm(plan[epoch], desc=f"head epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for group in bar:
            feat, embd, label, valid, exit_feat, has_exit = pad([train[i] for i in group], vocab)
            swap = has_exit & (torch.rand(has_exit.shape) < exit_mix)
            inputs = torch.where(swap[..., None], exit_feat, feat[:, :-1])
            inputs = inputs + (torch.rand_like(inputs) - 0.5) * 2 * noise * scale
            start = int(rng.integers(0, max(1, valid.shape[1] - CHAIN_WINDOW + 1)))
            loss, (reg, ce) = chain_loss(model, feat, embd, label, valid, inputs, scale, cls_weight, levels, start)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            schedule.step()
            bar.set_postfix(reg=f"{reg:.3f}", ce=f"{ce:.2f}")
        if checkpoint:
            tmp = checkpoint + ".part"
            torch.save({**fingerprint, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, tmp)
            os.replace(tmp, checkpoint)
        if evaluate is not None and progress:
            print(f"epoch {epoch + 1}: {evaluate(model)}")
    return model


@dataclass
class ChainAcceptance:
    """Held-out acceptance of the head's chains: the target's greedy token is the draft (its
    top-1), at chain positions 1..P, each given that the drafts before it were accepted, and by
    the head's probability of its draft (control.HEAD_BUCKETS)."""
    acceptance: np.ndarray   # [P] accepted / drafted at each position
    bucket_acceptance: np.ndarray  # [P, buckets]
    bucket_share: np.ndarray  # [P, buckets] how often each bucket comes at that position
    chains: int


def chain_acceptance(model, rows: Sequence[Rows], vocab: np.ndarray, positions: int = 4) -> ChainAcceptance:
    """On held-out generated rows (the model's own greedy output, as decoding drafts it)."""
    import torch

    from .control import HEAD_BUCKETS

    n_buckets = len(HEAD_BUCKETS) + 1
    drafted = np.zeros((positions, n_buckets))
    accepted = np.zeros((positions, n_buckets))
    chains = 0
    model.eval()
    with torch.no_grad():
        for r in rows:
            R = len(r.label)
            levels = model.forward_chain(torch.from_numpy(r.embd)[None], torch.from_numpy(r.feat[:-1])[None], positions)
            want = draft_ids(vocab, r.label)
            correct, bucket = [], []
            for _, logits in levels:
                p = torch.softmax(logits[0], -1).max(-1)
                correct.append((p.indices.numpy() == want) & (want >= 0))
                bucket.append(np.searchsorted(np.asarray(HEAD_BUCKETS), p.values.numpy(), side="right"))
            for n in range(R):
                if not r.generated[n]:
                    continue
                chains += 1
                for s in range(positions):  # chain position s+1: row n+s, level s
                    j = n + s
                    if j >= R or not r.generated[j]:
                        break
                    drafted[s, bucket[s][j]] += 1
                    accepted[s, bucket[s][j]] += correct[s][j]
                    if not correct[s][j]:
                        break
    per_position = accepted.sum(1) / np.maximum(drafted.sum(1), 1)
    # a bucket never seen at a position: the position's acceptance
    by_bucket = np.where(drafted > 0, accepted / np.maximum(drafted, 1), per_position[:, None])
    return ChainAcceptance(per_position, by_bucket,
                           drafted / np.maximum(drafted.sum(1, keepdims=True), 1), chains)


@dataclass
class HeadOptions:
    vocab_size: int = 4096
    n_ff: int = 0              # 0: half the target's feed-forward size
    tensor_type: str = "q4_0"
    epochs: int = 10
    lr: float = 1e-3
    tokens: int = 128          # tokens decoded per prompt (the model's own answers)
    exit_mix: float = 0.4      # share of training inputs given as exit-layer states (see the module doc)
    k: int = 4
    seed: int = 0
    data: Sequence[str] = ("sharegpt", "prompts")  # text sources (head_data.SOURCES) and/or "prompts"
    budget: int = 200_000      # teacher-forced tokens over all text sources
    max_len: int = 1024        # tokens per teacher-forced sequence
    answers: int = 0           # training prompts answered by the model (0: all)
    sharegpt_answers: int = 200  # ShareGPT first turns answered by the model (with "sharegpt" in data)
    levels: int = 4            # chain positions trained


def head_shape(llm) -> dict:
    """Attention shape and RoPE base of the target, which the head copies; its own n_ff."""
    meta, arch = llm.metadata, llm.weights.arch
    n_head = int(meta[f"{arch}.attention.head_count"])
    return dict(n_head=n_head, n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
                head_dim=int(meta.get(f"{arch}.attention.key_length", llm.weights.n_embd // n_head)),
                n_ff=int(meta[f"{arch}.feed_forward_length"]),
                rope_freq_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), norm_eps=llm.weights.norm_eps)


def collect_head_data(llm, train_prompts: Sequence[Prompt], held_out: Sequence[Prompt], work_dir: str,
                      options: HeadOptions):
    """(training traces, held-out traces): teacher-forced text of each source (an equal share of
    the token budget each), the model's own answers to ShareGPT's first turns (what it will be
    asked to draft: its own outputs) and to the training prompts; held out: its answers to the
    held-out prompts. Everything is kept in work_dir and reused."""
    from .head_data import SOURCES, collect_text, load_text_traces, sharegpt_conversations

    text_sources = [d for d in options.data if d != "prompts"]
    unknown = [d for d in text_sources if d not in SOURCES]
    if unknown:
        raise ValueError(f"unknown head data source {unknown[0]!r}: choose from {', '.join([*SOURCES, 'prompts'])}")
    traces = []
    for source in text_sources:
        share = options.budget // len(text_sources)
        paths = collect_text(llm, source, os.path.join(work_dir, "text"), share, options.max_len)
        traces += load_text_traces(paths, share)
    if "sharegpt" in text_sources and options.sharegpt_answers:
        firsts = (c[0]["content"] for c in sharegpt_conversations())
        asked = [Prompt(f"sharegpt-{i:05d}", text) for i, text in
                 itertools.islice(enumerate(t for t in firsts if len(t) <= MAX_ASKED_CHARS), options.sharegpt_answers)]
        traces += collect_sequences(llm, asked, os.path.join(work_dir, "sharegpt-answers"), options.tokens,
                                    "head data (answers to ShareGPT first turns)")
    if "prompts" in options.data:
        answered = list(train_prompts)[:options.answers or None]
        traces += collect_sequences(llm, answered, os.path.join(work_dir, "train"), options.tokens,
                                    "head data (answers to training prompts)")
    held = collect_sequences(llm, held_out, os.path.join(work_dir, "held-out"), options.tokens,
                             "head data (held-out answers)")
    return traces, held


def train_draft_head(llm, train_prompts: Sequence[Prompt], held_out: Sequence[Prompt], work_dir: str,
                     options: HeadOptions):
    """Collect, train and evaluate a draft head for llm's model: (HeadWeights, report dict).
    Data and a checkpoint per epoch stay in work_dir, so an interrupted run resumes."""
    import torch

    from .head_model import DraftHeadModel

    w = llm.weights
    train_traces, held_traces = collect_head_data(llm, train_prompts, held_out, work_dir, options)
    train_rows, held_rows = build_rows(w, train_traces), build_rows(w, held_traces)
    end_tokens = [t for t in (llm.token_eos(), llama_cpp.llama_vocab_eot(llm._model.vocab)) if 0 <= t < w.n_vocab]
    vocab = choose_vocab(train_rows, w.n_vocab, options.vocab_size, always=end_tokens)
    shape = head_shape(llm)
    if options.n_ff:
        shape["n_ff"] = options.n_ff
    else:
        shape["n_ff"] //= 2
    torch.manual_seed(options.seed)
    model = DraftHeadModel(w.n_embd, lm_rows=w.lm_head_rows(vocab.tolist()), **shape)

    def held_out_rates(m):  # fed final states, and exit-layer states where recorded
        return hit_rates(m, held_rows, vocab, options.k), hit_rates(m, held_rows, vocab, options.k, exit_fed=True)

    def evaluate(m):
        rates, fed = held_out_rates(m)
        chain = chain_acceptance(m, held_rows, vocab)
        return (f"held-out top-1 {rates.top1:.3f}, top-{options.k} {rates.topk:.3f}; "
                f"chain acceptance by position {' '.join(f'{a:.3f}' for a in chain.acceptance)}; "
                f"fed exit-layer states: top-{options.k} {fed.topk:.3f}")

    train_head(model, train_rows, vocab, epochs=options.epochs, lr=options.lr, seed=options.seed,
               checkpoint=os.path.join(work_dir, "head.pt"), exit_mix=options.exit_mix, levels=options.levels,
               evaluate=evaluate)
    rates, fed = held_out_rates(model)
    chain = chain_acceptance(model, held_rows, vocab)
    head = model.to_weights(vocab, options.tensor_type, rates.topk)
    head.acceptance, head.bucket_acceptance, head.bucket_share = \
        chain.acceptance, chain.bucket_acceptance, chain.bucket_share
    report = {"train_rows": int(sum(len(r.label) for r in train_rows)),
              "teacher_forced_rows": int(sum(len(r.label) for r in train_rows if not r.generated.any())),
              "held_out_steps": rates.steps, "held_out_chains": chain.chains,
              "vocab_size": int(len(vocab)), "vocab_coverage": rates.coverage, "top1": rates.top1,
              f"top{options.k}": rates.topk, f"top{options.k}_exit_fed": fed.topk, "exit_mix": options.exit_mix,
              "chain_acceptance": [round(float(a), 4) for a in chain.acceptance],
              "bucket_acceptance": chain.bucket_acceptance.round(4).tolist(),
              "bucket_share": chain.bucket_share.round(4).tolist(),
              "data": list(options.data), "budget": options.budget, "levels": options.levels,
              "shape": shape, "tensor_type": options.tensor_type}
    return head, report, held_traces
