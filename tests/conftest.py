"""Shared fixtures: the real SmolLM2-135M model, loaded once per test session."""
import llama_cpp
import pytest

import specee_pc

N_THREADS = 2
N_CTX = 1024


@pytest.fixture(scope="session")
def model_path() -> str:
    return specee_pc.default_model_path()


@pytest.fixture(scope="session")
def llm(model_path) -> specee_pc.Llama:
    model = specee_pc.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, seed=1234, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="session")
def reference(model_path) -> llama_cpp.Llama:
    """llama-cpp-python's own Llama on the same model: the reference for every exactness check."""
    model = llama_cpp.Llama(model_path, n_ctx=N_CTX, n_threads=N_THREADS, seed=1234, verbose=False)
    yield model
    model.close()


def constant_predictors(weights, layers, k=4, score_logit=10.0, threshold=0.5, hidden=8):
    """Predictors scoring sigmoid(score_logit) whatever the features: they exercise the exit
    mechanics (candidates, verification, cut, repair) without trained weights."""
    from specee_pc.predictor_file import LayerPredictor, PredictorFile

    import numpy as np

    flat = LayerPredictor(np.zeros((hidden, 3 * k), np.float32), np.zeros(hidden, np.float32),
                          np.zeros(hidden, np.float32), float(score_logit))
    return PredictorFile(weights.arch, weights.n_layer, weights.n_embd, weights.n_vocab, k, threshold,
                         list(layers), layers={il: flat for il in layers})
