"""The EAGLE-1 draft head: hidden-state feeding, native ggml inference against its torch twin,
incremental proposals, and the head as the engine's drafter."""
import dataclasses
import platform

import llama_cpp
import numpy as np
import pytest
import torch

import specee_pc
from conftest import N_CTX, N_THREADS, constant_predictors
from specee_pc import _native
from specee_pc.default_model import shipped_predictor_path
from specee_pc.calibration import chat_tokens
from specee_pc.drafters import HeadDrafter, HeadLookupDrafter, lookup_matches
from specee_pc.errors import ModelFileError
from specee_pc.head_model import DraftHeadModel
from specee_pc.head_training import exit_state_layers, record_sequence
from specee_pc.predictor_file import read_predictor_file, write_predictor_file
from specee_pc.replay import ReplayExits

PROMPT = "Write a short poem about the sea and the ships that sail on it."


@pytest.fixture(scope="module")
def shipped(llm):
    path = shipped_predictor_path(llm.weights)
    predictors = read_predictor_file(path)
    assert predictors.head is not None, "the predictor file shipped for SmolLM2 carries a draft head"
    return predictors


@pytest.fixture(scope="module")
def recorded(llm):
    """A prompt and a 24-token greedy continuation as head training records it."""
    return record_sequence(llm, chat_tokens(llm, PROMPT), 24, np.random.default_rng(0))


@pytest.fixture(scope="module")
def trace(recorded):
    """Tokens, the hidden state Llama feeds per position (f32), and the prompt's length."""
    return recorded.tokens, recorded.hidden.astype(np.float32), recorded.n_prompt


def test_fed_hidden_states_are_the_full_models_last_layer(llm, model_path, trace):
    """Every position's fed state, final-normed, gives llama.cpp's own logits through the LM head."""
    tokens, hidden, n_prompt = trace
    assert np.abs(hidden).sum(axis=1).min() > 0  # every position, the prompt's included
    every_row = llama_cpp.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, logits_all=True, verbose=False)
    try:
        every_row.eval(tokens[:-1].tolist())
        expected = every_row.scores[:len(tokens) - 1].copy()
    finally:
        every_row.close()
    w = llm.weights
    ours = np.stack([w.lm_head_logits(z, N_THREADS) for z in w.final_norm(hidden)])
    # batch shapes differ (our prompt batch, then one token per step), so near-ties may flip
    assert (ours.argmax(1) == expected.argmax(1)).mean() > 0.9
    assert np.abs(ours - expected).max() < 0.05 * np.abs(expected).max()


def test_recorded_exit_states_are_upper_layer_states(llm, recorded):
    """What head training swaps in for the final state after an exit: at every generated position
    the residual stream after one drawn upper-half layer, as a fresh decode of that prefix gives it."""
    layers = recorded.exit_layer[recorded.n_prompt:]
    assert (layers >= 0).all() and set(layers.tolist()) <= set(exit_state_layers(llm.weights.n_layer))
    assert len(set(layers.tolist())) > 1 and (recorded.exit_layer[:recorded.n_prompt] == -1).all()
    position = recorded.n_prompt + 5
    layer = int(recorded.exit_layer[position])
    llm.reset()
    llm.capture_layers([layer])
    try:
        llm.eval(recorded.tokens[:position + 1].tolist())
        expected = llm.hidden_state(layer)
    finally:
        llm.capture_layers([])
        llm.reset()
    got = recorded.exit_hidden[position].astype(np.float32)
    assert not np.allclose(got, recorded.hidden[position], atol=0.1)  # not the last layer's state
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def torch_head(llm, head):
    return DraftHeadModel.from_weights(head, llm.weights.lm_head_rows(head.vocab.tolist()))


def run_torch(llm, model, tokens, hidden):
    feat = llm.weights.final_norm(hidden)
    embd = llm.weights.embd_rows(tokens[1:].tolist())
    with torch.no_grad():
        h, logits = model(torch.from_numpy(embd)[None], torch.from_numpy(feat)[None])
    return h[0].numpy(), logits[0].numpy()


