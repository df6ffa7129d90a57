"""edgellm: run small open language models on edge devices.

This package is the board runtime. It must import without onnx, gguf, safetensors, torch or
transformers (those belong to the `export` and `dev` extras); tests/test_lean_import.py proves it.
"""

from .errors import BundleError, ContextOverflowError, EdgeLLMError, InvalidSettingError, MemoryBudgetError

__version__ = "0.1.0"

__all__ = ["BundleError", "ContextOverflowError", "EdgeLLMError", "InvalidSettingError", "MemoryBudgetError", "__version__"]
