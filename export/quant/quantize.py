"""Quantization policy: which tensor gets which block format, and the error that causes.

Blocks that arrive quantized from a GGUF file (Q4_0, Q4_1, Q8_0) are kept as they are: never
re-quantize weights that are already 4- or 8-bit. Float matrices become int4 (block 32,
asymmetric by default); the embedding table and the output head become int8, since they feed
and read out every token and int4 there costs the most quality per byte saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgellm.export.canonical import Tensor
from edgellm.export.options import QuantOptions
from edgellm.export.quant.formats import BlockQuantTensor, quantization_error, quantize


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


def quantize_tensors(
    tensors: dict[str, Tensor], options: QuantOptions, progress=None
) -> tuple[dict[str, Tensor], QuantReport]:
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
            report.rows.append(
                {"name": name, "format": fmt, "block": options.block, "elements": int(tensor.size), **error}
            )
            out[name] = quantized
        else:
            out[name] = np.asarray(tensor, np.float32)
        if progress:
            progress(name)
    return out, report
