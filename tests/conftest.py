"""Shared fixtures: the real SmolLM2-135M model, loaded once per test session."""
import llama_cpp
import pytest

import specee_pc
from specee_pc import predictor_file
from specee_pc.cpu_backend import check_plain_llama_cpp
from specee_pc.errors import LlamaCppBuildError

N_THREADS = 2
N_CTX = 1024


def pytest_sessionstart(session):
    """The reference of every exactness test is llama-cpp-python's own Llama: where it would
    crash (llama.cpp's AMX kernels), stop at once and say why."""
    try:
        check_plain_llama_cpp("the tests' reference")
    except LlamaCppBuildError as e:
        pytest.exit(str(e), returncode=1)


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


@pytest.fixture(autouse=True)
def fresh_caches(request):
    """Each test starts the shared models from an empty cache, as the models it makes start: a
    prefix kept from another test's call would end in a 1-token batch, other batch shapes
    (SPEC §3), and a near-tie may then part."""
    for name in ("llm", "reference"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def constant_predictors(weights, layers, score_logit=10.0, **options):
    """Predictors that always fire unless score_logit is negative (see predictor_file)."""
    return predictor_file.constant_predictors(weights, layers, score_logit, **options)
