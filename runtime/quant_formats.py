"""The block quantization formats a bundle stores, declared once: the exporter writes them, the
manifest check, the native engine and the NPU host read them (export/quant_formats.py holds the
numpy math; native/edgellm.h mirrors the layout in C).

Every quantized matrix is [rows, cols] with blocks of `block` consecutive values along cols, in
ONNX Runtime's MatMulNBits layout:
  qweight  uint8 [rows, n_blocks, block*bits/8]; 4-bit: byte k = code[2k] | code[2k+1] << 4
  scales   float16 [rows, n_blocks]
  mins     float16 [rows, n_blocks] (formats without an implied zero point only)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    zero_point: int | None  # implied zero point of the codes; None: each block stores a minimum
    native_id: int  # enum el_format in native/edgellm.h

    @property
    def has_mins(self) -> bool:
        return self.zero_point is None

    def qweight_shape(self, rows: int, cols: int, block: int) -> list[int]:
        return [rows, n_blocks(cols, block), block * self.bits // 8]


QUANT_FORMATS = {f.name: f for f in (
    QuantFormat("int4_asym", 4, None, 0),  # w = code * scale + min (GGUF Q4_1)
    QuantFormat("int4_sym", 4, 8, 1),  # w = (code - 8) * scale (GGUF Q4_0)
    QuantFormat("int8_sym", 8, 128, 2),  # w = (code - 128) * scale (GGUF Q8_0)
)}
BLOCK_SIZES = (16, 32, 64, 128)  # what the exporter writes; the native kernels take 32, 64 and 128


def n_blocks(cols: int, block: int) -> int:
    return -(-cols // block)
