"""The early-exit engine on the real model: cut, exact repair, rules, schedules, policies."""
import numpy as np
import pytest
from conftest import N_THREADS, constant_predictors

import llama_cpp
import specee_pc
from specee_pc.drafters import lookup_matches
from specee_pc.replay import ReplayExits

PROMPT = "Write a detailed essay about the history of the Roman Empire."
# repeats itself, so that prompt lookup finds candidates
REPETITIVE = ("Count: one two three four five six seven eight nine ten. "
              "Again: one two three four five six seven eight nine ten. Again:")


def greedy(model, prompt, n):
    tokens = model.tokenize(prompt.encode())
    return [t for _, t in zip(range(n), model.generate(tokens, temp=0.0))]


def assert_exact(model_path, llm, prompt, n):
    """llm's greedy tokens equal llama-cpp-python's in the same batch shapes (SPEC §3: a lone token
    and a 2-token batch do not give bit-identical logits, so that is the only exact reference)."""
    ours = greedy(llm, prompt, n)
    exits = llm.exit_stats.exits_at
    reference = llama_cpp.Llama(model_path, n_ctx=llm.n_ctx(), n_threads=N_THREADS, verbose=False,
                                logits_all=True, draft_model=ReplayExits(exits))
    assert ours == greedy(reference, prompt, n)
    reference.close()
    return exits


def hooked(model_path, **options):
    return specee_pc.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, logits_all=True, **options)


@pytest.mark.parametrize("layer", [0, 15, 28])  # first, middle and last layer an exit may follow
def test_forced_exits_are_exact(model_path, layer):
    llm = hooked(model_path, force_exit_layers=[layer])
    exits = assert_exact(model_path, llm, PROMPT, 64)
    stats = llm.exit_stats
    assert stats.exits == stats.steps > 0 and {il for _, il, _ in exits} == {layer}
    assert stats.mean_layers == layer + 1
    if layer == 28:
        assert stats.accepted > 0  # late exits often guess right: the next token came for free


def test_exits_diverge_from_one_token_decoding_only_at_near_ties(model_path, reference):
    llm = specee_pc.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False, force_exit_layers=[20])
    ours = greedy(llm, PROMPT, 96)
    reference_logits = llama_cpp.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False, logits_all=True)
    theirs = greedy(reference_logits, PROMPT, 96)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is not None:
        n_prompt = len(reference_logits.tokenize(PROMPT.encode()))
        row = reference_logits.scores[n_prompt - 1 + first]
        gap = float(row[theirs[first]] - row[ours[first]])
        assert gap < 0.5, f"diverged at token {first} where the full model's logit gap is {gap:.3f}"
    reference_logits.close()


def test_threshold_of_one_never_exits(model_path, reference):
    llm = specee_pc.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False,
                          predictor=constant_predictors(llm_weights(model_path), [10, 20, 26]), exit_threshold=1.0)
    out = llm.create_completion(REPETITIVE, max_tokens=48, temperature=0.0)["choices"][0]["text"]
    assert out == reference.create_completion(REPETITIVE, max_tokens=48, temperature=0.0)["choices"][0]["text"]
    stats = llm.exit_stats
    assert stats.exits == 0 and stats.checks == 0 and stats.mean_layers == 30  # not even scored


@pytest.mark.parametrize("unmatched", [None, 0.99999])
def test_exits_on_tokens_lookup_did_not_find_need_the_unmatched_threshold(model_path, unmatched):
    # the predictors always score sigmoid(10) = 0.99995: above 0.5, below 0.99999
    llm = hooked(model_path, predictor=constant_predictors(llm_weights(model_path), [10, 20, 26]),
                 drafter="ngram", exit_threshold=0.5, exit_threshold_unmatched=unmatched)
    greedy(llm, REPETITIVE, 48)
    exits = llm.exit_stats.exits_at
    matched = [token in lookup_matches(list(llm.input_ids[:position + 1]), 4) for position, _, token in exits]
    assert sum(matched) > 0  # exits on the repeats either way
    assert all(matched) == (unmatched is not None)  # and on the fill tokens unless held back


def test_predictors_below_threshold_are_scored_but_never_exit(model_path, reference):
    never = constant_predictors(llm_weights(model_path), [10, 20, 26], score_logit=-10.0)
    llm = specee_pc.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False, predictor=never)
    out = llm.create_completion(REPETITIVE, max_tokens=48, temperature=0.0)["choices"][0]["text"]
    assert out == reference.create_completion(REPETITIVE, max_tokens=48, temperature=0.0)["choices"][0]["text"]
    stats = llm.exit_stats
    assert stats.exits == 0 and stats.checks == 3 * stats.steps and stats.candidate_hits > 0


def llm_weights(model_path):
    from specee_pc.model_file import open_weights
    return open_weights(model_path)


@pytest.mark.parametrize("rule", ["verify", "candidates"])
def test_predictor_exits_with_ngram_candidates(model_path, rule):
    predictors = constant_predictors(llm_weights(model_path), [18, 22, 26])
    llm = hooked(model_path, predictor=predictors, exit_rule=rule)
    exits = assert_exact(model_path, llm, REPETITIVE, 48)
    stats = llm.exit_stats
    assert stats.exits > 0 and stats.candidate_steps > 0 and stats.candidate_hits > 0
    assert {il for _, il, _ in exits} <= {18, 22, 26}
    if rule == "candidates":
        assert stats.lm_heads == 0  # exits without the full LM head
    else:
        assert stats.lm_heads >= stats.exits


