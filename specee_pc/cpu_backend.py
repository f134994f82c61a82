"""What llama.cpp's CPU backend was built with, where specee-pc must work around it."""
from . import _native
from .errors import LlamaCppBuildError

AMX_FIX = ('pip cache remove llama_cpp_python && CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" '
           'pip install --force-reinstall --no-deps llama-cpp-python==0.3.36')


def has_amx_store() -> bool:
    """Whether llama.cpp was built with its AMX kernels (-march=native on a Xeon with AMX). In
    llama-cpp-python 0.3.36 they crash on the first decode (llama.cpp issue 20824) when weights
    are stored for them, which llama.cpp does by default."""
    return "AMX" in _native.cpu_extra_buffer_types()


def check_plain_llama_cpp(what: str) -> None:
    """Before loading a llama_cpp.Llama, which has no way to keep weights out of the AMX store:
    a one-line error instead of its crash."""
    if has_amx_store():
        raise LlamaCppBuildError(f"{what} runs llama-cpp-python's own Llama, which crashes in llama.cpp's AMX "
                                 f"kernels in this build; rebuild it: {AMX_FIX}")
