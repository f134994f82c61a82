"""`specee-pc convert`: predictor weights from PyTorch files to a predictor GGUF, or --inspect one.

Inputs, each an MLP Linear(3k, H) -> ReLU -> Linear(H, 1) per layer:
  per-layer files  model<i>.pth / .pt / .safetensors (the SpecEE authors' layout: a pickled
                   module or a state_dict with fc1.* and fc2.*); the layer is the number in the
                   file name
  one file         keys <prefix>.<i>.{fc1,fc2}.{weight,bias}, or the authors' mixed
                   safetensors: model.layers.<i>.pred.{up,down}.{weight,bias}
"""
import argparse
import json
import os
import pickle
import re
import struct
import sys
from typing import Dict, List, Optional

import numpy as np

from .parser import ArgumentParser
from ..errors import SpeceeError
from ..model_file import open_weights
from ..options import DecodeOptions, add_arguments, from_args
from ..predictor_file import (LayerPredictor, PredictorFile, model_fingerprint, read_predictor_file,
                              write_predictor_file)

# SpecEE's offline layers for Llama-2-7B (32 layers), the only set the authors published
SPECEE_LLAMA2_7B_OFFLINE = [15, 16, 17, 19, 21, 24, 26, 28]
KEY = re.compile(r"(?:^|\.)(\d+)\.(?:pred\.)?(fc1|fc2|up|down)\.(weight|bias)$")
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """The safetensors format is a JSON header and raw little-endian arrays: no package needed."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            raw = np.frombuffer(data[begin:end], np.uint16).astype(np.uint32) << 16
            array = raw.view(np.float32)
        elif info["dtype"] in SAFETENSORS_DTYPES:
            array = np.frombuffer(data[begin:end], SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise SpeceeError(f"{path}: tensor {name} has dtype {info['dtype']}, not a float type")
        tensors[name] = array.reshape(info["shape"]).astype(np.float32)
    return tensors


class _ModuleUnpickler(pickle.Unpickler):
    """Loads a pickled MLP module without the class that pickled it (the authors' script's MLP):
    a class that cannot be imported here becomes a bare nn.Module, which keeps its parameters."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            import torch

            return type(name, (torch.nn.Module,), {})


class _ModulePickle:
    Unpickler = _ModuleUnpickler
    load = pickle.load


def read_torch(path: str) -> Dict[str, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a whole pickled module, as the SpecEE authors saved theirs
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ModulePickle)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise SpeceeError(f"{path}: holds a {type(obj).__name__}, not a state_dict or module")
    return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def read_tensors(path: str) -> Dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise SpeceeError(f"{path}: no such file")
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch(path)


def layer_predictor(parts: Dict[str, np.ndarray], where: str) -> LayerPredictor:
    names = {"up": "fc1", "down": "fc2"}
    p = {f"{names.get(a, a)}.{b}": v for (a, b), v in parts.items()}
    missing = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} - set(p)
    if missing:
        raise SpeceeError(f"{where}: missing {sorted(missing)}")
    return LayerPredictor(p["fc1.weight"], p["fc1.bias"].reshape(-1), p["fc2.weight"].reshape(-1),
                          float(p["fc2.bias"].reshape(-1)[0]))


def collect_layers(paths: List[str]) -> Dict[int, LayerPredictor]:
    layers: Dict[int, LayerPredictor] = {}
    for path in paths:
        tensors = read_tensors(path)
        grouped: Dict[int, dict] = {}
        for key, value in tensors.items():
            m = KEY.search(key)
            if m:
                grouped.setdefault(int(m.group(1)), {})[(m.group(2), m.group(3))] = value
        if not grouped:  # one layer per file: fc1.weight ..., the layer is in the file name
            number = re.findall(r"\d+", os.path.basename(path))
            if not number:
                raise SpeceeError(f"{path}: no layer number in its keys or its file name")
            grouped = {int(number[-1]): {tuple(k.rsplit(".", 1)): v for k, v in tensors.items()}}
        for il, parts in grouped.items():
            if il in layers:
                raise SpeceeError(f"{path}: layer {il} given twice")
            layers[il] = layer_predictor(parts, f"{path} layer {il}")
    return layers


