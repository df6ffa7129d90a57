"""The native backend: the C decoder (native/src/engine.c) over the memory-mapped weights.bin.

Loading is a map, not a copy: the engine reads every matrix where the exporter wrote it, so the
resident set grows only by the pages a forward touches (the weights once, shared with the page
cache). Because C code will read through raw pointers, the manifest's tensor index is checked
first, completely: every offset aligned and inside the file, every dtype and shape consistent
with its byte count and with the model's hyper-parameters. A bundle that fails raises BundleError
naming the tensor, before any C code sees a pointer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bundle_format import ALIGN, MANIFEST_FILE, WEIGHTS_FILE
from ..errors import BundleError
from ..model_config import ModelConfig
from ..settings import RuntimeSettings
from .base import Backend

# dtypes a tensor of weights.bin may have (the engine itself reads uint8 codes, float16 block scales
# and mins, and float32 norms, biases and inv_freq)
DTYPES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}
QUANT_FORMATS = {"int4_asym": 4, "int4_sym": 4, "int8_sym": 8}  # format -> bits
BLOCK_SIZES = (32, 64, 128)
INV_FREQ = "model.rotary_emb.inv_freq"
_HINT = "the bundle is damaged or was written by an incompatible exporter; export it again"
_HINT_OTHER_BACKEND = "run it with --backend onnxruntime, or export it again with --block 32"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TensorIndex:
    """The manifest's tensor index, checked against weights.bin's size before anything is mapped."""

    def __init__(self, manifest: dict, path: Path, file_size: int):
        self.path = path
        tensors = manifest.get("tensors")
        if not isinstance(tensors, dict):
            raise BundleError(f"{path}: the manifest has no tensor index", _HINT)
        self.entries: dict[str, dict] = {}
        for name, entry in tensors.items():
            self.entries[name] = self._check_entry(name, entry, file_size)
        matrices = manifest.get("matrices")
        self.matrices = matrices if isinstance(matrices, dict) else {}

    def _fail(self, name: str, problem: str) -> BundleError:
        return BundleError(f"{self.path}: tensor {name}: {problem}", _HINT)

    def _check_entry(self, name: str, entry: Any, file_size: int) -> dict:
        if not isinstance(entry, dict):
            raise self._fail(name, "its index entry is not an object")
        offset, nbytes, shape, dtype = (entry.get(key) for key in ("offset", "nbytes", "shape", "dtype"))
        if not _whole(offset) or offset < 0:
            raise self._fail(name, f"offset {offset!r} is not a whole number >= 0")
        if offset % ALIGN:
            raise self._fail(name, f"offset {offset} is not a multiple of {ALIGN}")
        if not _whole(nbytes) or nbytes < 0:
            raise self._fail(name, f"nbytes {nbytes!r} is not a whole number >= 0")
        if offset + nbytes > file_size:
            raise self._fail(name, f"bytes {offset}..{offset + nbytes} lie past the end of {WEIGHTS_FILE} "
                                   f"({file_size} bytes)")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(name, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_whole(d) and d >= 0 for d in shape):
            raise self._fail(name, f"shape {shape!r} is not a list of whole numbers >= 0")
        if math.prod(shape) * DTYPES[dtype] != nbytes:
            raise self._fail(name, f"shape {shape} of {dtype} is {math.prod(shape) * DTYPES[dtype]} bytes, "
                                   f"the index says {nbytes}")
        return {"offset": offset, "nbytes": nbytes, "shape": list(shape), "dtype": dtype}

    def expect(self, name: str, dtype: str, shape: list[int]) -> dict:
        """The entry of `name`, which the engine reads as `dtype` [shape]."""
        entry = self.entries.get(name)
        if entry is None:
            raise BundleError(f"{self.path}: tensor {name} is missing from the manifest", _HINT)
        if entry["dtype"] != dtype or entry["shape"] != shape:
            raise self._fail(name, f"is {entry['dtype']} {entry['shape']}, the model needs {dtype} {shape}")
        return entry

    def expect_matrix(self, name: str, rows: int, cols: int) -> dict:
        """The quantization entry of matrix `name` [rows, cols], its three arrays checked."""
        m = self.matrices.get(name)
        if not isinstance(m, dict):
            raise BundleError(f"{self.path}: matrix {name} is missing from the manifest", _HINT)
        fmt, block = m.get("format"), m.get("block")
        if not isinstance(fmt, str) or fmt not in QUANT_FORMATS or m.get("bits") != QUANT_FORMATS[fmt]:
            raise BundleError(f"{self.path}: matrix {name}: format {fmt!r} with {m.get('bits')!r} bits is not one "
                              f"the native engine runs ({', '.join(QUANT_FORMATS)})", _HINT_OTHER_BACKEND)
        if not _whole(block) or block not in BLOCK_SIZES:
            raise BundleError(f"{self.path}: matrix {name}: blocks of {block!r} values; the native engine runs "
                              f"blocks of {', '.join(map(str, BLOCK_SIZES))}", _HINT_OTHER_BACKEND)
        if m.get("rows") != rows or m.get("cols") != cols:
            raise self._fail(name, f"is [{m.get('rows')!r}, {m.get('cols')!r}], the model needs [{rows}, {cols}]")
        n_blocks = -(-cols // block)
        for role in ("qweight", "scales", "mins"):
            if role == "mins" and m.get(role) is None and fmt != "int4_asym":
                continue
            if not isinstance(m.get(role), str):
                raise self._fail(name, f"{role} {m.get(role)!r} does not name a tensor"
                                       + (" (int4_asym needs mins)" if role == "mins" else ""))
        if fmt != "int4_asym" and m.get("mins") is not None:
            raise self._fail(name, f"{fmt} has no mins, the manifest names {m['mins']!r}")
        self.expect(m["qweight"], "uint8", [rows, n_blocks, block * QUANT_FORMATS[fmt] // 8])
        self.expect(m["scales"], "float16", [rows, n_blocks])
        if fmt == "int4_asym":
            self.expect(m["mins"], "float16", [rows, n_blocks])
        return m


def check_bundle_tensors(manifest: dict, config: ModelConfig, path: Path, file_size: int) -> TensorIndex:
    """Every check the engine needs, before it gets a pointer: BundleError naming the tensor, or the index."""
    if file_size <= 0:
        raise BundleError(f"{path}: empty", _HINT)
    index = TensorIndex(manifest, path, file_size)
    c = config
    index.expect_matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
    if not c.tie_word_embeddings:
        index.expect_matrix("lm_head.weight", c.vocab_size, c.hidden_size)
    index.expect("model.norm.weight", "float32", [c.hidden_size])
    if INV_FREQ not in index.entries:  # earlier exporters kept it inside model.onnx for a head_dim under 32
        raise BundleError(f"{path.parent / MANIFEST_FILE}: its tensor index has no {INV_FREQ} "
                          f"(RoPE's table, which the native engine reads from {WEIGHTS_FILE})",
                          "export the bundle again with this edgellm (edgellm export SOURCE -o BUNDLE --force), "
                          "or run it with --backend onnxruntime")
    index.expect(INV_FREQ, "float32", [c.head_dim // 2])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            index.expect(f"{p}.{norm}.weight", "float32", [c.hidden_size])
        for proj, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            index.expect_matrix(f"{p}.self_attn.{proj}.weight", rows, c.hidden_size)
            if c.attention_bias:
                index.expect(f"{p}.self_attn.{proj}.bias", "float32", [rows])
        index.expect_matrix(f"{p}.self_attn.o_proj.weight", c.hidden_size, c.q_size)
        index.expect_matrix(f"{p}.mlp.gate_proj.weight", c.intermediate_size, c.hidden_size)
        index.expect_matrix(f"{p}.mlp.up_proj.weight", c.intermediate_size, c.hidden_size)
        index.expect_matrix(f"{p}.mlp.down_proj.weight", c.hidden_size, c.intermediate_size)
    return index


class NativeBackend(Backend):
    name = "native"

    def __init__(self, bundle: Path, manifest: dict, settings: RuntimeSettings, context_length: int,
                 config: ModelConfig | None = None):
        from .. import native
        from ..manifest import model_config
        from ..weights import BundleWeights

        self.config = c = config or model_config(manifest)
        path = Path(bundle) / WEIGHTS_FILE
        try:
            file_size = path.stat().st_size
        except OSError as error:
            raise BundleError(f"{path}: cannot be read ({error.strerror})", _HINT) from None
        index = check_bundle_tensors(manifest, c, path, file_size)
        self.context_length = context_length
        self.prefill_chunk = min(settings.prefill_chunk, context_length)
        self.position = 0
        self.weights = BundleWeights(bundle, manifest)  # np.memmap: views below point into the mapping

        def matrix(name: str) -> native.QMatrix:
            m = index.matrices[name]
            mins = self.weights.array(m["mins"]) if m["format"] == "int4_asym" else None
            return native.QMatrix(m["format"], m["rows"], m["cols"], self.weights.array(m["qweight"]),
                                  self.weights.array(m["scales"]), mins, m["block"])

        def tensor(name: str) -> np.ndarray:
            return self.weights.array(name)

        layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            bias = (lambda proj: tensor(f"{p}.self_attn.{proj}.bias")) if c.attention_bias else (lambda proj: None)
            layers.append(native.DecoderLayer(
                attn_norm=tensor(f"{p}.input_layernorm.weight"),
                q=matrix(f"{p}.self_attn.q_proj.weight"), k=matrix(f"{p}.self_attn.k_proj.weight"),
                v=matrix(f"{p}.self_attn.v_proj.weight"), o=matrix(f"{p}.self_attn.o_proj.weight"),
                mlp_norm=tensor(f"{p}.post_attention_layernorm.weight"),
                gate=matrix(f"{p}.mlp.gate_proj.weight"), up=matrix(f"{p}.mlp.up_proj.weight"),
                down=matrix(f"{p}.mlp.down_proj.weight"),
                q_bias=bias("q_proj"), k_bias=bias("k_proj"), v_bias=bias("v_proj")))
        embed = matrix("model.embed_tokens.weight")
        weights = native.DecoderWeights(
            hidden=c.hidden_size, ffn=c.intermediate_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, vocab=c.vocab_size, rms_eps=float(c.rms_norm_eps), embed=embed,
            head=embed if c.tie_word_embeddings else matrix("lm_head.weight"),
            final_norm=tensor("model.norm.weight"), inv_freq=tensor(INV_FREQ), layers=layers)
        self.pool = native.ThreadPool(settings.thread_count)
        self.engine = native.Engine(weights, context_length, self.prefill_chunk, self.pool)
        self.kernel_variant = native.kernel_variant()
        # [chunk, V]: only the rows a call writes are ever touched (decode: the first one)
        self.logits = np.empty((self.prefill_chunk, c.vocab_size), np.float32)
        # Loading freed what it parsed (the tokenizer's JSON alone leaves ~27 MB of free heap that
        # glibc keeps resident): hand it back now, before the weights are paged in, so the resident
        # set at its peak is the weights, the cache and what is in use.
        native.trim_heap()

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if len(token_ids) == 1 and not all_logits and self.position < self.context_length:
            self.engine.forward(token_ids, self.position, self.logits)  # a decode step: no chunking to do
            self.position += 1
            return self.logits[0].copy()
        return super().forward(token_ids, all_logits)

    def _forward_chunk(self, token_ids: Sequence[int], all_logits: bool) -> np.ndarray:
        s = len(token_ids)
        self.engine.forward(token_ids, self.position, self.logits, all_logits)
        self.position += s
        return self.logits[:s].copy() if all_logits else self.logits[0].copy()

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()  # before the pool it runs on and the mapping it reads
            self.engine = None
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None
        self.weights = None

    def describe(self) -> dict:
        return {"backend": self.name, "context_length": self.context_length, "prefill_chunk": self.prefill_chunk,
                "kernel_variant": self.kernel_variant, "threads": self.pool.n_threads if self.pool else 0}
