"""Small pure-Python parts: drafter, schedule, predictor file."""
import os

import numpy as np
import pytest
from conftest import constant_predictors

import specee_pc
from specee_pc import _native
from specee_pc.drafters import NgramDrafter, lookup_matches
from specee_pc.model_file import open_weights
from specee_pc.predictor_file import read_predictor_file, write_predictor_file
from specee_pc.schedule import ExitSchedule


def test_ngram_drafter_prefers_long_recent_matches():
    drafter = NgramDrafter(max_ngram=2)
    #            a  b  c  a  b  d  x  b
    context = [1, 2, 3, 1, 2, 4, 9, 2]
    # last 2-gram (9, 2) never seen before; last token 2 was followed by 4 (recent), then 3;
    # then the most frequent tokens fill up to k
    assert drafter.propose(context, 2) == [4, 3]
    assert drafter.propose(context, 4) == [4, 3, 2, 1]
    assert drafter.propose([5, 6, 5, 6, 5], 1) == [6]
    assert drafter.propose([7], 4) == [7]
    assert drafter.propose_flagged(context, 4) == ([4, 3, 2, 1], [True, True, False, False])  # the fill is not


def test_lookup_matches_are_the_scan_over_ngrams():
    """The native search returns what scanning n-grams from the longest, each from the most
    recent occurrence, returns (no fill: that is NgramDrafter's)."""
    def scan(context, k, max_ngram):
        found = []
        for n in range(min(max_ngram, len(context) - 1), 0, -1):
            for start in range(len(context) - n - 1, -1, -1):
                follower = context[start + n]
                if context[start:start + n] == context[-n:] and follower not in found:
                    found.append(follower)
        return found[:k]

    rng = np.random.default_rng(0)
    for _ in range(500):
        context = rng.integers(0, rng.integers(1, 8), size=rng.integers(1, 60)).tolist()
        k, max_ngram = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        assert lookup_matches(context, k, max_ngram) == scan(context, k, max_ngram)
        assert lookup_matches(np.array(context, np.int32), k, max_ngram) == scan(context, k, max_ngram)
        window = int(rng.integers(2, 70))  # the native search windows the context itself
        assert (_native.lookup_matches(np.array(context, np.int32), k, max_ngram, window)
                == scan(context[-window:], k, max_ngram))
    assert _native.lookup_matches(np.array([1, 2, 1], np.int32), 10**9) == [2]  # k beyond the context
    with pytest.raises(ValueError):
        NgramDrafter(search_window=0)


def test_schedule_adds_online_layers_after_five_exits():
    schedule = ExitSchedule(n_layer=30, offline=[20, 25], online_offsets=(-2, 0, 2))
    assert schedule.layers() == [20, 25]
    for layer in (10, 10, 12, 28, 27):
        schedule.record_exit(layer)
    # 28 + 2 and 27 + 2 are past n_layer - 2 and dropped
    assert schedule.layers() == [8, 10, 12, 14, 20, 25, 26, 27, 28]
    schedule.reset()
    assert schedule.layers() == [20, 25]


def test_predictor_file_round_trip(model_path, tmp_path):
    weights = open_weights(model_path)
    predictors = constant_predictors(weights, [12, 20], score_logit=3.0, threshold=0.7)
    predictors.layers[12].fc1_weight[:] = np.random.default_rng(1).normal(size=(8, 12))
    path = str(tmp_path / "p.gguf")
    write_predictor_file(path, predictors)
    loaded = read_predictor_file(path)
    assert (loaded.k, loaded.threshold, loaded.offline_layers) == (4, pytest.approx(0.7), [12, 20])
    assert sorted(loaded.layers) == [12, 20]
    np.testing.assert_array_equal(loaded.layers[12].fc1_weight, predictors.layers[12].fc1_weight)
    assert loaded.layers[20].fc2_bias == 3.0
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=2, verbose=False, predictor=path)
    assert llm.exit_stats is not None


def test_predictor_for_another_model_names_both(model_path, tmp_path):
    weights = open_weights(model_path)
    predictors = constant_predictors(weights, [12])
    predictors.model_n_layer = 24
    path = str(tmp_path / "other.gguf")
    write_predictor_file(path, predictors)
    with pytest.raises(specee_pc.ModelFileError, match="made for a llama with 24 layers.*is a llama with 30 layers"):
        specee_pc.Llama(model_path, n_ctx=256, n_threads=2, verbose=False, predictor=path)
    (tmp_path / "junk.gguf").write_text("junk")
    with pytest.raises(specee_pc.ModelFileError, match="not a readable GGUF predictor file"):
        read_predictor_file(str(tmp_path / "junk.gguf"))


def test_failed_write_leaves_no_file(model_path, tmp_path):
    predictors = constant_predictors(open_weights(model_path), [12])
    predictors.layers[12].fc1_weight = "not an array"
    with pytest.raises(Exception):
        write_predictor_file(str(tmp_path / "p.gguf"), predictors)
    assert os.listdir(tmp_path) == []


def test_auto_predictor_is_the_shipped_one_for_this_model_only(model_path, tmp_path):
    from specee_pc.default_model import shipped_predictor_path

    shipped = shipped_predictor_path(open_weights(model_path))
    assert shipped is not None and shipped.endswith("SmolLM2-135M-Instruct.Q4_1.specee.gguf")
    predictors = read_predictor_file(shipped)
    assert predictors.model_fingerprint and len(predictors.offline_layers) == 8 and len(predictors.layers) == 29
    llm = specee_pc.Llama(model_path, n_ctx=256, n_threads=2, verbose=False, predictor="auto")
    assert llm.exit_stats is not None
    # a fingerprint that differs (another tokenizer or LM head) is refused with both names
    predictors.model_fingerprint = "0123456789abcdef"
    with pytest.raises(specee_pc.ModelFileError, match="fingerprint 0123456789abcdef"):
        llm.configure_exits(predictor=_written(predictors, tmp_path))


def _written(predictors, tmp_path):
    path = str(tmp_path / "p.gguf")
    write_predictor_file(path, predictors)
    return path
