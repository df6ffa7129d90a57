"""Quantization into the bundle's block formats (declared, with their dequantization, in
edgellm/bundle/quant_formats.py): float matrices quantized as ggml rounds, and GGUF blocks carried
over bit for bit.

  GGUF Q4_1 (w = d*q + m)    -> int4_asym: code = q, scale = d, min = m
  GGUF Q4_0 (w = d*(q - 8))  -> int4_sym:  code = q, scale = d
  GGUF Q8_0 (w = d*q, int8)  -> int8_sym:  code = q + 128, scale = d
Scales and mins are float16, as in GGUF: a GGUF's blocks are carried bit for bit, and a decode step,
which reads every weight once, reads 5 bits per weight instead of the 6 float32 scales cost. The
minimum is kept as its own term rather than folded into a float zero point (-m/d): that is exact,
and ONNX Runtime runs MatMulNBits with float zero points ~20x slower than with integer ones (the
graph computes x.w = MatMulNBits(x; codes, scale, zero point 0) + blocksum(x) . min). GGUF Q4_0/Q4_1
nibble order differs (low nibbles are values 0..15 of a block, high nibbles 16..31), so GGUF blocks
are re-ordered here at export time, never at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgellm.bundle.quant_formats import QUANT_FORMATS, dequantize
from edgellm.errors import EdgeLLMError


@dataclass
class BlockQuantTensor:
    """A [rows, cols] matrix quantized in blocks along cols (see the module docstring)."""

    format: str
    rows: int
    cols: int
    block: int
    codes: np.ndarray  # uint8 [rows, n_blocks, block], values 0 .. 2**bits - 1
    scales: np.ndarray  # float16 [rows, n_blocks]
    mins: np.ndarray | None  # float16 [rows, n_blocks] for int4_asym, else None
    source_format: str = ""  # provenance, e.g. "gguf:Q4_1" or "f32"

    @property
    def bits(self) -> int:
        return QUANT_FORMATS[self.format].bits

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> np.ndarray:  # float32 [rows, cols]
        return dequantize(self.format, self.codes, self.scales, self.mins, self.cols)

    def take_rows(self, index: np.ndarray) -> BlockQuantTensor:
        """The same tensor with its rows re-ordered (whole blocks move, values are unchanged)."""
        mins = None if self.mins is None else self.mins[index]
        return BlockQuantTensor(
            self.format,
            self.rows,
            self.cols,
            self.block,
            self.codes[index],
            self.scales[index],
            mins,
            self.source_format,
        )

    def packed_codes(self) -> np.ndarray:  # uint8 [rows, n_blocks, block*bits/8], MatMulNBits order
        if self.bits == 8:
            return np.ascontiguousarray(self.codes)
        return np.ascontiguousarray(self.codes[..., 0::2] | (self.codes[..., 1::2] << np.uint8(4)))


# ---------------------------------------------------------------------------------------------
# GGUF blocks -> our formats, losslessly. `raw` is the tensor's bytes as uint8 [rows, bytes_per_row].


def _gguf_blocks(raw: np.ndarray, rows: int, cols: int, block_bytes: int) -> np.ndarray:
    if cols % 32:
        raise EdgeLLMError(f"GGUF block tensor has {cols} columns, not a multiple of 32")
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, block_bytes)
    return blocks


def _gguf_half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block: float16 [rows, n_blocks], the bits as they are."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].copy()


def _gguf_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF's 16 bytes of a 4-bit block -> 32 codes (low nibbles first, then high nibbles)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def from_gguf_q4_1(raw: np.ndarray, rows: int, cols: int) -> BlockQuantTensor:
    blocks = _gguf_blocks(raw, rows, cols, 20)  # d f16, m f16, qs[16]
    d, m = _gguf_half(blocks, 0), _gguf_half(blocks, 2)
    return BlockQuantTensor("int4_asym", rows, cols, 32, _gguf_nibbles(blocks[..., 4:]), d, m, "gguf:Q4_1")


def from_gguf_q4_0(raw: np.ndarray, rows: int, cols: int) -> BlockQuantTensor:
    blocks = _gguf_blocks(raw, rows, cols, 18)  # d f16, qs[16]
    d = _gguf_half(blocks, 0)
    return BlockQuantTensor("int4_sym", rows, cols, 32, _gguf_nibbles(blocks[..., 2:]), d, None, "gguf:Q4_0")


def from_gguf_q8_0(raw: np.ndarray, rows: int, cols: int) -> BlockQuantTensor:
    blocks = _gguf_blocks(raw, rows, cols, 34)  # d f16, qs[32] int8
    d = _gguf_half(blocks, 0)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return BlockQuantTensor("int8_sym", rows, cols, 32, codes, d, None, "gguf:Q8_0")


# ---------------------------------------------------------------------------------------------
# Float -> our formats. Rounding is round-half-away-from-zero done as in ggml (trunc(x + 0.5) on
# non-negative values). The scale (and min) is rounded to float16 FIRST, away from the block's values
# (scales up in magnitude, mins down), and the codes are computed with the stored value: so every
# value stays within half a step of its code, as with float32 scales (ggml computes the codes with
# the unrounded scale and can land a value a rounding error past the last code).


def _half_outward(v: np.ndarray, up: bool) -> np.ndarray:
    """float32 -> the nearest float16 at or above v (up) or at or below it; an error if v is past float16."""
    h = v.astype(np.float16)
    short = h.astype(np.float32) < v if up else h.astype(np.float32) > v
    h = np.where(short, np.nextafter(h, np.float16(np.inf if up else -np.inf)), h)
    if not np.all(np.isfinite(h)):
        raise EdgeLLMError(
            f"a block's scale or minimum is beyond float16's range (|v| > 65504): "
            f"max |v| = {float(np.abs(v).max()):.6g}",
            "the weights are not a trained model's",
        )
    return h


def _half_magnitude_up(v: np.ndarray) -> np.ndarray:
    """float32 -> the nearest float16 of the same sign whose magnitude is at or above |v|."""
    return np.where(v < 0, np.float16(-1), np.float16(1)) * _half_outward(np.abs(v), up=True)


def _float_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    if weight.ndim != 2:
        raise EdgeLLMError(f"only matrices are block-quantized, got shape {weight.shape}")
    rows, cols = weight.shape
    n_blocks = -(-cols // block)
    padded = np.zeros((rows, n_blocks * block), np.float32)
    padded[:, :cols] = weight
    return padded.reshape(rows, n_blocks, block), cols


def quantize(weight: np.ndarray, fmt: str, block: int = 32, source_format: str = "f32") -> BlockQuantTensor:
    """Quantize a float32 [rows, cols] matrix. `block` must be a power of two >= 16 (MatMulNBits)."""
    if fmt not in QUANT_FORMATS:
        raise EdgeLLMError(f"unknown quantization format {fmt!r}", f"supported: {', '.join(QUANT_FORMATS)}")
    if block < 16 or block & (block - 1):
        raise EdgeLLMError(f"block size must be a power of two >= 16, got {block}")
    x, cols = _float_blocks(np.asarray(weight, np.float32), block)
    rows = x.shape[0]
    if fmt == "int4_asym":
        lo16 = _half_outward(x.min(axis=-1), up=False)
        lo = lo16.astype(np.float32)
        scale16 = _half_outward(((x.max(axis=-1) - lo) / np.float32(15)).astype(np.float32), up=True)
        scale = scale16.astype(np.float32)
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / np.where(scale == 0, 1, scale))
        codes = np.trunc((x - lo[..., None]) * inv[..., None] + np.float32(0.5)).clip(0, 15).astype(np.uint8)
        return BlockQuantTensor(fmt, rows, cols, block, codes, scale16, lo16, source_format)
    if fmt == "int4_sym":
        index = np.abs(x).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(x, index, axis=-1)[..., 0]
        scale16 = _half_magnitude_up((signed_max / np.float32(-8)).astype(np.float32))
        scale = scale16.astype(np.float32)
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / np.where(scale == 0, 1, scale))
        codes = np.trunc(x * inv[..., None] + np.float32(8.5)).clip(0, 15).astype(np.uint8)
        return BlockQuantTensor(fmt, rows, cols, block, codes, scale16, None, source_format)
    # int8_sym
    scale16 = _half_outward((np.abs(x).max(axis=-1) / np.float32(127)).astype(np.float32), up=True)
    scale = scale16.astype(np.float32)
    inv = np.where(scale == 0, np.float32(0), np.float32(1) / np.where(scale == 0, 1, scale))
    scaled = x * inv[..., None]
    rounded = np.sign(scaled) * np.trunc(np.abs(scaled) + np.float32(0.5))  # ggml's roundf
    codes = (rounded.clip(-127, 127) + 128).astype(np.uint8)
    return BlockQuantTensor(fmt, rows, cols, block, codes, scale16, None, source_format)


def quantization_error(weight: np.ndarray, tensor: BlockQuantTensor) -> dict[str, float]:
    """Normalized MSE and max abs error that quantizing `weight` caused."""
    weight = np.asarray(weight, np.float32)
    diff = tensor.dequantize() - weight
    power = float(np.mean(weight.astype(np.float64) ** 2)) or 1.0
    return {
        "nmse": float(np.mean(diff.astype(np.float64) ** 2)) / power,
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
    }
