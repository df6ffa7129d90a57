"""Facts about the bundle format shared by the exporter (writes) and the runtime (reads)."""

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

FORMAT_NAME = "edgellm-bundle"
FORMAT_VERSION = 2
ALIGN = 64  # bytes: every tensor in weights.bin starts at a multiple of this

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"
ONNX_CPU_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INV_FREQ = "model.rotary_emb.inv_freq"  # RoPE's table: in weights.bin, however small, for every backend


def cache_root() -> Path:
    """edgellm's folder in the user's cache: $XDG_CACHE_HOME/edgellm when that is an absolute path,
    else ~/.cache/edgellm (the XDG spec: an empty or relative value is ignored; a relative one would
    put bundles wherever the process happens to run)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "edgellm"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return stream_sha256(handle)


def stream_sha256(handle: BinaryIO, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()
