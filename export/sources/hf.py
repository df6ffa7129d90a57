"""Read a Hugging Face model folder into a CanonicalModel.

A folder is `config.json` + `*.safetensors` (one file, or shards named by
`model.safetensors.index.json`) + `tokenizer.json`, with optional `tokenizer_config.json`,
`generation_config.json` and `chat_template.jinja`. Only numpy and the `safetensors` reader are
needed: bf16 has no numpy dtype, so its bits are widened to float32 by a shift, without torch.
Every tensor is checked against `expected_shapes(config)` before any weight is read, so a
config.json that disagrees with the weights fails fast, naming the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.bundle.architectures import ARCHITECTURES, EMBED, HF_CLASSES, LM_HEAD
from edgellm.bundle.model_config import ModelConfig
from edgellm.errors import EdgeLLMError
from edgellm.export.canonical import CanonicalModel, expected_shapes
from edgellm.export.sources.hf_tokenizer import read_hf_tokenizer, read_json

# config.json `architectures[0]` -> our family name. The decoder is the llama block in all three;

_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_FOLDER_HINT = "a Hugging Face model folder holds config.json, *.safetensors and tokenizer.json"


def load_hf_folder(folder: Path) -> CanonicalModel:
    """The model in a Hugging Face folder, every tensor float32 and keyed by its HF name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeLLMError(f"{folder}: no such folder", _FOLDER_HINT)
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = _FOLDER_HINT
        if any(folder.glob("*.gguf")):
            hint = "this folder holds a .gguf file: pass the .gguf file itself"
        raise EdgeLLMError(f"{folder}: no config.json", hint)
    raw_config = read_json(config_path)
    config, warnings = model_config_from_hf(raw_config, config_path)

    stored = list_safetensors(folder)
    config = _settle_tied_output(config, stored, warnings)
    check_tensor_shapes(stored, config, config_path)
    tensors = read_tensors(stored)
    _drop_duplicate_lm_head(config, tensors, warnings)

    tokenizer, tokenizer_warnings = read_hf_tokenizer(folder, raw_config, config.vocab_size)
    warnings.extend(tokenizer_warnings)
    files = sorted({t.file for t in stored.values()}, key=lambda p: p.name)
    source = {
        "format": "hf",
        "path": str(folder),
        "sha256": _sha256(files + [config_path]),
        "name": folder.resolve().name,
    }
    return CanonicalModel(config=config, tensors=tensors, tokenizer=tokenizer, source=source, warnings=warnings)


# ---------------------------------------------------------------------------------- config.json

_MISSING = object()


def _field(raw: dict[str, Any], name: str, path: Path, kind: type, default: Any = _MISSING) -> Any:
    """raw[name] checked to be `kind` (a null counts as absent, as transformers treats it)."""
    value = raw.get(name)
    if value is None:
        if default is _MISSING:
            raise EdgeLLMError(
                f"{path}: field {name!r} is missing",
                f"expected {'an integer' if kind is int else 'a ' + kind.__name__}",
            )
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise EdgeLLMError(f"{path}: field {name!r} is {value!r}, expected {kind.__name__}")
    if kind is int and value <= 0:  # every integer we read is a size or a count
        raise EdgeLLMError(f"{path}: field {name!r} is {value}, expected a positive integer")
    return value


def architecture_of(raw: dict[str, Any], path: Path) -> str:
    """Our family name for config.json's `architectures[0]` (or `model_type` if that is absent)."""
    names = raw.get("architectures")
    supported = ", ".join(HF_CLASSES)
    if isinstance(names, list) and names:
        if names[0] in HF_CLASSES:
            return HF_CLASSES[names[0]].name
        raise EdgeLLMError(f"{path}: architecture {names[0]!r} is not supported", f"supported: {supported}")
    # Some hand-written configs carry only model_type; it names the family just as well.
    model_type = raw.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    raise EdgeLLMError(
        f"{path}: no 'architectures' field and model_type {model_type!r} is not supported", f"supported: {supported}"
    )


