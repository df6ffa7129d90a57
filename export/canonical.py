"""The canonical model every source lowers to and every exporter stage reads.

Tensor names are Hugging Face module paths (`model.layers.3.self_attn.q_proj.weight`), so that
ONNX initializers, manifest entries and parity-test traces lead back to the checkpoint.
Linear weights are [out_features, in_features] as in PyTorch; Q/K rows use Hugging Face's
rotate-half RoPE order (GGUF files are un-permuted on read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from edgellm.model_config import ModelConfig

from .quant_formats import BlockQuantTensor

Tensor = Union[np.ndarray, BlockQuantTensor]  # float32 array, or quantized blocks


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


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a decoder of this config has (the contract with sources)."""
    h, ff = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (config.q_size, h),
            f"{p}.self_attn.k_proj.weight": (config.kv_size, h),
            f"{p}.self_attn.v_proj.weight": (config.kv_size, h),
            f"{p}.self_attn.o_proj.weight": (h, config.q_size),
            f"{p}.mlp.gate_proj.weight": (ff, h),
            f"{p}.mlp.up_proj.weight": (ff, h),
            f"{p}.mlp.down_proj.weight": (h, ff),
        })
        if config.attention_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (config.q_size,),
                           f"{p}.self_attn.k_proj.bias": (config.kv_size,),
                           f"{p}.self_attn.v_proj.bias": (config.kv_size,)})
    return shapes


def tensor_shape(tensor: Tensor) -> tuple[int, ...]:
    if isinstance(tensor, BlockQuantTensor):
        return (tensor.rows, tensor.cols)
    return tuple(tensor.shape)


def as_float(tensor: Tensor) -> np.ndarray:
    """float32 values of a tensor (dequantized if it is quantized)."""
    if isinstance(tensor, BlockQuantTensor):
        return tensor.dequantize()
    return np.asarray(tensor, np.float32)
