"""ModelConfig: the hyper-parameters of a decoder, the same whatever file they came from.

Names follow Hugging Face's `config.json` so that a config read from a GGUF file, a HF folder
or a bundle manifest can be compared field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import EdgeLLMError

# Families whose decoder is the llama block, with the deltas each one brings.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "mistral"
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
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise EdgeLLMError(
                f"unsupported architecture {self.architecture!r}",
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise EdgeLLMError(f"model config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgeLLMError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise EdgeLLMError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("llama3", "default"):
            raise EdgeLLMError(
                f"unsupported rope_scaling type {self.rope_scaling.get('rope_type')!r}",
                "supported: llama3 (or none)",
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
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise EdgeLLMError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise EdgeLLMError(f"incomplete model config: {exc}") from None
