"""Draft-head training at scale: teacher-forced data, chain training against the native chain,
held-out chain acceptance, and the priors a head carries to the speculation control."""
import dataclasses
import json

import llama_cpp
import numpy as np
import pytest
import torch

from conftest import N_CTX, N_THREADS
from specee_pc import _native
from specee_pc.calibration import chat_tokens
from specee_pc.control import AcceptanceTracker, BatchCosts, HeadPriors, head_gain
from specee_pc.default_model import shipped_predictor_path
from specee_pc.head_data import collect_text, load_text_traces, sharegpt_conversations
from specee_pc.head_model import DraftHeadModel
from specee_pc.head_training import Rows, chain_acceptance
from specee_pc.predictor_file import read_predictor_file, write_predictor_file

CONVERSATIONS = [
    [{"role": "user", "content": "Name three rivers in Europe."},
     {"role": "assistant", "content": "The Danube, the Rhine and the Seine are three rivers in Europe."}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour!"}],
    [{"role": "user", "content": "Write a haiku about rain."},
     {"role": "assistant", "content": "Soft rain on the roof, / the garden drinks in silence, / puddles hold the sky"}],
]


@pytest.fixture(scope="module")
def shipped(llm):
    return read_predictor_file(shipped_predictor_path(llm.weights))


def test_sharegpt_reader_skips_the_evaluation_records_and_stops_at_the_truncated_end(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
               for i in range(6)]
    records[4]["conversations"].insert(0, {"from": "gpt", "value": "a reply before any question"})
    records[5]["conversations"][1]["value"] = ""  # an empty turn: skipped
    text = json.dumps(records, indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:-2] + ",\n" + json.dumps(records[0])[:25])  # a cut record at the end, as the package's
    got = list(sharegpt_conversations(str(path), skip=2))
    assert [c[0]["content"] for c in got] == ["q2", "q3", "q4"]
    assert got[0] == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def test_teacher_forced_records_are_the_targets_and_resume(llm, model_path, tmp_path):
    """Each position's greedy token is llama-cpp-python's argmax over the same batch; the hidden
    state, final-normed through the LM head, gives its logits; a larger budget later extends the
    shards from the conversation where they stopped."""
    first = collect_text(llm, "chat", str(tmp_path), budget=60, max_tokens=256, conversations=iter(CONVERSATIONS))
    assert len(first) == 1
    traces = load_text_traces(first, 10 ** 9)
    n_first = len(traces)
    assert 1 <= n_first < len(CONVERSATIONS)  # the budget stopped the shard
    tokens = chat_tokens(llm, CONVERSATIONS[0])
    trace = traces[0]
    assert trace.tokens.tolist() == tokens and len(trace.hidden) == len(tokens) - 1
    reference = llama_cpp.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, logits_all=True, verbose=False)
    try:
        reference.eval(tokens)
        expected = reference.scores[:len(tokens)].copy()
    finally:
        reference.close()
    assert (trace.greedy == expected.argmax(1)).all()  # the same single batch: exactly its argmax
    w = llm.weights
    ours = np.stack([w.lm_head_logits(z, N_THREADS) for z in w.final_norm(trace.hidden.astype(np.float32))])
    assert (ours.argmax(1) == expected[:-1].argmax(1)).mean() > 0.9
    again = collect_text(llm, "chat", str(tmp_path), budget=10 ** 6, max_tokens=256,
                         conversations=iter(CONVERSATIONS))
    assert again[0] == first[0] and len(again) == 2
    rest = load_text_traces(again[1:], 10 ** 9)
    assert [t.tokens.tolist() for t in rest] == [chat_tokens(llm, c) for c in CONVERSATIONS[n_first:]]


def test_chain_training_levels_are_the_native_heads_chain(llm, shipped, tmp_path):
    """forward_chain's level L at row n-1+L is what the native head drafts at chain position L+1
    (its own predicted features and drafted tokens fed back); level 0 is the plain forward."""
    head = dataclasses.replace(shipped.head, tensor_type="f32")
    path = str(tmp_path / "head-f32.gguf")
    write_predictor_file(path, dataclasses.replace(shipped, head=head, layers={}))
    stored = read_predictor_file(path).head
    w = llm.weights
    rng = np.random.default_rng(3)
    n = 40
    context = rng.integers(0, w.n_vocab, n + 1).astype(np.int32)
    hidden = rng.standard_normal((n, w.n_embd)).astype(np.float32) * 2
    native = _native.DraftHead(path, w, 256, N_THREADS)
    native.set_features(0, hidden)
    drafted, probs = native.draft(context, 3)
    assert len(drafted) == 3

    model = DraftHeadModel.from_weights(stored, w.lm_head_rows(stored.vocab.tolist()))
    tokens = np.concatenate([context, drafted[:2]])
    embd = torch.from_numpy(w.embd_rows(tokens[1:].tolist()))[None]
    feat = np.zeros((len(tokens) - 1, w.n_embd), np.float32)
    feat[:n] = w.final_norm(hidden)
    with torch.no_grad():
        levels = model.forward_chain(embd, torch.from_numpy(feat)[None], 3)
        plain = model(embd, torch.from_numpy(feat)[None])
    assert torch.equal(levels[0][1], plain[1])
    for position in range(3):
        logits = levels[position][1][0, n - 1 + position]
        p = torch.softmax(logits, -1)
        top = int(p.argmax())
        if stored.vocab[top] != drafted[position]:  # only at a near-tie
            assert p[top] - p[int(np.searchsorted(stored.vocab, drafted[position]))] < 0.01
        assert abs(float(p[top]) - probs[position]) < 0.02


