"""The canonical model every source lowers to and every exporter stage reads.

Tensor names are Hugging Face module paths (`model.layers.3.self_attn.q_proj.weight`), so that
ONNX initializers, manifest entries and parity-test traces lead back to the checkpoint.
Linear weights are [out_features, in_features] as in PyTorch; Q/K rows use Hugging Face's
rotate-half RoPE order (GGUF files are un-permuted on read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.model_config import ModelConfig, decoder_matrices, decoder_vectors
from edgellm.export.quant.formats import BlockQuantTensor

Tensor = np.ndarray | BlockQuantTensor  # float32 array, or quantized blocks


@dataclass
class TokenizerSpec:
    """Everything the runtime needs to turn text into ids and back."""

    tokenizer_json: str  # a Hugging Face `tokenizers` JSON document
    bos_token_id: int | None
    eos_token_ids: list[int]  # generation stops at any of these
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    add_bos_token: bool = False  # prepend BOS when encoding a raw prompt
    chat_template: str | None = None  # jinja2, Hugging Face semantics
    special_tokens: dict[str, str] = field(default_factory=dict)  # "bos_token" -> "<s>", ...


@dataclass
class CanonicalModel:
    config: ModelConfig
    tensors: dict[str, Tensor]
    tokenizer: TokenizerSpec
    source: dict[str, Any]  # {"format": "gguf"|"hf", "path": ..., "sha256": ..., "name": ...}
    warnings: list[str] = field(default_factory=list)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a decoder of this config has, as a source holds it (the contract
    with sources; RoPE's table is the exporter's own)."""
    tensors = {**decoder_matrices(config), **decoder_vectors(config, INV_FREQ)}
    return {name: expected.shape for name, expected in tensors.items() if name != INV_FREQ}


def tensor_shape(tensor: Tensor) -> tuple[int, ...]:
    if isinstance(tensor, BlockQuantTensor):
        return (tensor.rows, tensor.cols)
    return tuple(tensor.shape)


def as_float(tensor: Tensor) -> np.ndarray:
    """float32 values of a tensor (dequantized if it is quantized)."""
    if isinstance(tensor, BlockQuantTensor):
        return tensor.dequantize()
    return np.asarray(tensor, np.float32)
