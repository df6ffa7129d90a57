"""The exception types users see: each carries what went wrong and what to do about it."""


class EdgeLLMError(Exception):
    """A user-facing failure: bad input file, bad option, missing dependency.

    The CLI prints ``str(error)`` on one line and exits non-zero, never a traceback.
    `hint` says what the user can do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class BundleError(EdgeLLMError):
    """A bundle folder is missing files, damaged, tampered with, or of a newer format."""


class InvalidSettingError(EdgeLLMError, ValueError):
    """A setting (sampling, threads, context length, ...) has a value outside its range."""


class ContextOverflowError(EdgeLLMError):
    """The prompt (or conversation) does not fit in the context window."""


class MemoryBudgetError(EdgeLLMError):
    """The model with the requested context does not fit in the memory available."""


class NpuError(EdgeLLMError):
    """The NPU backend cannot run: QNN is not installed, the bundle has no NPU graphs, or the NPU
    refused a graph. Never answered by running on the CPU instead."""
