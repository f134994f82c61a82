"""specee-pc: speculative early exiting (SpecEE) for GGUF models on llama.cpp."""
import llama_cpp as _llama_cpp

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
if _llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
    # the native module is linked against that release's llama.cpp; another one breaks silently
    raise ImportError(f"specee-pc needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, found {_llama_cpp.__version__}; "
                      f"reinstall it: pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, "
                      "then reinstall specee-pc")

try:
    from . import _native  # noqa: F401
except ImportError as e:  # e.g. imported from a source checkout that was never built
    raise ImportError(f"specee_pc's native module cannot be loaded ({e}); install the package with "
                      "'pip install .' and import it from outside the source directory") from None

from .default_model import default_model_path  # noqa: E402
from .errors import DefaultModelMissing, ModelFileError, SpeceeError  # noqa: E402
from .llama import Llama  # noqa: E402
from .stats import GenerationStats  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Llama", "GenerationStats", "SpeceeError", "ModelFileError", "DefaultModelMissing",
           "default_model_path", "__version__"]
