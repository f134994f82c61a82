"""Predictor files: per-layer SpecEE MLPs in a GGUF file tied to the model they were made for.

Layout (general.architecture = "specee-predictor"):
  specee.model.{arch,n_layer,n_embd,n_vocab}   the model the predictors were trained for
  specee.model.name                            its file name, for messages
  specee.model.fingerprint                     hash of its tokenizer and LM head ("" if unknown)
  specee.drafter                               the drafter whose candidates they were trained on
  specee.features                              "lc,p,delta": k candidate logits, their softmax, its
                                               change since the previously checked layer
  specee.k                                     candidates per step (features = 3k)
  specee.threshold                             default exit threshold on the sigmoid score
  specee.offline_layers                        layers always checked
  specee.online_offsets                        offsets around recent exit layers, e.g. [-2, 0, 2]
  blk.<i>.fc1.weight [H, 3k], blk.<i>.fc1.bias [H], blk.<i>.fc2.weight [H], blk.<i>.fc2.bias [1]
Optional EAGLE-1 draft head (native/head.cpp runs it; specee_pc.head_model is its torch twin):
  specee.head.{n_head,n_head_kv,head_dim,n_ff,rope_freq_base,norm_eps}
  specee.head.top_k_hit_rate                   held-out share of steps whose greedy token is in its top k
  specee.head.chain_acceptance [P] f32         optional: held-out acceptance of its chains' drafts at
                                               positions 1..P (given the drafts before were accepted)
  specee.head.bucket_acceptance [P*B] f32      ... by position and by the head's probability of its
  specee.head.bucket_share [P*B] f32           draft (B buckets, control.HEAD_BUCKETS), and how often
                                               each bucket comes: the speculation control's priors
  head.vocab [N] i32                           draft vocabulary: target token ids
  head.fc.weight [d, 2d], head.fc.bias [d], head.attn_{q,k,v,output}.weight, head.ffn_norm.weight,
  head.ffn_{gate,up,down}.weight               (torch's [out, in]; f16, q8_0 or q4_0 matrices)
Readers ignore keys they do not know.
"""
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .drafters import HEAD_DRAFTERS
from .errors import ModelFileError

ARCH = "specee-predictor"
FEATURES = "lc,p,delta"


