"""Predictor files: per-layer SpecEE MLPs in a GGUF file tied to the model they were made for.

Layout (general.architecture = "specee-predictor"):
  specee.model.{arch,n_layer,n_embd,n_vocab}   the model the predictors were trained for
  specee.k                                     candidates per step (features = 3k)
  specee.threshold                             default exit threshold on the sigmoid score
  specee.offline_layers                        layers always checked
  specee.online_offsets                        offsets around recent exit layers, e.g. [-2, 0, 2]
  blk.<i>.fc1.weight [H, 3k], blk.<i>.fc1.bias [H], blk.<i>.fc2.weight [H], blk.<i>.fc2.bias [1]
The training issue extends this (tokenizer fingerprint, drafter); readers ignore unknown keys.
"""
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from .errors import ModelFileError

ARCH = "specee-predictor"


@dataclass
class LayerPredictor:
    fc1_weight: np.ndarray  # [H, 3k]
    fc1_bias: np.ndarray    # [H]
    fc2_weight: np.ndarray  # [H]
    fc2_bias: float


@dataclass
class PredictorFile:
    model_arch: str
    model_n_layer: int
    model_n_embd: int
    model_n_vocab: int
    k: int
    threshold: float
    offline_layers: List[int]
    online_offsets: List[int] = field(default_factory=lambda: [-2, 0, 2])
    layers: Dict[int, LayerPredictor] = field(default_factory=dict)

    def check_model(self, weights, predictor_path: str, model_path: str) -> None:
        """Raise ModelFileError naming both models unless this file was made for `weights`."""
        ours = (self.model_arch, self.model_n_layer, self.model_n_embd, self.model_n_vocab)
        theirs = (weights.arch, weights.n_layer, weights.n_embd, weights.n_vocab)
        if ours != theirs:
            fmt = "{} with {} layers, n_embd {}, vocab {}".format
            raise ModelFileError(f"{predictor_path}: predictors made for a {fmt(*ours)}, "
                                 f"but {model_path} is a {fmt(*theirs)}")


def write_predictor_file(path: str, predictors: PredictorFile) -> None:
    """Write atomically: a failure leaves no partial file at `path`."""
    import gguf

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".gguf.part", dir=directory)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=ARCH)
        writer.add_string("specee.model.arch", predictors.model_arch)
        writer.add_uint32("specee.model.n_layer", predictors.model_n_layer)
        writer.add_uint32("specee.model.n_embd", predictors.model_n_embd)
        writer.add_uint32("specee.model.n_vocab", predictors.model_n_vocab)
        writer.add_uint32("specee.k", predictors.k)
        writer.add_float32("specee.threshold", predictors.threshold)
        writer.add_array("specee.offline_layers", [int(x) for x in predictors.offline_layers])
        writer.add_array("specee.online_offsets", [int(x) for x in predictors.online_offsets])
        for il, p in sorted(predictors.layers.items()):
            writer.add_tensor(f"blk.{il}.fc1.weight", np.ascontiguousarray(p.fc1_weight, dtype=np.float32))
            writer.add_tensor(f"blk.{il}.fc1.bias", np.ascontiguousarray(p.fc1_bias, dtype=np.float32))
            writer.add_tensor(f"blk.{il}.fc2.weight", np.ascontiguousarray(p.fc2_weight, dtype=np.float32))
            writer.add_tensor(f"blk.{il}.fc2.bias", np.array([p.fc2_bias], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_predictor_file(path: str) -> PredictorFile:
    import gguf

    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such predictor file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct.error, ...
        raise ModelFileError(f"{path}: not a readable GGUF predictor file ({e})") from None

    def value(key: str):
        if key not in reader.fields:
            raise ModelFileError(f"{path}: not a specee predictor file (no {key})")
        return reader.fields[key].contents()

    if value("general.architecture") != ARCH:
        raise ModelFileError(f"{path}: not a specee predictor file (architecture {value('general.architecture')!r})")
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    layers = {}
    for name in tensors:
        if name.endswith(".fc1.weight"):
            il = int(name.split(".")[1])
            prefix = f"blk.{il}."
            fc1 = tensors[prefix + "fc1.weight"]
            layers[il] = LayerPredictor(fc1.reshape(-1, 3 * value("specee.k")), tensors[prefix + "fc1.bias"],
                                        tensors[prefix + "fc2.weight"].reshape(-1), float(tensors[prefix + "fc2.bias"][0]))
    return PredictorFile(
        model_arch=value("specee.model.arch"), model_n_layer=int(value("specee.model.n_layer")),
        model_n_embd=int(value("specee.model.n_embd")), model_n_vocab=int(value("specee.model.n_vocab")),
        k=int(value("specee.k")), threshold=float(value("specee.threshold")),
        offline_layers=[int(x) for x in value("specee.offline_layers")],
        online_offsets=[int(x) for x in value("specee.online_offsets")], layers=layers)