@pytest.mark.parametrize("tensor_type", ["f32", "q8_0", "q4_0"])
def test_native_head_matches_torch(llm, shipped, trace, tmp_path, tensor_type):
    """The ggml head against the torch head on the same inputs and weights. With f32 storage the
    layer agrees to float rounding, and the logits to ~1% (the LM-head rows are the target's q8_0
    ones, and ggml quantizes the activations of a q8_0 matmul to 8 bits); with q8_0 or q4_0 storage
    (q4_0: run repacked by llama.cpp's CPU kernels) every matmul does that, so both within 5%."""
    tokens, hidden, _ = trace
    head = dataclasses.replace(shipped.head, tensor_type=tensor_type)
    path = str(tmp_path / f"head-{tensor_type}.gguf")
    write_predictor_file(path, dataclasses.replace(shipped, head=head, layers={}))
    stored = read_predictor_file(path).head  # the weights as stored: torch runs the dequantized ones
    native = _native.DraftHead(path, llm.weights, 256, N_THREADS)
    if cpu_repacks_for_avx2():  # llama.cpp's CPU kernels interleave q4_0 there (not q8_0, f32)
        assert native.n_repacked == (5 if tensor_type == "q4_0" else 0)  # not the LM-head rows: q8_0
    native.set_features(0, hidden)
    h_native, logits_native = native.forward(tokens.tolist())
    h_torch, logits_torch = run_torch(llm, torch_head(llm, stored), tokens, hidden)
    hidden_tolerance, logits_tolerance = (1e-3, 0.01) if tensor_type == "f32" else (0.05, 0.05)
    assert np.abs(h_native - h_torch).max() < hidden_tolerance * np.abs(h_torch).max()
    bound = logits_tolerance * np.abs(logits_torch).max()
    assert np.abs(logits_native - logits_torch).max() < bound
    # the top-1 may differ only at near-ties: the two tokens' torch logits closer than the bound
    rows = np.arange(len(logits_torch))
    top1_native, top1_torch = logits_native.argmax(1), logits_torch.argmax(1)
    gap = logits_torch[rows, top1_torch] - logits_torch[rows, top1_native]
    assert (gap < bound).all() and (top1_native == top1_torch).mean() > 0.9


def cpu_repacks_for_avx2():
    """llama.cpp's CPU backend, as built, has AVX2 kernels and repacks weights for them."""
    info = llama_cpp.llama_print_system_info()
    return platform.machine() in ("x86_64", "AMD64") and b"AVX2 = 1" in info and b"REPACK = 1" in info


def forward_top4(path, weights, features, tokens):
    """t -> the top-4 target ids that row t-2 of a fresh head's all-rows graph drafts for token t,
    and the logits of those rows."""
    head = _native.DraftHead(path, weights, 256, N_THREADS)
    head.set_features(0, features)
    _, logits = head.forward(list(tokens))
    vocab = np.array(head.vocab())
    return (lambda t: vocab[np.argsort(-logits[t - 2])[:4]].tolist()), logits


def test_proposals_follow_rollbacks(llm, shipped, trace):
    """Step-by-step proposals, with the cache rolled back and fed other states, equal a fresh forward."""
    tokens, hidden, n_prompt = trace
    expected, logits = forward_top4(shipped.path, llm.weights, hidden, tokens.tolist())
    head = _native.DraftHead(shipped.path, llm.weights, 256, N_THREADS)
    head.set_features(0, hidden)
    for t in range(n_prompt, len(tokens)):
        assert head.propose(tokens[:t], 4) == expected(t)
        np.testing.assert_allclose(head.logits(), logits[t - 2], atol=1e-4)  # the proposal's own logits
    other = tokens.copy()
    other[n_prompt + 3] = (other[n_prompt + 3] + 1) % llm.weights.n_vocab  # a rejected token: rows from there rerun
    head.propose(other, 4)
    assert head.propose(tokens[:n_prompt + 8], 4) == expected(n_prompt + 8)
    # an exit's state at one position (another position's here): rows from there run again
    other_state = hidden.copy()
    other_state[n_prompt] = hidden[n_prompt - 3]
    head.set_features(n_prompt, other_state[n_prompt:n_prompt + 1])
    changed = head.propose(tokens, 4)
    expected_other, other_logits = forward_top4(shipped.path, llm.weights, other_state, tokens.tolist())
    assert np.abs(other_logits[-1] - logits[-1]).max() > 0.1  # the state matters to the last row
    assert changed == expected_other(len(tokens))
    head.set_features(n_prompt, hidden[n_prompt:n_prompt + 1])
    assert head.propose(tokens, 4) == expected(len(tokens))
    head.reset()  # a loaded state: no states at all until fed again
    assert head.propose(tokens, 4) == []
    fresh = _native.DraftHead(shipped.path, llm.weights, 256, N_THREADS)
    fresh.set_features(5, hidden[5:10])
    assert fresh.propose(tokens[:8], 4) == []  # states of positions 0..4 were never fed