def inspect(path: str) -> str:
    p = read_predictor_file(path)
    first = next(iter(p.layers.values()), None)
    lines = [f"{path}",
             f"  model         {p.model_name or '?'} ({p.model_arch}, {p.model_n_layer} layers, "
             f"n_embd {p.model_n_embd}, "
             f"vocab {p.model_n_vocab}, fingerprint {p.model_fingerprint or 'none'})",
             f"  drafter       {p.drafter}, k = {p.k}, features {p.features}",
             f"  threshold     {p.threshold}",
             f"  offline       {p.offline_layers}",
             f"  online        offsets {p.online_offsets} around the last 5 exit layers",
             f"  predictors    {len(p.layers)} layers {sorted(p.layers)}"
             + (f", MLP {first.fc1_weight.shape[1]} -> {first.fc1_weight.shape[0]} -> 1" if first else "")]
    h = p.head
    if h is not None:
        lines.append(f"  draft head    EAGLE-1, {h.n_head} heads ({h.n_head_kv} KV) x {h.head_dim}, ffn {h.n_ff}, "
                     f"{h.tensor_type}, draft vocabulary {len(h.vocab)} tokens, held-out top-{p.k} hit rate "
                     f"{h.top_k_hit_rate:.3f}")
        if h.acceptance is not None:
            lines.append("  chain         held-out acceptance by position "
                         + " ".join(f"{a:.3f}" for a in h.acceptance)
                         + "; by probability bucket (position 1) "
                         + " ".join(f"{a:.2f}" for a in h.bucket_acceptance[0]))
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="specee-pc convert", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE",
                   help="PyTorch/safetensors files, or with --inspect a predictor GGUF")
    p.add_argument("--inspect", action="store_true", help="print what a predictor GGUF holds")
    p.add_argument("--model", metavar="MODEL.gguf", help="the model the predictors belong to (required to convert)")
    p.add_argument("-o", "--output", help="predictor GGUF to write")
    add_arguments(p, DecodeOptions, ["offline_layers", "exit_threshold"],
                  defaults={"exit_threshold": 0.5},  # the file's: what decoding with it defaults to
                  default_texts={"offline_layers": "for 32-layer models, SpecEE's Llama-2-7B set"})
    p.add_argument("--trained-drafter", default="eagle", metavar="NAME",
                   help="the drafter whose candidates the predictors were trained on, stored in the file "
                        "(default: eagle)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.inspect:
            for path in args.inputs:
                print(inspect(path))
            return 0
        if not args.model or not args.output:
            raise SpeceeError("converting needs --model MODEL.gguf and -o OUTPUT.gguf")
        weights = open_weights(args.model)
        options = from_args(DecodeOptions, args)
        if args.offline_layers:
            offline = list(options.offline_layers)
        elif weights.n_layer == 32:
            offline = SPECEE_LLAMA2_7B_OFFLINE
        else:
            raise SpeceeError(f"the model has {weights.n_layer} layers: give --offline-layers")
        layers = collect_layers(args.inputs)
        bad = [il for il in layers if not 0 <= il < weights.n_layer]
        if bad:
            raise SpeceeError(f"layers {bad} do not exist in a {weights.n_layer}-layer model")
        shapes = {p.fc1_weight.shape for p in layers.values()}
        if len(shapes) != 1 or next(iter(shapes))[1] % 3:
            raise SpeceeError(f"fc1 weights must share one shape [H, 3k]; found {sorted(shapes)}")
        k = next(iter(shapes))[1] // 3
        missing = [il for il in offline if il not in layers]
        if missing:
            raise SpeceeError(f"offline layers {missing} have no predictor in the inputs")
        write_predictor_file(args.output, PredictorFile(
            weights.arch, weights.n_layer, weights.n_embd, weights.n_vocab, k, options.exit_threshold, offline,
            [-2, 0, 2], layers, model_name=os.path.basename(args.model),
            model_fingerprint=model_fingerprint(weights), drafter=args.trained_drafter))
    except (SpeceeError, ValueError, OSError) as e:
        print(f"specee-pc: error: {e}", file=sys.stderr)
        return 1
    print(inspect(args.output))
    return 0
