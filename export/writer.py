"""Write a bundle's files: one aligned weights.bin, model.onnx pointing into it, the manifest.

weights.bin holds every weight array back to back, each starting at a multiple of ALIGN bytes,
in the exact layout the kernels read: ONNX Runtime gets (offset, length) through external data
and the native engine maps the same bytes through the manifest's tensor index. The NPU graphs'
npu_weights.bin (npu_export.externalize) is laid out by the same two helpers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto

from edgellm.bundle.format import ALIGN, INV_FREQ
from edgellm.export.canonical import Tensor
from edgellm.export.quant.formats import BlockQuantTensor

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}
INLINE_LIMIT = 64  # bytes: shape constants and scalars stay inside model.onnx


def is_inline(name: str, array: np.ndarray) -> bool:
    """Graph constants and arrays under INLINE_LIMIT stay inside model.onnx. RoPE's table never does,
    however small: every backend reads the one table the exporter verified with from weights.bin."""
    return name != INV_FREQ and (name.startswith("const.") or array.nbytes < INLINE_LIMIT)


def append_aligned(out: BinaryIO, data: bytes) -> int:
    """Write `data` at the next multiple of ALIGN bytes of `out` (zeros pad the gap); return its offset."""
    out.write(b"\0" * (-out.tell() % ALIGN))
    offset = out.tell()
    out.write(data)
    return offset


def point_to_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` read its bytes from `location` at (offset, length), not from the graph file."""
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        item = tensor.external_data.add()
        item.key, item.value = key, value


def write_weights(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """Write the external arrays; return the tensor index {name: offset, nbytes, shape, dtype, sha256}."""
    index: dict[str, dict] = {}
    with open(path, "wb") as out:
        for name, array in arrays.items():
            if is_inline(name, array):
                continue
            data = np.ascontiguousarray(array).tobytes()
            index[name] = {
                "offset": append_aligned(out, data),
                "nbytes": len(data),
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    return index


def attach_initializers(
    model: onnx.ModelProto, arrays: dict[str, np.ndarray], index: dict[str, dict], weights_file: str = "weights.bin"
) -> None:
    for name, array in arrays.items():
        if name not in index:
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
            continue
        tensor = TensorProto(name=name, data_type=_ONNX_TYPES[np.dtype(array.dtype)], dims=list(array.shape))
        point_to_external(tensor, weights_file, index[name]["offset"], index[name]["nbytes"])
        model.graph.initializer.append(tensor)


def matrix_index(tensors: dict[str, Tensor]) -> dict[str, dict]:
    """For each checkpoint matrix: its quant format and the stored arrays that make it up."""
    out = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, BlockQuantTensor):
            out[name] = {
                "format": tensor.format,
                "bits": tensor.bits,
                "block": tensor.block,
                "rows": tensor.rows,
                "cols": tensor.cols,
                "source_format": tensor.source_format,
                "qweight": f"{name}.qweight",
                "scales": f"{name}.scales",
                "mins": f"{name}.mins" if tensor.mins is not None else None,
            }
    return out


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
