"""specee-pc: speculative early exiting (SpecEE) for GGUF models on llama.cpp."""
from .default_model import default_model_path
from .errors import DefaultModelMissing, ModelFileError, SpeceeError
from .llama import Llama
from .stats import GenerationStats

__version__ = "0.1.0"

__all__ = ["Llama", "GenerationStats", "SpeceeError", "ModelFileError", "DefaultModelMissing",
           "default_model_path", "__version__"]
