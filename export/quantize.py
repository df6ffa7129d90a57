"""Quantization policy: which tensor gets which block format, and the error that causes.

Blocks that arrive quantized from a GGUF file (Q4_0, Q4_1, Q8_0) are kept as they are: never
re-quantize weights that are already 4- or 8-bit. Float matrices become int4 (block 32,
asymmetric by default); the embedding table and the output head become int8, since they feed
and read out every token and int4 there costs the most quality per byte saved.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from edgellm.errors import EdgeLLMError

from .canonical import Tensor
from .quant_formats import BlockQuantTensor, quantization_error, quantize

HIGH_PRECISION_DEFAULT = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4  # 4 or 8, for float matrices
    block: int = 32  # 32, 64 or 128 values per block
    symmetric: bool = False  # int4: symmetric (zero point 8) instead of scale + minimum
    keep_8bit: tuple[str, ...] = field(default=HIGH_PRECISION_DEFAULT)  # names or fnmatch patterns

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise EdgeLLMError(f"--bits must be 4 or 8, got {self.bits}")
        if self.block not in (16, 32, 64, 128):
            raise EdgeLLMError(f"--block must be 16, 32, 64 or 128, got {self.block}")

    def format_for(self, name: str) -> str:
        if self.bits == 8 or any(fnmatch.fnmatchcase(name, p) for p in self.keep_8bit):
            return "int8_sym"
        return "int4_sym" if self.symmetric else "int4_asym"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block": self.block, "symmetric": self.symmetric,
                "keep_8bit": list(self.keep_8bit)}


@dataclass
class QuantReport:
    rows: list[dict] = field(default_factory=list)  # per quantized tensor
    carried: list[str] = field(default_factory=list)  # kept bit-exactly from the source

    def overall_nmse(self) -> float:
        weights = np.array([r["elements"] for r in self.rows], np.float64)
        values = np.array([r["nmse"] for r in self.rows], np.float64)
        return float((weights * values).sum() / weights.sum()) if self.rows else 0.0

    def to_dict(self) -> dict:
        return {"quantized": self.rows, "carried_over": self.carried, "overall_nmse": self.overall_nmse()}


def quantize_tensors(tensors: dict[str, Tensor], options: QuantOptions,
                     progress=None) -> tuple[dict[str, Tensor], QuantReport]:
    """Matrices -> BlockQuantTensor (carried or quantized); vectors stay float32."""
    out: dict[str, Tensor] = {}
    report = QuantReport()
    for name, tensor in tensors.items():
        if isinstance(tensor, BlockQuantTensor):
            out[name] = tensor
            report.carried.append(name)
        elif tensor.ndim == 2 and not name.endswith(".bias"):
            fmt = options.format_for(name)
            quantized = quantize(tensor, fmt, options.block)
            error = quantization_error(tensor, quantized)
            report.rows.append({"name": name, "format": fmt, "block": options.block,
                                "elements": int(tensor.size), **error})
            out[name] = quantized
        else:
            out[name] = np.asarray(tensor, np.float32)
        if progress:
            progress(name)
    return out, report
