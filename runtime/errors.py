"""The one exception type users see: it carries what went wrong and what to do about it."""


class EdgeLLMError(Exception):
    """A user-facing failure: bad input file, bad option, missing dependency.

    The CLI prints ``str(error)`` on one line and exits non-zero, never a traceback.
    `hint` says what the user can do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")