def model_config_from_hf(raw: dict[str, Any], path: Path) -> tuple[ModelConfig, list[str]]:
    """A ModelConfig from a parsed config.json, and notes about features we read but do not apply."""
    arch = architecture_of(raw, path)
    if raw.get("quantization_config"):
        quant = raw["quantization_config"]
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise EdgeLLMError(
            f"{path}: the weights are pre-quantized ({method})", "export from the unquantized fp16/bf16/fp32 checkpoint"
        )
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise EdgeLLMError(f"{path}: hidden_act {hidden_act!r} is not supported", "expected 'silu'")
    if raw.get("mlp_bias"):
        raise EdgeLLMError(f"{path}: mlp_bias=true is not supported", "the MLP must be bias-free")

    hidden = _field(raw, "hidden_size", path, int)
    heads = _field(raw, "num_attention_heads", path, int)
    head_dim = _field(raw, "head_dim", path, int, default=None)
    if head_dim is None:
        if hidden % heads:
            raise EdgeLLMError(
                f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads "
                f"{heads} and there is no head_dim field",
                "add head_dim to config.json",
            )
        head_dim = hidden // heads
    family = ARCHITECTURES[arch]
    max_positions = _field(raw, "max_position_embeddings", path, int, default=family.default_max_positions)
    rope_theta, rope_scaling = _rope(raw, path)
    fields = dict(
        architecture=arch,
        vocab_size=_field(raw, "vocab_size", path, int),
        hidden_size=hidden,
        intermediate_size=_field(raw, "intermediate_size", path, int),
        num_hidden_layers=_field(raw, "num_hidden_layers", path, int),
        num_attention_heads=heads,
        num_key_value_heads=_field(raw, "num_key_value_heads", path, int, default=heads),
        head_dim=head_dim,
        rms_norm_eps=_field(raw, "rms_norm_eps", path, float, default=1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=max_positions,
        tie_word_embeddings=_field(raw, "tie_word_embeddings", path, bool, default=False),
        # Qwen2 always has q/k/v biases (its config has no flag); Llama may opt in; Mistral never.
        attention_bias=family.attention_bias
        if family.attention_bias is not None
        else _field(raw, "attention_bias", path, bool, default=False),
        rope_scaling=rope_scaling,
    )
    try:
        config = ModelConfig(**fields)
    except EdgeLLMError as exc:  # ModelConfig's own checks do not know which file they judge
        raise EdgeLLMError(f"{path}: {exc.message}", exc.hint) from None
    note = _sliding_window_note(raw, arch, max_positions)
    return config, [note] if note else []


def _rope(raw: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and a normalized rope_scaling (None or llama3).

    transformers < 5 writes `rope_theta` + `rope_scaling`; transformers 5 writes one
    `rope_parameters` dict holding both. Either spelling of the type key (`rope_type`, `type`) is
    accepted, as transformers does.
    """
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise EdgeLLMError(f"{path}: field 'rope_parameters' is {params!r}, expected an object")
    theta = _field(raw, "rope_theta", path, float, default=None)
    if theta is None:
        theta = _field(params, "rope_theta", path, float, default=10000.0)
    scaling = raw.get("rope_scaling")
    field_name = "rope_scaling"
    if scaling is None:
        scaling, field_name = params, "rope_parameters"
    if not isinstance(scaling, dict):
        raise EdgeLLMError(f"{path}: field 'rope_scaling' is {scaling!r}, expected an object or null")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise EdgeLLMError(
            f"{path}: {field_name} type {rope_type!r} is not supported", "supported: llama3, or no rope scaling"
        )
    missing = [key for key in _LLAMA3_ROPE_KEYS if not isinstance(scaling.get(key), (int, float))]
    if missing:
        raise EdgeLLMError(
            f"{path}: {field_name} of type llama3 lacks {', '.join(missing)}",
            f"llama3 rope scaling needs {', '.join(_LLAMA3_ROPE_KEYS)}",
        )
    normalized: dict[str, Any] = {"rope_type": "llama3"}
    for key in _LLAMA3_ROPE_KEYS:
        normalized[key] = float(scaling[key])
    normalized["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return theta, normalized


def _sliding_window_note(raw: dict[str, Any], arch: str, max_positions: int) -> str | None:
    # We attend over the whole context. That equals the model's own attention only while the
    # context is no longer than the window, so say so when the window can actually bite.
    window = raw.get("sliding_window")
    in_use = arch == "mistral" or (arch == "qwen2" and raw.get("use_sliding_window"))
    if in_use and isinstance(window, int) and window < max_positions:
        return (
            f"config.json sets sliding_window={window} but edgellm attends over the full "
            f"context: outputs differ from the reference beyond {window} tokens"
        )
    return None


# --------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in a safetensors file, read from the header only."""

    file: Path
    name: str
    dtype: str  # safetensors code: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first data byte


# safetensors codes we widen to float32, and their little-endian numpy dtypes (BF16 is special).
_FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards its index names, else every *.safetensors."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise EdgeLLMError(f"{index_path}: no 'weight_map' object", "the index may be truncated")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise EdgeLLMError(
                    f"{index_path}: shard {file.name} is missing from {folder}",
                    "the download is incomplete; fetch every shard the index lists",
                )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = _FOLDER_HINT
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            hint = "only pickled .bin/.pt weights found; save the model with safe_serialization=True"
        raise EdgeLLMError(f"{folder}: no *.safetensors weight files", hint)
    return files


def list_safetensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's weight files by name, without reading any data."""
    stored: dict[str, StoredTensor] = {}
    for file in safetensors_files(folder):
        for tensor in _list_file(file):
            if tensor.name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer old checkpoints saved; we recompute it from rope_theta
            if tensor.name in stored:
                raise EdgeLLMError(
                    f"tensor {tensor.name} is stored twice: in {stored[tensor.name].file.name} and in {file.name}",
                    "remove the stray .safetensors file",
                )
            stored[tensor.name] = tensor
    return stored


def _list_file(file: Path) -> list[StoredTensor]:
    from safetensors import SafetensorError, safe_open

    try:
        # The library checks the header and that the data covers the file exactly, which is
        # what catches a truncated download.
        with safe_open(str(file), framework="numpy") as reader:
            names = list(reader.keys())
    except (SafetensorError, OSError) as exc:
        raise EdgeLLMError(
            f"{file}: not a readable safetensors file ({exc})", "the file may be truncated; download or copy it again"
        ) from None
    # The library hides offsets, and bf16 needs them: read the JSON header ourselves.
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    data_start = 8 + header_len
    return [
        StoredTensor(
            file,
            name,
            header[name]["dtype"],
            tuple(header[name]["shape"]),
            data_start + header[name]["data_offsets"][0],
        )
        for name in names
    ]


def _settle_tied_output(config: ModelConfig, stored: dict[str, StoredTensor], warnings: list[str]) -> ModelConfig:
    # transformers drops lm_head.weight when saving a tied model; some configs still say untied.
    if not config.tie_word_embeddings and f"{LM_HEAD}.weight" not in stored:
        warnings.append(
            "config.json says tie_word_embeddings=false but there is no lm_head.weight: "
            "the output layer reuses model.embed_tokens.weight"
        )
        return dataclasses.replace(config, tie_word_embeddings=True)
    return config


def check_tensor_shapes(stored: dict[str, StoredTensor], config: ModelConfig, config_path: Path) -> None:
    """Each tensor `config` implies is present with its shape, and nothing else (tied lm_head aside)."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in stored:
            raise EdgeLLMError(
                f"tensor {name} (shape {shape} per {config_path.name}) is missing from the safetensors "
                f"files in {config_path.parent}",
                "the download may be incomplete, or config.json describes another model",
            )
        found = stored[name]
        if found.shape != shape:
            raise EdgeLLMError(
                f"{found.file}: tensor {name} has shape {found.shape}, but {config_path.name} implies {shape}",
                "config.json and the weights disagree; use the config.json that came with these weights",
            )
    for name, found in stored.items():
        if name not in expected and name != f"{LM_HEAD}.weight":
            raise EdgeLLMError(
                f"{found.file}: tensor {name} (shape {found.shape}) is not part of a "
                f"{config.architecture} decoder as {config_path.name} describes it",
                "merge adapters or extra heads into the base weights, or remove them",
            )


def read_tensors(stored: dict[str, StoredTensor]) -> dict[str, np.ndarray]:
    """float32 arrays of every stored tensor, widened exactly from F16/BF16."""
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in stored.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise EdgeLLMError(
                f"{tensor.file.name}: tensor {name} has dtype {tensor.dtype}",
                "only F32, F16 and BF16 weights are read; export from an unquantized checkpoint",
            )
        count = math.prod(tensor.shape)
        raw = np.fromfile(tensor.file, dtype=_FLOAT_DTYPES[tensor.dtype], count=count, offset=tensor.offset)
        if raw.size != count:  # the file changed since its header was checked
            raise EdgeLLMError(f"{tensor.file}: tensor {name} is truncated", "copy the file again")
        if tensor.dtype == "BF16":
            # bf16 is the top half of a float32: shift the 16 bits up and reinterpret.
            tensors[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(tensor.shape)
        else:
            tensors[name] = raw.astype(np.float32).reshape(tensor.shape)
    return tensors


def _drop_duplicate_lm_head(config: ModelConfig, tensors: dict[str, np.ndarray], warnings: list[str]) -> None:
    # A tied model that still stores lm_head.weight: transformers ties it to the embedding and
    # ignores the stored copy, so we do the same, and say so if the two actually differ.
    if config.tie_word_embeddings and f"{LM_HEAD}.weight" in tensors:
        lm_head = tensors.pop(f"{LM_HEAD}.weight")
        if not np.array_equal(lm_head, tensors[f"{EMBED}.weight"]):
            warnings.append(
                "config.json ties the output layer to model.embed_tokens.weight; the "
                "stored lm_head.weight differs and is ignored, as transformers does"
            )


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
