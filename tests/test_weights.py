"""The native GGUF reader against the gguf package's reader, on the real model."""
import numpy as np
import pytest
from gguf import GGUFReader, quants

from specee_pc import ModelFileError
from specee_pc.model_file import open_weights


@pytest.fixture(scope="module")
def gguf_reader(model_path):
    return GGUFReader(model_path)


@pytest.fixture(scope="module")
def weights(model_path):
    return open_weights(model_path)


def field(reader, key):
    return reader.fields[key].contents()


def tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_metadata_matches_gguf_package(weights, gguf_reader):
    arch = field(gguf_reader, "general.architecture")
    assert weights.arch == arch == "llama"
    assert weights.n_layer == field(gguf_reader, f"{arch}.block_count") == 30
    assert weights.n_embd == field(gguf_reader, f"{arch}.embedding_length")
    assert weights.norm_eps == pytest.approx(field(gguf_reader, f"{arch}.attention.layer_norm_rms_epsilon"))
    # SmolLM2 ties its LM head to the token embedding
    assert weights.lm_head_tensor == "token_embd.weight"
    head = tensor(gguf_reader, "token_embd.weight")
    assert weights.n_vocab == head.shape[1]
    assert weights.lm_head_type == head.tensor_type.name.lower()


def test_output_norm_matches_gguf_package(weights, gguf_reader):
    expected = np.asarray(tensor(gguf_reader, "output_norm.weight").data, dtype=np.float32)
    np.testing.assert_array_equal(weights.output_norm(), expected)


def test_lm_head_rows_match_gguf_dequantize(weights, gguf_reader):
    head = tensor(gguf_reader, "token_embd.weight")
    ids = [0, 1, 17, 4096, weights.n_vocab - 1]
    expected = quants.dequantize(head.data[ids], head.tensor_type)
    np.testing.assert_allclose(weights.lm_head_rows(ids), expected, rtol=0, atol=1e-6)


def test_lm_head_rows_rejects_bad_ids(weights):
    with pytest.raises(IndexError):
        weights.lm_head_rows([weights.n_vocab])
    with pytest.raises(IndexError):
        weights.lm_head_rows([-1])


def test_final_norm_is_rmsnorm_times_weight(weights):
    x = np.random.default_rng(0).normal(size=weights.n_embd).astype(np.float32) * 7
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + weights.norm_eps) * weights.output_norm()
    np.testing.assert_allclose(weights.final_norm(x), expected, rtol=1e-5)


def test_bad_files_are_rejected_with_one_line_reasons(model_path, tmp_path):
    data = open(model_path, "rb").read(2_000_000)
    cases = {
        "missing.gguf": (None, "no such file"),
        "text.gguf": (b"hello, not a model\n", "not a GGUF file"),
        "empty.gguf": (b"", "not a GGUF file"),
        "header_cut.gguf": (data[:1000], "corrupt or truncated GGUF file"),
        "data_cut.gguf": (data, "truncated GGUF file: tensor"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelFileError) as e:
            open_weights(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message, message