def model_fingerprint(weights) -> str:
    """Ties a file to one model: its tokenizer and LM head (64 rows across the vocabulary)."""
    digest = hashlib.sha256()
    digest.update(f"{weights.tokenizer_hash}:{weights.n_vocab}:{weights.n_embd}".encode())
    ids = np.linspace(0, weights.n_vocab - 1, 64).astype(int).tolist()
    digest.update(weights.lm_head_rows(ids).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class LayerPredictor:
    fc1_weight: np.ndarray  # [H, 3k]
    fc1_bias: np.ndarray    # [H]
    fc2_weight: np.ndarray  # [H]
    fc2_bias: float


HEAD_MATRICES = ("fc.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
HEAD_VECTORS = ("fc.bias", "ffn_norm.weight")
HEAD_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass
class HeadWeights:
    """An EAGLE-1 draft head: its shape, its tensors (float32, torch layout) and vocabulary."""

    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rope_freq_base: float
    norm_eps: float
    vocab: np.ndarray                       # [N] int32 target ids
    tensors: Dict[str, np.ndarray]          # HEAD_MATRICES + HEAD_VECTORS, without the "head." prefix
    tensor_type: str = "q8_0"               # storage type of the matrices
    top_k_hit_rate: float = float("nan")
    acceptance: Optional[np.ndarray] = None         # [P] chain acceptance by position (None: not measured)
    bucket_acceptance: Optional[np.ndarray] = None  # [P, B] ... by position and probability bucket
    bucket_share: Optional[np.ndarray] = None       # [P, B] how often each bucket comes at each position


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
    model_name: str = ""
    model_fingerprint: str = ""
    drafter: str = "ngram"
    features: str = FEATURES
    head: Optional[HeadWeights] = None
    path: str = ""  # the file it was read from ("" if built in memory): the native head loads from it

    def trained_drafter(self) -> str:
        """The built-in drafter whose candidates the predictors learned from ("head+lookup" or
        "head" with a head, else "ngram"; a draft model's candidates need that model)."""
        if self.head is not None:
            return self.drafter if self.drafter in HEAD_DRAFTERS else "head"
        return "ngram"

    def check_model(self, weights, predictor_path: str, model_path: str) -> None:
        """Raise ModelFileError naming both models unless this file was made for `weights`."""
        ours = (self.model_arch, self.model_n_layer, self.model_n_embd, self.model_n_vocab)
        theirs = (weights.arch, weights.n_layer, weights.n_embd, weights.n_vocab)
        name = self.model_name or "another model"
        if ours != theirs:
            fmt = "{} with {} layers, n_embd {}, vocab {}".format
            made_for = f"{self.model_name}, a {fmt(*ours)}" if self.model_name else f"a {fmt(*ours)}"
            raise ModelFileError(f"{predictor_path}: predictors made for {made_for}, "
                                 f"but {model_path} is a {fmt(*theirs)}")
        if self.model_fingerprint and self.model_fingerprint != model_fingerprint(weights):
            raise ModelFileError(f"{predictor_path}: predictors made for {name} "
                                 f"(fingerprint {self.model_fingerprint}), "
                                 f"but {model_path} has another tokenizer or LM head "
                                 f"({model_fingerprint(weights)})")
        if self.features != FEATURES:
            raise ModelFileError(f"{predictor_path}: feature layout {self.features!r}; "
                                 f"this version computes {FEATURES!r}")


def constant_predictors(weights, layers, score_logit: float, k: int = 4, hidden: int = 8,
                        threshold: float = 0.5) -> PredictorFile:
    """Predictors scoring sigmoid(score_logit) whatever the features: they exercise and time the
    exit mechanics (candidates, verification, cut, repair) without trained weights."""
    def flat():
        return LayerPredictor(np.zeros((hidden, 3 * k), np.float32), np.zeros(hidden, np.float32),
                              np.zeros(hidden, np.float32), float(score_logit))

    return PredictorFile(weights.arch, weights.n_layer, weights.n_embd, weights.n_vocab, k, threshold,
                         list(layers), layers={il: flat() for il in layers})


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
        writer.add_string("specee.model.name", predictors.model_name)
        writer.add_string("specee.model.fingerprint", predictors.model_fingerprint)
        writer.add_string("specee.drafter", predictors.drafter)
        writer.add_string("specee.features", predictors.features)
        writer.add_uint32("specee.k", predictors.k)
        writer.add_float32("specee.threshold", predictors.threshold)
        writer.add_array("specee.offline_layers", [int(x) for x in predictors.offline_layers])
        writer.add_array("specee.online_offsets", [int(x) for x in predictors.online_offsets])
        if predictors.head is not None:
            add_head(writer, predictors.head)
        for il, p in sorted(predictors.layers.items()):
            writer.add_tensor(f"blk.{il}.fc1.weight", np.ascontiguousarray(p.fc1_weight, dtype=np.float32))
            writer.add_tensor(f"blk.{il}.fc1.bias", np.ascontiguousarray(p.fc1_bias, dtype=np.float32))
            writer.add_tensor(f"blk.{il}.fc2.weight", np.ascontiguousarray(p.fc2_weight, dtype=np.float32))
            writer.add_tensor(f"blk.{il}.fc2.bias", np.array([p.fc2_bias], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_head(writer, head: HeadWeights) -> None:
    import gguf

    if head.tensor_type not in HEAD_TYPES:
        raise ValueError(f"draft head tensor type must be one of {HEAD_TYPES}, not {head.tensor_type!r}")
    for key in ("n_head", "n_head_kv", "head_dim", "n_ff"):
        writer.add_uint32(f"specee.head.{key}", int(getattr(head, key)))
    writer.add_float32("specee.head.rope_freq_base", float(head.rope_freq_base))
    writer.add_float32("specee.head.norm_eps", float(head.norm_eps))
    writer.add_float32("specee.head.top_k_hit_rate", float(head.top_k_hit_rate))
    if head.acceptance is not None:
        writer.add_array("specee.head.chain_acceptance", [float(x) for x in head.acceptance])
        writer.add_array("specee.head.bucket_acceptance", [float(x) for x in np.ravel(head.bucket_acceptance)])
        writer.add_array("specee.head.bucket_share", [float(x) for x in np.ravel(head.bucket_share)])
    writer.add_tensor("head.vocab", np.ascontiguousarray(head.vocab, dtype=np.int32))
    qtype = gguf.GGMLQuantizationType[head.tensor_type.upper()]
    for name in HEAD_MATRICES:
        data = np.ascontiguousarray(head.tensors[name], dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(f"head.{name}", data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(f"head.{name}", data.astype(np.float16))
        else:
            writer.add_tensor(f"head.{name}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name in HEAD_VECTORS:
        writer.add_tensor(f"head.{name}", np.ascontiguousarray(head.tensors[name], dtype=np.float32))


def read_head(reader, value) -> Optional[HeadWeights]:
    """The draft head of a GGUFReader's file (None without one); value(key) reads metadata."""
    import gguf

    if "specee.head.n_head" not in reader.fields:
        return None
    tensors = {t.name: t for t in reader.tensors if t.name.startswith("head.")}
    weights = {}
    for name in HEAD_MATRICES + HEAD_VECTORS:
        t = tensors[f"head.{name}"]
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else np.asarray(t.data)
        weights[name] = np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
    matrix_type = tensors["head.fc.weight"].tensor_type.name.lower()
    head = HeadWeights(int(value("specee.head.n_head")), int(value("specee.head.n_head_kv")),
                       int(value("specee.head.head_dim")), int(value("specee.head.n_ff")),
                       float(value("specee.head.rope_freq_base")), float(value("specee.head.norm_eps")),
                       np.asarray(tensors["head.vocab"].data, dtype=np.int32).copy(), weights, matrix_type,
                       float(value("specee.head.top_k_hit_rate")))
    if "specee.head.chain_acceptance" in reader.fields:
        head.acceptance = np.asarray(value("specee.head.chain_acceptance"), np.float32)
        table = (len(head.acceptance), -1)
        head.bucket_acceptance = np.asarray(value("specee.head.bucket_acceptance"), np.float32).reshape(table)
        head.bucket_share = np.asarray(value("specee.head.bucket_share"), np.float32).reshape(table)
    return head


def read_predictor_file(path: str) -> PredictorFile:
    import gguf

    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such predictor file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct.error, ...
        raise ModelFileError(f"{path}: not a readable GGUF predictor file ({e})") from None

    def value(key: str, default=None):
        if key not in reader.fields:
            if default is not None:
                return default
            raise ModelFileError(f"{path}: not a specee predictor file (no {key})")
        return reader.fields[key].contents()

    if value("general.architecture") != ARCH:
        raise ModelFileError(f"{path}: not a specee predictor file (architecture {value('general.architecture')!r})")
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors if t.name.startswith("blk.")}
    layers = {}
    for name in tensors:
        if name.endswith(".fc1.weight"):
            il = int(name.split(".")[1])
            prefix = f"blk.{il}."
            fc1 = tensors[prefix + "fc1.weight"]
            layers[il] = LayerPredictor(fc1.reshape(-1, 3 * value("specee.k")), tensors[prefix + "fc1.bias"],
                                        tensors[prefix + "fc2.weight"].reshape(-1),
                                        float(tensors[prefix + "fc2.bias"][0]))
    try:
        head = read_head(reader, value)
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: broken draft head ({e})") from None
    return PredictorFile(
        model_arch=value("specee.model.arch"), model_n_layer=int(value("specee.model.n_layer")),
        model_n_embd=int(value("specee.model.n_embd")), model_n_vocab=int(value("specee.model.n_vocab")),
        k=int(value("specee.k")), threshold=float(value("specee.threshold")),
        offline_layers=[int(x) for x in value("specee.offline_layers", [])],  # a head alone: none written
        online_offsets=[int(x) for x in value("specee.online_offsets")], layers=layers,
        model_name=value("specee.model.name", ""), model_fingerprint=value("specee.model.fingerprint", ""),
        drafter=value("specee.drafter", "ngram"), features=value("specee.features", FEATURES),
        head=head, path=path)

