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
import math
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import llama_cpp
import numpy as np

from .calibration import Prompt, chat_tokens, record_shards

MAX_ROWS = 1024       # rows per training sequence (longer prompts keep their end)
TOKENS_PER_BATCH = 4096


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
    tokens: np.ndarray       # [T] int32: prompt then greedy output
    hidden: np.ndarray       # [T-1, d] float16: residual stream after the last layer at positions 0..T-2
    n_prompt: int
    exit_hidden: np.ndarray  # [T-1, d] float16: ... after exit_layer (zeros where it is -1)
    exit_layer: np.ndarray   # [T-1] int16: the layer of exit_hidden, -1: none (prompt positions)


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
    traces = []
    for path in record_shards(prompts, work_dir, record, description):
        with np.load(path) as f:
            traces.append(Trace(f["tokens"], f["hidden"], int(f["n_prompt"]), f["exit_hidden"], f["exit_layer"]))
    return traces


@dataclass
class Rows:
    """One sequence as head training rows j = 0..R-1."""
    feat: np.ndarray    # [R+1, d] normed features f_0..f_R (input rows 0..R-1, targets 1..R)
    embd: np.ndarray    # [R, d] embeddings of tokens 1..R
    label: np.ndarray   # [R] target's greedy token after f_{j+1}
    generated: np.ndarray  # [R] bool: that token is one the model generated (what decoding drafts)
    exit_feat: np.ndarray  # [R, d] normed exit-layer states standing in for input rows 0..R-1
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

    lm = torch.from_numpy(weights.lm_head_rows(list(range(weights.n_vocab))))  # dequantized once
    out = []
    for seq in sequences:
        if len(seq.hidden) < 2:
            continue
        feat = weights.final_norm(seq.hidden.astype(np.float32))
        start = max(0, len(feat) - 1 - MAX_ROWS)  # positions are relative: a cut sequence is still a sequence
        feat = feat[start:]
        tokens = seq.tokens[start:]
        n_rows = len(feat) - 1
        has_exit = seq.exit_layer[start:start + n_rows] >= 0
        exit_feat = np.zeros((n_rows, feat.shape[1]), np.float32)
        if has_exit.any():
            exit_feat[has_exit] = weights.final_norm(seq.exit_hidden[start:start + n_rows][has_exit].astype(np.float32))
        # the token after f_{j+1}: the one decoding emitted where it generated, else the LM head's argmax
        generated = np.arange(start, start + n_rows) + 2 >= seq.n_prompt
        label = tokens[np.minimum(np.arange(n_rows) + 2, len(tokens) - 1)].astype(np.int64)
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
            feat = np.where(r.has_exit[:, None], r.exit_feat, r.feat[:-1]) if exit_fed else r.feat[:-1]
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
        exit_feat[b, :R], has_exit[b, :R] = r.exit_feat, r.has_exit
        mapped = draft_ids(vocab, r.label)
        label[b, :R] = np.where(mapped >= 0, mapped, -100)
    return tuple(torch.from_numpy(a) for a in (feat, embd, label, valid, exit_feat, has_exit))


def train_head(model, train: Sequence[Rows], vocab: np.ndarray, *, epochs: int, lr: float, seed: int = 0,
               checkpoint: Optional[str] = None, noise: float = 0.1, cls_weight: float = 0.1, exit_mix: float = 0.0,
               progress: bool = True, evaluate=None):
    """AdamW with warm-up and cosine decay; saves a checkpoint after every epoch and resumes from it.
    exit_mix: share of inputs with an exit-layer state that read it instead of the final state.
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
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        if (np.array_equal(state["vocab"], vocab) and state["epochs"] == epochs
                and state.get("exit_mix") == exit_mix and state.get("shape") == model.shape):
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
            predicted, logits = model(embd, inputs)
            reg = torch.nn.functional.smooth_l1_loss(predicted[valid] / scale, feat[:, 1:][valid] / scale)
            known = label[valid] != -100  # tokens outside the draft vocabulary have no class
            cls = (torch.nn.functional.cross_entropy(logits[valid][known], label[valid][known]) if known.any()
                   else torch.zeros(()))
            loss = reg + cls_weight * cls
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            schedule.step()
            bar.set_postfix(reg=f"{reg.item():.3f}", ce=f"{cls.item():.2f}")
        if checkpoint:
            tmp = checkpoint + ".part"
            torch.save({"epoch": epoch, "epochs": epochs, "vocab": vocab, "exit_mix": exit_mix, "shape": model.shape,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict()}, tmp)
            os.replace(tmp, checkpoint)
        if evaluate is not None and progress:
            print(f"epoch {epoch + 1}: {evaluate(model)}")
    return model


@dataclass
class HeadOptions:
    vocab_size: int = 4096
    n_ff: int = 0              # 0: half the target's feed-forward size
    tensor_type: str = "q4_0"
    epochs: int = 10
    lr: float = 1e-3
    tokens: int = 128          # tokens decoded per prompt
    exit_mix: float = 0.4      # share of training inputs given as exit-layer states (see the module doc)
    k: int = 4
    seed: int = 0


def head_shape(llm) -> dict:
    """Attention shape and RoPE base of the target, which the head copies; its own n_ff."""
    meta, arch = llm.metadata, llm.weights.arch
    n_head = int(meta[f"{arch}.attention.head_count"])
    return dict(n_head=n_head, n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
                head_dim=int(meta.get(f"{arch}.attention.key_length", llm.weights.n_embd // n_head)),
                n_ff=int(meta[f"{arch}.feed_forward_length"]),
                rope_freq_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), norm_eps=llm.weights.norm_eps)


def train_draft_head(llm, train_prompts: Sequence[Prompt], held_out: Sequence[Prompt], work_dir: str,
                     options: HeadOptions):
    """Collect, train and evaluate a draft head for llm's model: (HeadWeights, report dict).
    Data and a checkpoint per epoch stay in work_dir, so an interrupted run resumes."""
    import torch

    from .head_model import DraftHeadModel

    w = llm.weights
    train_traces = collect_sequences(llm, train_prompts, os.path.join(work_dir, "train"), options.tokens,
                                     "head data (train)")
    held_traces = collect_sequences(llm, held_out, os.path.join(work_dir, "held-out"), options.tokens,
                                    "head data (held-out)")
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
        return (f"held-out top-1 {rates.top1:.3f}, top-{options.k} {rates.topk:.3f}; "
                f"fed exit-layer states: top-{options.k} {fed.topk:.3f}")

    train_head(model, train_rows, vocab, epochs=options.epochs, lr=options.lr, seed=options.seed,
               checkpoint=os.path.join(work_dir, "head.pt"), exit_mix=options.exit_mix, evaluate=evaluate)
    rates, fed = held_out_rates(model)
    head = model.to_weights(vocab, options.tensor_type, rates.topk)
    report = {"train_rows": int(sum(len(r.label) for r in train_rows)), "held_out_steps": rates.steps,
              "vocab_size": int(len(vocab)), "vocab_coverage": rates.coverage, "top1": rates.top1,
              f"top{options.k}": rates.topk, f"top{options.k}_exit_fed": fed.topk, "exit_mix": options.exit_mix,
              "shape": shape, "tensor_type": options.tensor_type}
    return head, report, held_traces