def test_step_proposals_equal_a_forward_over_long_contexts(llm, shipped):
    """One-row proposals run a graph kept across steps (K/V written through index inputs,
    attention over a padded, masked span that grows every 64 positions); over a long context,
    and after a rollback onto other tokens, they equal the all-rows graph of another head."""
    rng = np.random.default_rng(1)
    n = 200
    tokens = rng.integers(0, llm.weights.n_vocab, n).astype(np.int32)
    other = tokens.copy()
    other[100:] = rng.integers(0, llm.weights.n_vocab, n - 100)
    features = rng.standard_normal((n, llm.weights.n_embd)).astype(np.float32)

    expected, _ = forward_top4(shipped.path, llm.weights, features, tokens.tolist())
    expected_other, _ = forward_top4(shipped.path, llm.weights, features, other.tolist())
    head = _native.DraftHead(shipped.path, llm.weights, 256, N_THREADS)
    head.set_features(0, features)
    for t in range(2, n + 1):
        assert head.propose(tokens[:t], 4) == expected(t), t
    assert head.rows_run == n - 1  # one row per step: its own K/V written, earlier rows read
    for t in range(101, 140):  # rows from 99 on read other tokens: rerun, then one row per step
        assert head.propose(other[:t], 4) == expected_other(t), t
    assert head.rows_run == n - 1 + len(range(101, 140))

    # a prompt's rows run at prefill; the proposal after the emitted token adds one row
    fresh = _native.DraftHead(shipped.path, llm.weights, 256, N_THREADS)
    assert not fresh.prefill(tokens[:150])  # no states fed yet
    fresh.set_features(0, features)
    assert fresh.prefill(tokens[:150]) and fresh.rows_run == 149
    assert fresh.propose(tokens[:151], 4) == expected(151)
    assert fresh.rows_run == 150


@pytest.mark.parametrize("kv_policy", ["exact", "mask"])
def test_head_drafts_fed(model_path, shipped, kv_policy):
    """The engine drafting with the shipped head alone: its candidates hold the emitted token
    often (a head fed wrong states would not), and the exact policy stays exact: its output is
    llama-cpp-python's own in the same batches (prompts decoded with every row's output, as
    llama_cpp does with logits_all)."""
    llm = specee_pc.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, verbose=False, predictor="auto",
                          kv_policy=kv_policy, drafter="head")
    try:
        assert type(llm.exit_drafter) is HeadDrafter
        tokens = chat_tokens(llm, PROMPT)
        ours = [t for _, t in zip(range(48), llm.generate(tokens, temp=0.0))]
        stats = llm.exit_stats
        assert stats.candidate_steps > 20 and stats.candidate_hits / stats.candidate_steps > 0.3
        assert stats.exits > 0
        if kv_policy == "exact":
            replay = llama_cpp.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, verbose=False, logits_all=True,
                                     draft_model=ReplayExits(stats.exits_at))
            assert ours == [t for _, t in zip(range(48), replay.generate(tokens, temp=0.0))]
            replay.close()
    finally:
        llm.close()


