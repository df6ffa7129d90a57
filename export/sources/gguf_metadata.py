"""GGUF metadata as plain Python values, read with the `gguf` library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError


def open_gguf(path: Path):
    """A gguf.GGUFReader, or a clear error for a file that is not a whole GGUF file."""
    import gguf

    if not path.is_file():
        raise EdgeLLMError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the library raises ValueError/IndexError/struct.error on bad bytes
        raise EdgeLLMError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})",
            "the file may be truncated or not GGUF; download or copy it again",
        ) from None


def read_gguf_metadata(reader) -> dict[str, Any]:
    """Every key-value field of a GGUF file: str, int, float, bool, or a list of those."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise EdgeLLMError(
                f"GGUF metadata field {key!r} is unreadable ({exc})", "the file may be truncated or corrupt"
            ) from None
    return meta
