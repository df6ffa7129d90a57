"""edgellm: run small open language models on edge devices.

This package is the board runtime. It must import without onnx, gguf, safetensors, torch or
transformers (those belong to the `export` and `dev` extras); tests/test_lean_import.py proves it.
"""

from edgellm.errors import BundleError, ContextOverflowError, EdgeLLMError, InvalidSettingError, MemoryBudgetError

__version__ = "0.1.0"


def load(bundle, settings=None, **overrides):
    """Open a bundle folder and load it on a backend (see edgellm.model.Model)."""
    # lazy: this __init__ runs before any module of the package; importing the model here would make
    # every import of edgellm (the chat template's child process's too) load the whole runtime
    from edgellm.model import Model

    return Model.load(bundle, settings, **overrides)


__all__ = [
    "load",
    "BundleError",
    "ContextOverflowError",
    "EdgeLLMError",
    "InvalidSettingError",
    "MemoryBudgetError",
    "__version__",
]