def test_auto_drafts_with_the_files_trained_candidates(llm, shipped, tmp_path):
    """auto picks the drafter the file's predictors learned from: the shipped file's head merged
    with prompt lookup, a file trained on the head alone its head."""
    assert shipped.drafter == "head+lookup"
    path = str(tmp_path / "head-only.gguf")
    write_predictor_file(path, dataclasses.replace(shipped, drafter="head"))
    try:
        llm.configure_exits(predictor=shipped.path)
        assert type(llm.exit_drafter) is HeadLookupDrafter
        llm.configure_exits(predictor=path)
        assert type(llm.exit_drafter) is HeadDrafter
    finally:
        llm.configure_exits()


def test_lookup_merged_candidates_hit_more_than_the_heads(model_path, shipped):
    """head+lookup keeps the head's top 2 and puts the context's repeats before the head's next:
    on every context of one output of the full model (exact policy), its candidates hold the
    next token more often than the head's own 4. (Compared on the same contexts: outputs that
    part at a near-tie would hold different repeats.)"""
    llm = specee_pc.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, verbose=False, predictor="auto",
                          kv_policy="exact", drafter="head+lookup")
    try:
        tokens = chat_tokens(llm, PROMPT)
        assert len([t for _, t in zip(range(96), llm.generate(tokens, temp=0.0))]) == 96
        merged, hits = llm.exit_drafter, {"head": 0, "head+lookup": 0}
        ends = range(len(tokens), llm.n_tokens)  # contexts the head still holds states for
        for end in ends:
            context, following = llm.input_ids[:end], llm.input_ids[end]
            head = HeadDrafter.propose(merged, context, 4)
            lookup = lookup_matches(context, 4)
            ours, matched = merged.propose_flagged(context, 4)
            assert ours == list(dict.fromkeys(head[:2] + lookup + head[2:]))[:4] and len(set(ours)) == 4
            assert matched == [c in lookup for c in ours]  # the flags the unmatched threshold reads
            hits["head"] += following in head
            hits["head+lookup"] += following in ours
    finally:
        llm.close()
    assert hits["head+lookup"] > hits["head"] + 0.05 * len(ends)  # measured 0.54 against 0.46


def test_head_drafter_errors(llm, model_path, tmp_path):
    plain = constant_predictors(llm.weights, [10])
    path = str(tmp_path / "plain.gguf")
    write_predictor_file(path, plain)
    with pytest.raises(ValueError, match="carries no draft head"):
        llm.configure_exits(predictor=path, drafter="head")
    llm.configure_exits(predictor=path)  # auto: prompt lookup without a head
    assert type(llm.exit_drafter).__name__ == "NgramDrafter"
    llm.configure_exits()
    with pytest.raises(ValueError, match="no draft head"):
        _native.DraftHead(path, llm.weights, 64)
    with pytest.raises(ModelFileError):
        read_predictor_file(str(tmp_path / "missing.gguf"))
    head = _native.DraftHead(shipped_predictor_path(llm.weights), llm.weights, 64)
    with pytest.raises(ValueError, match="prompt lookup"):
        head.lookup_propose(np.arange(8, dtype=np.int32), 4, 2, max_ngram=0)
    with pytest.raises(ValueError, match="lead"):
        head.lookup_propose(np.arange(8, dtype=np.int32), 4, -1)


def test_loaded_state_is_not_drafted_from_stale_states(model_path, shipped):
    """A loaded state's positions were never fed to the head: it proposes nothing for them rather
    than draft from another sequence's states, and the output stays the full model's."""
    llm = specee_pc.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, verbose=False, predictor="auto")
    try:
        tokens = chat_tokens(llm, PROMPT)
        first = [t for _, t in zip(range(8), llm.generate(tokens, temp=0.0))]
        state = llm.save_state()
        llm.generate(chat_tokens(llm, "Name three planets."), temp=0.0).__next__()  # other states at those positions
        llm.load_state(state)
        assert llm.exit_drafter.propose(llm.input_ids[:llm.n_tokens], 4) == []
        assert first == [t for _, t in zip(range(8), llm.generate(tokens, temp=0.0))]
    finally:
        llm.close()
