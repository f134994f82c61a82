"""Calibration, training and conversion of predictors, on the real model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import specee_pc
from specee_pc import _native
from specee_pc.calibration import Records, chat_tokens, decode_with_exits, load_prompts, record_prompt, split_held_out
from specee_pc.drafters import NgramDrafter
from specee_pc.model_file import open_weights
from specee_pc.predictor_file import read_predictor_file
from specee_pc.training import features, oracle_exit_layers, train_layer

QUESTIONS = ["Write a poem about the sea and the sky.", "List five fruits and their colors.",
             "Explain how rain forms, step by step.", "Write a Python function that reverses a string.",
             "Summarize: The cat sat on the mat. The cat was happy. The mat was red.",
             "What are three uses of a paperclip?"]


class MLP(torch.nn.Module):
    """The SpecEE authors' predictor module (they pickle it whole, one file per layer)."""

    def __init__(self, n_in, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(hidden, 1)
        self.sigmoid = torch.nn.Sigmoid()

    def forward(self, x):
        return self.sigmoid(self.fc2(self.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def records(llm):
    parts = [record_prompt(llm, NgramDrafter(), chat_tokens(llm, q), 40, 4) for q in QUESTIONS[:3]]
    return Records.concat(parts)


def test_records_are_consistent(records, llm):
    n_layer = llm.weights.n_layer
    assert records.cand_logits.shape[1:] == (n_layer, 4) and len(records.label) > 60
    assert records.label[:, -1].all()  # the last layer's argmax is the emitted token (greedy)
    exits = oracle_exit_layers(records)
    assert ((exits >= 0) & (exits <= n_layer - 1)).all()


def test_records_along_an_output_with_exits(llm, reference):
    """On-policy records: the steps follow the output of decoding with exits under mask (here
    exits at layer 8, which make it drift from the full model's) and the labels stay the full
    model's: llama-cpp-python's greedy token after each prefix of that output, set against the
    n-gram candidates of that prefix."""
    from conftest import constant_predictors

    prompt = chat_tokens(llm, QUESTIONS[4])
    follow = decode_with_exits(llm, constant_predictors(llm.weights, [8]), NgramDrafter(), prompt, 24)
    assert llm.exit_stats is None  # exits are off again
    records = record_prompt(llm, NgramDrafter(), prompt, 24, 4, follow)
    reference.reset()
    reference.eval(prompt + follow[:1])
    greedy, expected_hit, expected_index = [], [], []
    for r in range(len(records.label)):
        context = prompt + follow[:r + 1]
        token = int(np.argmax(np.ctypeslib.as_array(reference._ctx.get_logits_ith(-1), shape=(reference.n_vocab(),))))
        candidates = NgramDrafter().propose(context, 4)
        greedy.append(token)
        expected_hit.append(token in candidates)
        expected_index.append(candidates.index(token) if token in candidates else -1)
        reference.eval(follow[r + 1:r + 2])
    assert len(records.label) == min(24, len(follow)) - (follow[-1] == llm.token_eos())
    assert greedy[:-1] != follow[1:len(greedy)]  # the output is not the full model's
    assert records.cand_hit.tolist() == expected_hit and records.final_index.tolist() == expected_index
    assert records.label[:, -1].all()  # the last layer's argmax is the full model's token


def feature_rows(records, n=1000):
    """Feature rows of many layers pooled: 1000 real rows without 1000 decode steps."""
    rows = np.concatenate([features(records, il, il - 2) for il in range(2, records.label.shape[1] - 1)])
    labels = np.concatenate([records.label[:, il] for il in range(2, records.label.shape[1] - 1)])
    order = np.random.default_rng(0).permutation(len(rows))
    return rows[order[:n]], labels[order[:n]], rows[order[n:2 * n]], labels[order[n:2 * n]]


def test_train_convert_load_gives_the_torch_scores(records, model_path, tmp_path):
    held_x, _, train_x, train_y = feature_rows(records)
    trained = train_layer(train_x, train_y, hidden=64, epochs=5)
    module = MLP(12, 64)
    with torch.no_grad():
        module.fc1.weight.copy_(torch.from_numpy(trained.fc1_weight))
        module.fc1.bias.copy_(torch.from_numpy(trained.fc1_bias))
        module.fc2.weight.copy_(torch.from_numpy(trained.fc2_weight[None, :]))
        module.fc2.bias.fill_(trained.fc2_bias)
        expected = module(torch.from_numpy(held_x)).squeeze(1).numpy()
    # the authors' two layouts, and a plain state_dict
    torch.save(module, tmp_path / "model20.pth")
    from safetensors_writer import write_safetensors
    write_safetensors(tmp_path / "mixed.safetensors",
                      {f"model.layers.{il}.pred.{a}.{b}": module.state_dict()[f"{f}.{b}"].numpy().astype(np.float16)
                       for il in (18, 20) for a, f in (("up", "fc1"), ("down", "fc2")) for b in ("weight", "bias")})
    torch.save({f"layers.22.{k}": v for k, v in module.state_dict().items()}, tmp_path / "state.pt")

    weights = open_weights(model_path)
    for inputs, layer, tolerance in (([tmp_path / "model20.pth"], 20, 1e-6),
                                     ([tmp_path / "mixed.safetensors"], 18, 2e-3),  # float16 weights
                                     ([tmp_path / "state.pt"], 22, 1e-6)):
        out = tmp_path / f"converted{layer}.gguf"
        result = subprocess.run([sys.executable, "-m", "specee_pc.cli", "convert", *map(str, inputs), "--model",
                                 model_path, "--offline-layers", str(layer), "-o", str(out)],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        predictors = read_predictor_file(str(out))
        predictors.check_model(weights, str(out), model_path)
        controller = _native.ExitController(weights, 1)
        p = predictors.layers[layer]
        controller.set_predictor(layer, p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias)
        np.testing.assert_allclose(controller.score(layer, held_x), expected, rtol=0, atol=tolerance)

    inspected = subprocess.run([sys.executable, "-m", "specee_pc.cli", "convert", "--inspect",
                                str(tmp_path / "converted18.gguf")],
                               capture_output=True, text=True, cwd=tmp_path)
    assert inspected.returncode == 0 and "layers [18, 20]" in inspected.stdout and "12 -> 64 -> 1" in inspected.stdout
    bad = subprocess.run([sys.executable, "-m", "specee_pc.cli", "convert", str(tmp_path / "model20.pth"), "--model",
                          model_path, "--offline-layers", "5", "-o", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "offline layers [5] have no predictor" in bad.stderr
    assert not (tmp_path / "x.gguf").exists()


def tiny_calibrate_command(model_path, tmp_path, out, *extra):
    """A calibrate run on QUESTIONS small enough for a test (4 training prompts, 2 held out)."""
    data = tmp_path / "prompts" / "mixed"
    data.mkdir(parents=True)
    (data / "question.jsonl").write_text("".join(json.dumps({"question_id": i, "turns": [q]}) + "\n"
                                                 for i, q in enumerate(QUESTIONS)))
    return [sys.executable, "-m", "specee_pc.cli", "calibrate", model_path, "--data", str(tmp_path / "prompts"),
            "-o", str(out), "--prompts", "4", "--held-out-per-set", "2", "--eval-prompts", "2", "-n", "12",
            "--epochs", "2", "--hidden", "32", "--n-offline-layers", "4", "-t", "2", *extra]


def test_calibrate_end_to_end_and_resume(model_path, tmp_path):
    out = tmp_path / "smol.specee.gguf"
    command = tiny_calibrate_command(model_path, tmp_path, out, "--on-policy")
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "precision" in first.stdout and "wrote" in first.stdout
    predictors = read_predictor_file(str(out))
    assert len(predictors.offline_layers) == 4 and sorted(predictors.layers) == list(range(29))
    report = json.loads((tmp_path / "smol.specee.gguf.report.json").read_text())
    assert report["held_out_steps"] > 0 and len(report["thresholds"]) == 7
    assert 0 < report["on_policy_train_steps"] < report["train_steps"]
    assert len(os.listdir(tmp_path / "smol.specee.gguf.calib" / "train")) == 4
    assert len(os.listdir(tmp_path / "smol.specee.gguf.calib" / "train-mask")) == 4
    # a second run reuses every collected prompt: no shard is written again
    shards = sorted((tmp_path / "smol.specee.gguf.calib").glob("*/*.npz"))
    written = [p.stat().st_mtime_ns for p in shards]
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr
    assert sorted((tmp_path / "smol.specee.gguf.calib").glob("*/*.npz")) == shards
    assert [p.stat().st_mtime_ns for p in shards] == written
    llm = specee_pc.Llama(model_path, n_ctx=512, n_threads=2, verbose=False, predictor=str(out))
    llm.create_completion("Count from one to twenty: one, two, three,", max_tokens=24, temperature=0.0)
    assert llm.exit_stats.steps > 0


def test_calibrate_with_draft_head(model_path, tmp_path):
    """--head trains a head, stores it with predictors trained on its candidates (merged with
    prompt lookup), and the file then drafts with them by default."""
    out = tmp_path / "head.specee.gguf"
    command = tiny_calibrate_command(model_path, tmp_path, out, "--head", "--head-epochs", "1", "--head-tokens", "12",
                                     "--head-vocab", "512", "--head-ff", "64", "--head-data", "code,prompts",
                                     "--head-budget", "600", "--head-levels", "2")
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "draft head: held-out chain acceptance by position" in done.stdout
    predictors = read_predictor_file(str(out))
    assert predictors.drafter == "head+lookup" and len(predictors.head.vocab) == 512 and predictors.head.n_ff == 64
    assert predictors.head.acceptance.shape == (4,) and predictors.head.bucket_share.shape == (4, 5)
    report = json.loads((tmp_path / "head.specee.gguf.report.json").read_text())
    head = report["draft_head"]
    assert 0 <= head["native_top_k_hit_rate"] <= head["vocab_coverage"] <= 1
    assert 0 < head["teacher_forced_rows"] < head["train_rows"] and head["data"] == ["code", "prompts"]
    assert len(os.listdir(tmp_path / "head.specee.gguf.calib" / "train-head+lookup")) == 4
    assert [p.name for p in (tmp_path / "head.specee.gguf.calib" / "head" / "text").iterdir()] == ["code-00000.npz"]
    inspected = subprocess.run([sys.executable, "-m", "specee_pc.cli", "convert", "--inspect", str(out)],
                               capture_output=True, text=True, cwd=tmp_path)
    assert "draft head    EAGLE-1" in inspected.stdout and "draft vocabulary 512 tokens" in inspected.stdout
    assert "held-out acceptance by position" in inspected.stdout
    llm = specee_pc.Llama(model_path, n_ctx=512, n_threads=2, verbose=False, predictor=str(out))
    assert type(llm.exit_drafter).__name__ == "HeadLookupDrafter"
    llm.create_completion("Count from one to twenty: one, two, three,", max_tokens=24, temperature=0.0)
    assert llm.exit_stats.candidate_steps > 0


def test_held_out_split_keeps_first_prompts_of_each_set(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "question.jsonl").write_text(
            "".join(json.dumps({"question_id": i, "turns": [f"{name}{i}"]}) + "\n" for i in range(5)))
    train, held = split_held_out(load_prompts([str(tmp_path)]), 2)
    assert [p.text for p in held] == ["a0", "a1", "b0", "b1"]
    assert [p.text for p in train] == ["a2", "a3", "a4", "b2", "b3", "b4"]
