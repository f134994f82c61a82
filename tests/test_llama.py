"""specee_pc.Llama behaves exactly like llama_cpp.Llama on the same model."""
import llama_cpp
import pytest

import specee_pc
from specee_pc import _native
from specee_pc.cli.bench import main as bench_main
from specee_pc.errors import LlamaCppBuildError
from specee_pc.drafters import open_draft_model

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of a paperclip.",
    "def fibonacci(n):",
]


def text(result):
    return result["choices"][0]["text"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_llama_cpp(llm, reference, prompt):
    ours = llm.create_completion(prompt, max_tokens=64, temperature=0.0)
    theirs = reference.create_completion(prompt, max_tokens=64, temperature=0.0)
    assert text(ours) == text(theirs)
    assert ours["usage"] == theirs["usage"]


def test_greedy_tokens_equal_llama_cpp(llm, reference):
    tokens = llm.tokenize(PROMPTS[0].encode())
    ours = [t for _, t in zip(range(96), llm.generate(tokens, temp=0.0))]
    theirs = [t for _, t in zip(range(96), reference.generate(tokens, temp=0.0))]
    assert ours == theirs


def test_chat_completion_uses_the_gguf_template(llm, reference):
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    ours = llm.create_chat_completion(messages=messages, max_tokens=48, temperature=0.0)
    theirs = reference.create_chat_completion(messages=messages, max_tokens=48, temperature=0.0)
    assert ours["choices"][0]["message"] == theirs["choices"][0]["message"]


def test_sampling_with_seed_equals_llama_cpp(llm, reference):
    options = dict(max_tokens=48, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=7)
    assert (text(llm.create_completion(PROMPTS[1], **options))
            == text(reference.create_completion(PROMPTS[1], **options)))


def test_stream_and_stop_strings(llm, reference):
    streamed = "".join(text(c) for c in llm.create_completion(PROMPTS[2], max_tokens=48, temperature=0.0, stream=True))
    assert streamed == text(llm.create_completion(PROMPTS[2], max_tokens=48, temperature=0.0))
    ours = llm.create_completion(PROMPTS[2], max_tokens=48, temperature=0.0, stop=["\n"])
    theirs = reference.create_completion(PROMPTS[2], max_tokens=48, temperature=0.0, stop=["\n"])
    assert text(ours) == text(theirs) and "\n" not in text(ours)


def test_last_stats_count_generated_tokens(llm):
    result = llm.create_completion(PROMPTS[3], max_tokens=20, temperature=0.0)
    stats = llm.last_stats
    assert stats.generated_tokens == (result["usage"]["completion_tokens"]
                                      + (result["choices"][0]["finish_reason"] == "stop"))
    assert stats.prompt_tokens == result["usage"]["prompt_tokens"]
    assert stats.decode_tokens_per_second > 0


def test_prompt_longer_than_context_raises_and_model_still_works(llm, reference):
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completion("word " * 2000, max_tokens=4)
    assert text(llm.create_completion(PROMPTS[0], max_tokens=16, temperature=0.0)) == \
        text(reference.create_completion(PROMPTS[0], max_tokens=16, temperature=0.0))


def test_bad_model_files_raise_model_file_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    with pytest.raises(specee_pc.ModelFileError, match="not a GGUF file"):
        specee_pc.Llama(str(bad), verbose=False)
    with pytest.raises(specee_pc.ModelFileError, match="no such file"):
        specee_pc.Llama(str(tmp_path / "missing.gguf"), verbose=False)


def test_offload_first_layers(model_path, reference, monkeypatch):
    """Reversed offload reloads the model with the deep layers overridden to the CPU. This
    machine has no GPU, so the overrides only move CPU tensors: the path runs, outputs stay
    exact; what it does on a GPU is untested here."""
    from specee_pc.offload import deep_layers_pattern

    assert deep_layers_pattern(30, 27) == r"^blk\.(27|28|29)\."
    monkeypatch.setattr(specee_pc.llama.llama_cpp, "llama_supports_gpu_offload", lambda: True)
    llm = specee_pc.Llama(model_path, n_ctx=512, n_threads=2, verbose=False, n_gpu_layers=10,
                          offload_first_layers=True, force_exit_layers=[5])
    llm.configure_exits()
    assert text(llm.create_completion(PROMPTS[1], max_tokens=24, temperature=0.0)) == \
        text(reference.create_completion(PROMPTS[1], max_tokens=24, temperature=0.0))
    assert llm.tokenize(b"hello") == reference.tokenize(b"hello")


def test_weights_stay_out_of_the_amx_store(model_path, reference, llm, monkeypatch, capsys):
    """Where llama.cpp has AMX kernels (they crash in this version) the model is loaded again
    without extra buffer types, with a warning; elsewhere llama.cpp's repacking stays on. This
    machine's build has no AMX store (README's CMAKE_ARGS), so it is simulated: the reload path
    runs and decodes (SmolLM2's q4_1 has no repacked kernels on x86: its output stays exact)."""
    assert llm.model_params.use_extra_bufts == ("AMX" not in _native.cpu_extra_buffer_types())
    monkeypatch.setattr(_native, "cpu_extra_buffer_types", lambda: ["AMX", "CPU_REPACK"])
    with pytest.warns(RuntimeWarning, match="AMX"):
        no_amx = specee_pc.Llama(model_path, n_ctx=512, n_threads=2, verbose=False)
    try:
        assert not no_amx.model_params.use_extra_bufts
        assert text(no_amx.create_completion(PROMPTS[0], max_tokens=24, temperature=0.0)) == \
            text(reference.create_completion(PROMPTS[0], max_tokens=24, temperature=0.0))
        # what loads llama-cpp-python's own Llama stops with one line instead
        with pytest.raises(LlamaCppBuildError, match="GGML_NATIVE=OFF"):
            open_draft_model(model_path, target_vocab=no_amx.n_vocab(), n_ctx=512, n_threads=2)
    finally:
        no_amx.close()
    assert bench_main(["--per-set", "1", "--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGML_NATIVE=OFF" in err, err


def test_a_grammar_llama_cpp_cannot_parse_is_an_error_not_a_crash(llm):
    bad = llama_cpp.LlamaGrammar.from_string("root ::= (", verbose=False)
    with pytest.raises(ValueError, match="grammar"):
        llm.create_completion("The answer is", max_tokens=4, grammar=bad)
    good = llama_cpp.LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    assert llm.create_completion("The answer is", max_tokens=4, grammar=good)["choices"][0]["text"] in ("yes", "no")
