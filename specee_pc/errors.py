"""Exceptions that carry a one-line message meant for the user."""


class SpeceeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ModelFileError(SpeceeError, ValueError):
    """A model file is missing, is not GGUF, is truncated or cannot be loaded."""


class DefaultModelMissing(SpeceeError):
    """No model was given and the package that embeds the default model is not installed."""


class LlamaCppBuildError(SpeceeError):
    """llama-cpp-python was built in a way that crashes (llama.cpp's AMX kernels)."""
