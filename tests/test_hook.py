"""The native eval-callback hook: hidden states of layers during real decode steps."""
import numpy as np
import pytest

PROMPT = "The history of the Roman Empire begins with"


def test_last_layer_hidden_state_reproduces_greedy_tokens(llm):
    """final norm + LM head on l_out-(N-1) must give llama.cpp's own greedy token (SPEC: ≥ 98%)."""
    w = llm.weights
    last = w.n_layer - 1
    lm_head = w.lm_head_rows(list(range(w.n_vocab)))
    llm.capture_layers([last])
    agree = 0
    n = 100
    tokens = llm.tokenize(PROMPT.encode())
    for i, token in enumerate(llm.generate(tokens, temp=0.0)):
        if i == n:
            break
        # the hidden state is from the decode step whose logits produced this token
        predicted = int(np.argmax(lm_head @ w.final_norm(llm.hidden_state(last))))
        agree += predicted == token
    assert agree >= 98, f"only {agree}/{n} tokens reproduced"


def test_captures_only_the_chosen_layers(llm):
    llm.capture_layers([0, 14])
    llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)
    h0, h14 = llm.hidden_state(0), llm.hidden_state(14)
    assert h0.shape == h14.shape == (llm.weights.n_embd,)
    assert np.isfinite(h0).all() and np.isfinite(h14).all()
    assert not np.allclose(h0, h14)
    with pytest.raises(KeyError):
        llm.hidden_state(5)
    with pytest.raises(IndexError):
        llm.capture_layers([llm.weights.n_layer])


def test_capture_does_not_change_the_output(llm):
    llm.capture_layers([])
    plain = llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    llm.capture_layers(range(llm.weights.n_layer))
    captured = llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    llm.capture_layers([])
    assert plain == captured
