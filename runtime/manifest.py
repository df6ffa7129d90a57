"""Read and check a bundle's manifest.json: the model's own description of itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bundle_format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, file_sha256
from .errors import BundleError as EdgeLLMError  # every manifest failure is a bundle problem
from .model_config import ModelConfig

REQUIRED_KEYS = ("format", "format_version", "model", "files", "graphs", "tensors", "tokenizer", "provenance")


def read_manifest(bundle: Path) -> dict[str, Any]:
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        raise EdgeLLMError(f"{bundle}: not a bundle folder", "export one with: edgellm export SRC -o BUNDLE")
    if not path.is_file():
        raise EdgeLLMError(f"{path}: missing", "the bundle is incomplete; export it again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeLLMError(f"{path}: not valid JSON ({exc})", "the bundle is damaged; export it again") from None
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise EdgeLLMError(f"{path}: missing fields {', '.join(missing)}", "the bundle is damaged; export it again")
    if manifest["format"] != FORMAT_NAME:
        raise EdgeLLMError(f"{path}: format is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeLLMError(f"{path}: format version {version!r} is newer than this edgellm "
                           f"understands ({FORMAT_VERSION})", "upgrade edgellm")
    if version < FORMAT_VERSION:  # 1 stored float32 block scales; 2 stores float16, as GGUF
        raise EdgeLLMError(f"{path}: format version {version} is older than this edgellm reads ({FORMAT_VERSION}: "
                           f"float16 block scales)", f"export it again: edgellm export SRC -o {bundle} --force")
    check_files(bundle, manifest)
    return manifest


HASH_AT_LOAD_LIMIT = 16 * 2**20  # smaller files are hashed at every load; weights.bin on request


def check_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size; small ones also match their sha256."""
    for name, entry in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise EdgeLLMError(f"{path}: missing", "the bundle is incomplete; export it again")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise EdgeLLMError(f"{path}: {size} bytes, the manifest says {entry['bytes']}",
                               "the file is truncated or was replaced; export the bundle again")
        if size <= HASH_AT_LOAD_LIMIT and file_sha256(path) != entry["sha256"]:
            raise EdgeLLMError(f"{path}: sha256 differs from the manifest",
                               "the file was modified or damaged; export the bundle again")


def model_config(manifest: dict[str, Any]) -> ModelConfig:
    raw = {k: v for k, v in manifest["model"].items() if k != "name"}
    return ModelConfig.from_dict(raw)