class ScriptedHead:
    """forward_chain's stand-in: level L's top-1 over a 2-token vocabulary is scripted per row."""

    def __init__(self, top1):  # [levels, R] draft ids, each with probability 0.9
        self.top1 = top1

    def eval(self):
        pass

    def forward_chain(self, embd, feat, levels):
        out = []
        for level in range(levels):
            logits = torch.zeros((1, self.top1.shape[1], 2))
            logits[0, torch.arange(self.top1.shape[1]), torch.from_numpy(self.top1[level])] = float(np.log(9.0))
            out.append((None, logits))
        return out


def test_chain_acceptance_counts_positions_after_accepted_drafts():
    labels = np.full(5, 100)  # target id 100: draft id 0
    top1 = np.array([[0, 1, 0, 0, 0],    # position 1 of the chain started at row j
                     [0, 0, 1, 0, 0],    # position 2 (row j+1)
                     [0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0]])
    rows = [Rows(np.zeros((6, 1), np.float32), np.zeros((5, 1), np.float32), labels, np.ones(5, bool), None,
                 np.zeros(5, bool))]
    got = chain_acceptance(ScriptedHead(top1), rows, np.array([100, 200]), positions=4)
    # chains start at rows 0..4; position 1 right at rows 0, 2, 3, 4 (not 1)
    assert got.chains == 5 and got.acceptance[0] == pytest.approx(4 / 5)
    # position 2 after an accepted first draft (chains 0, 2, 3; chain 4 ends at the last row):
    # level 1 at rows 1, 3, 4, all right; then position 3: level 2 at rows 2 and 4
    assert got.acceptance[1] == pytest.approx(1.0) and got.acceptance[2] == pytest.approx(1.0)
    top1[1, 3] = 1  # chain 2's second draft wrong: its third is not drafted
    got = chain_acceptance(ScriptedHead(top1), rows, np.array([100, 200]), positions=4)
    assert got.acceptance[1] == pytest.approx(2 / 3) and got.acceptance[2] == pytest.approx(1.0)
    assert got.bucket_share[0, 4] == pytest.approx(1.0)  # probability 0.9: the top bucket


def test_head_priors_round_trip_and_drive_the_control(llm, shipped, tmp_path):
    good = dataclasses.replace(shipped.head, acceptance=np.array([0.8, 0.7, 0.6, 0.5], np.float32),
                               bucket_acceptance=np.tile(np.linspace(0.1, 0.9, 5, dtype=np.float32), (4, 1)),
                               bucket_share=np.full((4, 5), 0.2, np.float32))
    path = str(tmp_path / "priors.gguf")
    write_predictor_file(path, dataclasses.replace(shipped, head=good))
    head = read_predictor_file(path).head
    np.testing.assert_allclose(head.acceptance, good.acceptance)
    np.testing.assert_allclose(head.bucket_acceptance, good.bucket_acceptance)
    priors = HeadPriors.of(head)
    tracker = AcceptanceTracker(head=priors)
    assert tracker.mean("head", 3) == pytest.approx(0.6)
    assert tracker.estimate("head", 2, 0.95) == pytest.approx(0.9)  # its top bucket at position 2
    assert tracker.estimate("head", 6, 0.1) == pytest.approx(0.1)  # later positions share the last row
    assert HeadPriors.of(dataclasses.replace(head, acceptance=None)) is None
    costs = BatchCosts([1.0, 1.3, 1.6, 1.9, 2.2])
    poor = HeadPriors(np.full(4, 0.05), np.full((4, 5), 0.05), np.full((4, 5), 0.2))
    assert head_gain(costs, 0.02, priors) > 0.2 > head_gain(costs, 0.02, poor)


def test_chain_window_equals_the_full_chain():
    """Training runs chain positions 2.. over a window of rows: they equal the full chain's there."""
    torch.manual_seed(0)
    d = 64
    model = DraftHeadModel(d, 4, 2, 16, 64, 10000.0, 1e-5, np.random.default_rng(0).standard_normal((50, d)))
    embd, feat = torch.randn(2, 90, d), torch.randn(2, 90, d)
    with torch.no_grad():
        full = model.forward_chain(embd, feat, 4)
        window = model.forward_chain(embd, feat, 4, 30, 40)
    assert torch.equal(full[0][1], window[0][1])
    for level in range(1, 4):  # rows 30+level.. of the window start their chains inside it
        torch.testing.assert_close(window[level][1][:, level:], full[level][1][:, 30 + level:70])
