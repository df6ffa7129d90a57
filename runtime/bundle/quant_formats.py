"""The block quantization formats a bundle stores, declared once with their numpy dequantization:
the exporter writes them (export/quant/formats.py quantizes), the manifest check, the native engine
and the NPU host read them, native/edgellm.h mirrors them in C.

Every quantized matrix is [rows, cols] with blocks of `block` consecutive values along cols (the
input dimension); bits per weight with blocks of 32: codes + a float16 scale (+ a float16 minimum):

  int4_asym  w = code * scale + min,   codes 0..15   (5.0 bpw)
  int4_sym   w = (code - 8) * scale,   codes 0..15   (4.5 bpw)
  int8_sym   w = (code - 128) * scale, codes 0..255  (8.5 bpw)

Storage is ONNX Runtime's MatMulNBits layout, which the native engine maps too:
  qweight  uint8 [rows, n_blocks, block*bits/8]; 4-bit: byte k = code[2k] | code[2k+1] << 4
  scales   float16 [rows, n_blocks]
  mins     float16 [rows, n_blocks] (formats without an implied zero point only)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


QUANT_FORMATS = {
    f.name: f
    for f in (
        QuantFormat("int4_asym", 4, None, 0),  # w = code * scale + min (GGUF Q4_1)
        QuantFormat("int4_sym", 4, 8, 1),  # w = (code - 8) * scale (GGUF Q4_0)
        QuantFormat("int8_sym", 8, 128, 2),  # w = (code - 128) * scale (GGUF Q8_0)
    )
}
BLOCK_SIZES = (16, 32, 64, 128)  # what the exporter writes; the native kernels take 32, 64 and 128


def n_blocks(cols: int, block: int) -> int:
    return -(-cols // block)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., block*bits/8] as stored -> uint8 codes [..., block]."""
    if bits == 8:
        return packed
    low, high = packed & np.uint8(0x0F), packed >> np.uint8(4)
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(fmt: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, cols: int) -> np.ndarray:
    """float32 [rows, cols] of codes uint8 [rows, n_blocks, block] (unpacked), scales and mins float16
    [rows, n_blocks]: w = code * scale + min, or (code - zero point) * scale. Exact in float32."""
    values = codes.astype(np.float32)
    scale = np.asarray(scales, np.float32)[..., None]
    zero_point = QUANT_FORMATS[fmt].zero_point
    if zero_point is None:
        values = values * scale + np.asarray(mins, np.float32)[..., None]
    else:
        values = (values - np.float32(zero_point)) * scale
    return values.reshape(codes.shape[0], -1)[:, :cols]
