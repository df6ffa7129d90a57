"""ModelConfig: the hyper-parameters of a decoder, the same whatever file they came from.

Names follow Hugging Face's `config.json` so that a config read from a GGUF file, a HF folder
or a bundle manifest can be compared field by field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from edgellm.bundle.architectures import ARCHITECTURES, EMBED, FINAL_NORM, LM_HEAD, layer_bias, layer_weight
from edgellm.errors import EdgeLLMError

LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a name of architectures.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise EdgeLLMError(
                f"unsupported architecture {self.architecture!r}",
                f"supported: {', '.join(ARCHITECTURES)}",
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgeLLMError(f"model config field {name!r} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise EdgeLLMError(f"model config field {name!r} must be a positive finite number, got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeLLMError(f"model config field {name!r} must be true or false, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgeLLMError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise EdgeLLMError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in ("llama3", "default"):
            kind = scaling.get("rope_type") if isinstance(scaling, dict) else scaling
            raise EdgeLLMError(f"unsupported rope_scaling type {kind!r}", "supported: llama3 (or none)")
        if scaling["rope_type"] == "llama3":
            for name in LLAMA3_ROPE_FIELDS:
                value = scaling.get(name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                    raise EdgeLLMError(
                        f"model config field 'rope_scaling.{name}' must be a positive finite number, got {value!r}"
                    )

    @property
    def q_size(self) -> int:  # width of the query projection
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:  # width of each of the key and value projections
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise EdgeLLMError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise EdgeLLMError(f"incomplete model config: {exc}") from None


@dataclass(frozen=True)
class Expected:
    """A decoder tensor's shape, and the config fields it follows from (for the message when they disagree)."""

    shape: tuple[int, ...]
    fields: tuple[str, ...]


def decoder_matrices(config: ModelConfig) -> dict[str, Expected]:
    """Every block-quantized matrix of the decoder, by checkpoint name: shape (rows, cols) = (out, in)."""
    c = config
    hidden, q, kv, ffn = (
        "hidden_size",
        ("num_attention_heads", "head_dim"),
        ("num_key_value_heads", "head_dim"),
        "intermediate_size",
    )
    shapes = {f"{EMBED}.weight": Expected((c.vocab_size, c.hidden_size), ("vocab_size", hidden))}
    if not c.tie_word_embeddings:
        shapes[f"{LM_HEAD}.weight"] = Expected(
            (c.vocab_size, c.hidden_size), ("vocab_size", hidden, "tie_word_embeddings")
        )
    layer = ("num_hidden_layers",)
    roles = {
        "q_proj": ((c.q_size, c.hidden_size), (*q, hidden)),
        "k_proj": ((c.kv_size, c.hidden_size), (*kv, hidden)),
        "v_proj": ((c.kv_size, c.hidden_size), (*kv, hidden)),
        "o_proj": ((c.hidden_size, c.q_size), (hidden, *q)),
        "gate_proj": ((c.intermediate_size, c.hidden_size), (ffn, hidden)),
        "up_proj": ((c.intermediate_size, c.hidden_size), (ffn, hidden)),
        "down_proj": ((c.hidden_size, c.intermediate_size), (hidden, ffn)),
    }
    for i in range(c.num_hidden_layers):
        for role, (shape, fields) in roles.items():
            shapes[layer_weight(i, role)] = Expected(shape, (*fields, *layer))
    return shapes


def decoder_vectors(config: ModelConfig, rope_table: str) -> dict[str, Expected]:
    """Every float32 tensor of the decoder that is not a matrix (norms, biases, RoPE's table `rope_table`)."""
    c = config
    shapes = {
        f"{FINAL_NORM}.weight": Expected((c.hidden_size,), ("hidden_size",)),
        rope_table: Expected((c.head_dim // 2,), ("head_dim",)),
    }
    layer, bias = ("num_hidden_layers",), ("attention_bias", "num_hidden_layers")
    for i in range(c.num_hidden_layers):
        for role in ("attn_norm", "mlp_norm"):
            shapes[layer_weight(i, role)] = Expected((c.hidden_size,), ("hidden_size", *layer))
        if c.attention_bias:
            shapes[layer_bias(i, "q_proj")] = Expected((c.q_size,), ("num_attention_heads", "head_dim", *bias))
            for role in ("k_proj", "v_proj"):
                shapes[layer_bias(i, role)] = Expected((c.kv_size,), ("num_key_value_heads", "head_dim", *bias))
    return shapes
