"""Opening a GGUF model file with checks that turn bad input into one-line errors."""
import os

from . import _native
from .errors import ModelFileError


def open_weights(path) -> "_native.Weights":
    """Validate a GGUF file and return the native reader of its final norm and LM head.

    Raises ModelFileError for a missing file, a file that is not GGUF, or a truncated or
    corrupt one, before llama.cpp ever sees it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a directory, not a GGUF file")
    try:
        return _native.Weights(path)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