def test_prompt_that_fills_the_context(model_path):
    # 256: llama.cpp pads smaller contexts to it, which llama_cpp.Llama's buffers do not follow
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=N_THREADS, verbose=False, force_exit_layers=[26])
    result = llm.create_completion(PROMPT, max_tokens=None, temperature=0.0)
    assert result["usage"]["total_tokens"] == 256 and result["choices"][0]["finish_reason"] == "length"
    assert llm.exit_stats.exits > 0
    assert max(position for position, _, _ in llm.exit_stats.exits_at) + 2 <= 256
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completion("word " * 300, max_tokens=4)


def test_switching_exit_configuration_between_calls(model_path, reference):
    llm = specee_pc.Llama(model_path, n_ctx=1024, n_threads=N_THREADS, verbose=False)
    expected = reference.create_completion(REPETITIVE, max_tokens=32, temperature=0.0)["choices"][0]["text"]
    assert llm.exit_stats is None
    llm.configure_exits(force_exit_layers=[24])
    llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)
    assert llm.exit_stats.exits > 0
    llm.configure_exits(predictor=constant_predictors(llm.weights, [20]), exit_rule="candidates")
    llm.create_completion(REPETITIVE, max_tokens=16, temperature=0.0)
    assert llm.exit_stats.exits > 0
    llm.configure_exits()  # off again: the plain full model
    llm.reset()  # from an empty cache, as the reference's (a kept prompt would end in a 1-token batch)
    assert llm.create_completion(REPETITIVE, max_tokens=32, temperature=0.0)["choices"][0]["text"] == expected
    assert llm.exit_stats is None


def test_bad_exit_options_are_rejected(model_path):
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=N_THREADS, verbose=False)
    with pytest.raises(ValueError, match="forced exit layers"):
        llm.configure_exits(force_exit_layers=[29])
    with pytest.raises(ValueError, match="exit rule"):
        llm.configure_exits(force_exit_layers=[5], exit_rule="sometimes")
    with pytest.raises(ValueError, match="kv_policy"):
        llm.configure_exits(force_exit_layers=[5], kv_policy="stale")
    with pytest.raises(ValueError, match="drafter"):
        llm.configure_exits(force_exit_layers=[5], drafter="eagle")


def test_draft_model_drafter(model_path):
    # the target as its own draft: its top-4 always hold the full model's token
    predictors = constant_predictors(llm_weights(model_path), [20, 26])
    llm = hooked(model_path, predictor=predictors, drafter=model_path)
    assert_exact(model_path, llm, PROMPT, 40)
    stats = llm.exit_stats
    assert stats.exits > 0 and stats.drafter_ms > 0
    assert stats.candidate_hits == stats.candidate_steps > 0


def test_draft_model_with_another_vocabulary_is_rejected(model_path, tmp_path):
    import gguf

    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("output_norm.weight", np.ones(576, np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((100, 576), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=N_THREADS, verbose=False)
    with pytest.raises(ValueError, match="vocabulary of 100 tokens, the target 49152"):
        llm.configure_exits(predictor=constant_predictors(llm.weights, [20]), drafter=path)


def test_interrupted_exit_step_leaves_a_consistent_cache(model_path, reference):
    llm = specee_pc.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, force_exit_layers=[20])
    decode_at, calls = llm._decode_at, []

    def interrupted_after_the_cut(n_past, tokens, all_logits):
        decode_at(n_past, tokens, all_logits)
        calls.append(len(tokens))
        if len(calls) == 3:  # the first pass of a decode step: cut, not yet repaired
            raise KeyboardInterrupt

    llm._decode_at = interrupted_after_the_cut
    with pytest.raises(KeyboardInterrupt):
        llm.create_completion(PROMPT, max_tokens=10, temperature=0.0)
    llm._decode_at = decode_at
    follow_up = PROMPT + " It"  # reuses the cached prefix
    assert llm.create_completion(follow_up, max_tokens=16, temperature=0.0)["choices"][0]["text"] == \
        reference.create_completion(follow_up, max_tokens=16, temperature=0.0)["choices"][0]["text"]


def test_a_cut_does_not_outlive_its_step(model_path):
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=N_THREADS, verbose=False, logits_all=True,
                          kv_policy="mask", force_exit_layers=[10])
    llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)
    assert llm.exit_stats.exits == 3
    # a decode outside the engine (embeddings, multimodal chunks) runs the whole graph
    llm.capture_layers([29])
    llm._batch.set_batch(batch=[llm.token_bos()], n_past=llm.n_tokens, logits_all=False)
    llm._ctx.decode(llm._batch)
    assert llm.hidden_state(29).shape == (576,)  # no cut: the last layer ran


def test_single_token_batches_never_exit(model_path, reference):
    llm = specee_pc.Llama(model_path, n_ctx=256, n_batch=1, n_threads=N_THREADS, verbose=False,
                          force_exit_layers=[20])
    out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert out == reference.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert llm.exit_stats.exits == 0


def test_a_rejected_configuration_keeps_the_current_one(model_path):
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=N_THREADS, verbose=False,
                          kv_policy="mask", force_exit_layers=[10])
    llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)
    with pytest.raises(ValueError):
        llm.configure_exits(force_exit_layers=[10], kv_policy="stale")
    assert llm._hook.n_holes == 3 and llm.exit_stats is not None
    with pytest.raises(ValueError, match="kv_policy 'mask'"):
        llm.load_state(llm.save_state())
