"""The native exit controller's features and MLP against a numpy implementation of SPEC §1."""
import numpy as np
import pytest

from specee_pc import _native
from specee_pc.model_file import open_weights


def mlp_score(x, fc1_w, fc1_b, fc2_w, fc2_b):
    return 1.0 / (1.0 + np.exp(-(fc2_w @ np.maximum(fc1_w @ x + fc1_b, 0.0) + fc2_b)))


def test_features_and_scores_match_numpy(llm, model_path):
    weights = open_weights(model_path)
    rng = np.random.default_rng(0)
    candidates = [1000, 2000, 3000, 4000]
    layers = {il: (rng.normal(size=(16, 12)).astype(np.float32), rng.normal(size=16).astype(np.float32),
                   rng.normal(size=16).astype(np.float32), 0.1) for il in (10, 20)}
    controller = _native.ExitController(weights, 1)
    for il, mlp in layers.items():
        controller.set_predictor(il, *mlp)
    controller.set_rule(_native.RULE_VERIFY, 2.0, 2.0)  # never exits: every scheduled layer is scored
    controller.set_schedule([10, 20])
    controller.set_candidates(candidates)

    llm.capture_layers([10, 20])
    llm.create_completion("The quick brown fox", max_tokens=1, temperature=0.0)
    rows = weights.lm_head_rows(candidates)
    controller.begin_step()
    p_prev = None
    for il in (10, 20):
        h = llm.hidden_state(il)
        assert controller.check_layer(il, h) is False
        lc = rows @ weights.final_norm(h)
        p = np.exp(lc - lc.max())
        p /= p.sum()
        delta = p if p_prev is None else p - p_prev  # change since the previously checked layer
        p_prev = p
        expected = mlp_score(np.concatenate([lc, p, delta]), *layers[il])
        assert controller.step()["last_score"] == np.float32(expected) or \
            abs(controller.step()["last_score"] - expected) < 1e-4
    assert controller.step()["n_checks"] == 2


def test_verify_rule_exits_only_on_a_candidate(llm, model_path):
    weights = open_weights(model_path)
    controller = _native.ExitController(weights, 1)
    always = (np.zeros((4, 12), np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), 10.0)
    controller.set_predictor(28, *always)
    controller.set_rule(_native.RULE_VERIFY, 0.5, 0.5)
    controller.set_schedule([28])
    llm.capture_layers([28])
    llm.create_completion("The capital of France is", max_tokens=1, temperature=0.0)
    h = llm.hidden_state(28)
    top = int(np.argmax(weights.lm_head_logits(weights.final_norm(h), 1)))

    controller.set_candidates([top, 1, 2, 3])
    controller.begin_step()
    assert controller.check_layer(28, h) is True
    step = controller.step()
    assert step["exit_layer"] == 28 and step["exit_token"] == top and step["n_lm_heads"] == 1
    assert int(np.argmax(controller.logits())) == top

    others = [t for t in range(10, 20) if t != top][:4]
    controller.set_candidates(others)  # the full LM head's argmax is not a candidate: no exit
    controller.begin_step()
    assert controller.check_layer(28, h) is False and controller.logits() is None

    controller.set_rule(_native.RULE_CANDIDATES, 0.5, 0.5)  # exits with the best candidate, logits of C only
    controller.begin_step()
    assert controller.check_layer(28, h) is True
    logits = controller.logits()
    assert np.isfinite(logits).sum() == 4 and controller.step()["exit_token"] in others


def test_unmatched_candidates_meet_their_own_threshold(llm, model_path):
    weights = open_weights(model_path)
    controller = _native.ExitController(weights, 1)
    sure = (np.zeros((4, 12), np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), 5.0)  # score 0.9933
    controller.set_predictor(28, *sure)
    controller.set_schedule([28])
    llm.capture_layers([28])
    llm.create_completion("The capital of France is", max_tokens=1, temperature=0.0)
    h = llm.hidden_state(28)
    top = int(np.argmax(weights.lm_head_logits(weights.final_norm(h), 1)))
    candidates = [top, 1, 2, 3]

    def exits(rule, threshold, threshold_unmatched, matched):
        controller.set_rule(rule, threshold, threshold_unmatched)
        controller.set_candidates(candidates, matched)
        controller.begin_step()
        return controller.check_layer(28, h)

    for rule in (_native.RULE_VERIFY, _native.RULE_CANDIDATES):
        assert exits(rule, 0.5, 0.999, [True, False, False, False]) is True   # the exit token was matched
        assert exits(rule, 0.5, 0.999, [False, True, True, True]) is False    # it was not: 0.9933 < 0.999
        assert exits(rule, 0.999, 0.5, [False, True, True, True]) is True     # the bars apply either way round
        assert exits(rule, 0.999, 0.5, []) is False                           # no flags: all matched
    # under verify a step no candidate can exit on skips the full LM head: none matched, 0.9933 < 0.999
    assert exits(_native.RULE_VERIFY, 0.5, 0.999, [False] * 4) is False and controller.step()["n_lm_heads"] == 0
    assert exits(_native.RULE_VERIFY, 0.5, 0.999, [False, True, False, False]) is False
    assert controller.step()["n_lm_heads"] == 1  # candidate 1 could: the LM head ran, its argmax is top
    controller.set_rule(_native.RULE_VERIFY, 0.5, 0.999)
    with pytest.raises(ValueError):
        controller.set_candidates(candidates, [True, False])
