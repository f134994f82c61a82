"""SpecEE's reversed offload: the *first* layers (and the LM head) on the GPU, the deep ones on
the CPU, so that an early exit skips the slow CPU layers. llama.cpp's n_gpu_layers offloads
the last layers instead; tensor buffer-type overrides (llama-cli's -ot) turn it around.
"""
import ctypes

import llama_cpp

from . import _native


class TensorBuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h); llama-cpp-python leaves it unbound."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def deep_layers_pattern(n_layer: int, n_gpu_layers: int) -> str:
    """Regex over tensor names for the blocks that stay on the CPU: n_gpu_layers .. n_layer-1."""
    return r"^blk\.(" + "|".join(str(il) for il in range(n_gpu_layers, n_layer)) + r")\."


def offload_first_layers(params: llama_cpp.llama_model_params, n_layer: int, n_gpu_layers: int):
    """Set params so that layers 0..n_gpu_layers-1 and the output go to the GPU, the rest to the
    CPU. Returns the override array, which must stay alive while the model loads."""
    overrides = (TensorBuftOverride * 2)()
    overrides[0].pattern = deep_layers_pattern(n_layer, n_gpu_layers).encode()
    overrides[0].buft = _native.cpu_buffer_type_address()
    params.n_gpu_layers = 0x7FFFFFFF  # every layer and the output to the GPU, less the overrides
    params.tensor_buft_overrides = ctypes.addressof(overrides)
    return overrides
