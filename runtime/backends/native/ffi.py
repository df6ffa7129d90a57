"""The native kernels (native/, C called through cffi): the one module that touches cffi.

It loads the compiled extension `edgellm._native` (built at `pip install` by setup.py, optional),
checks its ABI version, checks every numpy argument's dtype, contiguity and length and hands
the buffers over without copying. cffi releases the GIL for each call, so other Python threads
run while a kernel does. Nothing outside this module sees a cdata pointer.

The formats and the math are documented in native/edgellm.h. The numpy definitions at the end
of this module (`quantize_activations_numpy`, `matvec_numpy`) compute the same thing in the same
order: the C reference, and every SIMD variant, equals them bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np

from edgellm.bundle.quant_formats import QUANT_FORMATS
from edgellm.errors import EdgeLLMError

ABI_VERSION = 6  # must equal EL_ABI_VERSION in native/edgellm.h
ACT_BLOCK = 32
# One activation block: el_block_q16a {float d; int32_t sum; int8_t qh[32]; int8_t ql[32];}, 72 bytes;
# x_i ~ d * (256 * qh_i + ql_i).
Q16A_DTYPE = np.dtype([("d", "<f4"), ("sum", "<i4"), ("qh", "i1", (ACT_BLOCK,)), ("ql", "i1", (ACT_BLOCK,))])
# An 8-bit activation block: el_block_q8a {float d; float ds; int32_t sum; int8_t q[32];}, 44 bytes;
# x_i ~ d * q_i, ds = d * sum.
Q8A_DTYPE = np.dtype([("d", "<f4"), ("ds", "<f4"), ("sum", "<i4"), ("q", "i1", (ACT_BLOCK,))])
Q8A_LANES = 4  # the 8-bit products' float accumulation: lane j % 4 takes block j (edgellm.h)
LANES = 8  # the float accumulation of a product: lane j % 8 takes block j (edgellm.h)
FORMATS = {name: f.native_id for name, f in QUANT_FORMATS.items()}  # enum el_format
BLOCK_SIZES = (32, 64, 128)

_HINT_BUILD = (
    "install a C compiler and the Python headers (apt-get install gcc python3-dev) and cffi, "
    "then reinstall edgellm (pip install -e .)"
)

_loaded = None  # (ffi, lib) once the extension imported and its ABI matched
_load_error: EdgeLLMError | None = None


def _open():
    """(ffi, lib) of the extension, or EdgeLLMError saying why it cannot be used."""
    global _loaded, _load_error
    if _loaded is None and _load_error is None:
        try:
            from edgellm import _native  # lazy: optional (the C extension may not have been built)
        except ImportError as error:
            _load_error = EdgeLLMError(
                f"native backend unavailable: the C extension edgellm._native is not built ({error})", _HINT_BUILD
            )
        else:
            ffi, lib = _native.ffi, _native.lib
            abi = lib.el_abi_version()
            if abi != ABI_VERSION or lib.EL_ABI_VERSION != ABI_VERSION:
                _load_error = EdgeLLMError(
                    f"native backend unavailable: edgellm._native has ABI version {abi}, "
                    f"this edgellm expects {ABI_VERSION}",
                    "the extension is stale: " + _HINT_BUILD,
                )
            elif ffi.sizeof("el_block_q16a") != Q16A_DTYPE.itemsize:
                _load_error = EdgeLLMError(
                    f"native backend unavailable: el_block_q16a is {ffi.sizeof('el_block_q16a')} bytes, "
                    f"expected {Q16A_DTYPE.itemsize}",
                    _HINT_BUILD,
                )
            else:
                _loaded = (ffi, lib)
    if _load_error is not None:
        raise _load_error
    return _loaded


def _load():
    """(ffi, lib) with a kernel variant chosen (EDGELLM_KERNELS, if set, must name one this CPU runs)."""
    ffi, lib = _open()
    if lib.el_init() != lib.EL_OK and ffi.string(lib.el_variant()) == b"none":
        raise EdgeLLMError(
            f"EDGELLM_KERNELS={os.environ.get('EDGELLM_KERNELS', '')!r} names a kernel variant this CPU does not run",
            f"choose one of: {', '.join(available_variants())}",
        )
    return ffi, lib


def available() -> bool:
    """True if the native kernels can run here."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    try:
        _load()
    except EdgeLLMError as error:
        return str(error)
    return None


def _check(status: int, what: str) -> None:
    if status != 0:
        ffi, lib = _loaded
        raise EdgeLLMError(f"native {what} failed: {ffi.string(lib.el_status_string(status)).decode()}")


# ---- variants ----------------------------------------------------------------------------------


def kernel_variant() -> str:
    """The variant the kernels run: ref, avx2, avx512vnni, neon, dotprod or i8mm."""
    ffi, lib = _load()
    return ffi.string(lib.el_variant()).decode()


def available_variants() -> list[str]:
    """The variants this CPU runs, best last (the default is the last one)."""
    ffi, lib = _open()
    names = ffi.new("const char *[16]")
    count = lib.el_available_variants(names, 16)
    return [ffi.string(names[i]).decode() for i in range(count)]


def set_variant(name: str) -> None:
    """Switch variant (tests, benchmarks). Not while kernels run on other threads."""
    ffi, lib = _open()  # not _load: a bad EDGELLM_KERNELS is what this may fix
    if lib.el_set_variant(name.encode()) != lib.EL_OK:
        raise EdgeLLMError(
            f"kernel variant {name!r} does not run on this CPU", f"choose one of: {', '.join(available_variants())}"
        )


@contextlib.contextmanager
def using_variant(name: str):
    """Run the block with kernel variant `name`, then restore the previous one."""
    previous = kernel_variant()
    set_variant(name)
    try:
        yield
    finally:
        set_variant(previous)


# ---- argument checks: dtype, contiguity, length; never a copy ----------------------------------


def _array(value, dtype, name: str, size: int | None = None) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise EdgeLLMError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.ndim == 0 or value.shape[-1] == 0:
        raise EdgeLLMError(f"{name} must have at least one element along its last axis, got shape {value.shape}")
    if value.dtype != dtype:
        raise EdgeLLMError(f"{name} must be {np.dtype(dtype)}, got {value.dtype}")
    if not value.flags.c_contiguous:
        raise EdgeLLMError(f"{name} must be C-contiguous", "pass np.ascontiguousarray(...)")
    if size is not None and value.size != size:
        raise EdgeLLMError(f"{name} has {value.size} elements, expected {size}")
    return value


def _out(out, shape: tuple, dtype, name: str = "out") -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    _array(out, dtype, name, int(np.prod(shape)))
    if not out.flags.writeable:
        raise EdgeLLMError(f"{name} is read-only")
    return out


def _ptr(ffi, ctype: str, array: np.ndarray):
    return ffi.from_buffer(ctype, array)


class ThreadPool:
    """n_threads computing the rows of one product together (the caller's thread is one of them)."""

    def __init__(self, n_threads: int):
        ffi, lib = _load()
        if not 1 <= n_threads <= 1024:
            raise EdgeLLMError(f"thread count must be between 1 and 1024, got {n_threads}")
        handle = ffi.new("el_pool **")
        _check(lib.el_pool_create(handle, n_threads), "thread pool creation")
        self._pool = ffi.gc(handle[0], lib.el_pool_destroy)
        self.n_threads = n_threads

    def close(self) -> None:
        if self._pool is not None:
            ffi, _ = _loaded
            ffi.release(self._pool)  # runs el_pool_destroy now
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pool_handle(pool: ThreadPool | None):
    if pool is None:
        return _loaded[0].NULL
    if pool._pool is None:
        raise EdgeLLMError("the thread pool is closed")
    return pool._pool


# ---- quantized matrices and activations --------------------------------------------------------


@dataclass
class QMatrix:
    """A block-quantized [rows, cols] matrix in the layout of native/edgellm.h (and of weights.bin).

    qweight uint8 [rows, n_blocks, block*bits/8], scales float16 [rows, n_blocks], mins float16
    [rows, n_blocks] for int4_asym. The arrays are referenced, not copied: a memory-mapped
    weights.bin stays on disk.
    """

    format: str
    rows: int
    cols: int
    qweight: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None
    block: int = 32
    _struct: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise EdgeLLMError(f"unknown quantization format {self.format!r}", f"supported: {', '.join(FORMATS)}")
        if self.block not in BLOCK_SIZES:
            raise EdgeLLMError(
                f"the native kernels take blocks of {BLOCK_SIZES}, not {self.block}", "export the model with --block 32"
            )
        if self.rows < 0 or self.cols < 1:
            raise EdgeLLMError(f"bad matrix shape [{self.rows}, {self.cols}]")
        n_blocks = -(-self.cols // self.block)
        _array(
            self.qweight, np.uint8, "qweight", self.rows * n_blocks * self.block * QUANT_FORMATS[self.format].bits // 8
        )
        _array(self.scales, np.float16, "scales", self.rows * n_blocks)
        if self.format == "int4_asym":
            if self.mins is None:
                raise EdgeLLMError("int4_asym needs mins")
            _array(self.mins, np.float16, "mins", self.rows * n_blocks)
        elif self.mins is not None:
            raise EdgeLLMError(f"{self.format} has no mins")
        ffi, _ = _load()
        buffers = (
            _ptr(ffi, "uint8_t[]", self.qweight),
            _ptr(ffi, "el_half[]", self.scales),
            _ptr(ffi, "el_half[]", self.mins) if self.mins is not None else ffi.NULL,
        )
        struct = ffi.new("el_qmatrix *")
        struct.format, struct.rows, struct.cols, struct.block = FORMATS[self.format], self.rows, self.cols, self.block
        struct.qweight, struct.scales, struct.mins = buffers
        self._struct = struct
        self._buffers = buffers  # the struct holds raw pointers; these keep the buffers exported

    @property
    def n_xblocks(self) -> int:
        return -(-self.cols // ACT_BLOCK)


# The two activation formats: (numpy dtype, C block type, el_quantize_* and el_matmul* entry points).
_ACTIVATIONS = {
    16: (Q16A_DTYPE, "el_block_q16a", "el_quantize_q16a", "el_matmul"),
    8: (Q8A_DTYPE, "el_block_q8a", "el_quantize_q8a", "el_matmul_q8a"),
}


def _quantize(x: np.ndarray, out: np.ndarray | None, bits: int) -> np.ndarray:
    ffi, lib = _load()
    dtype, ctype, function, _ = _ACTIVATIONS[bits]
    _array(x, np.float32, "x")
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise EdgeLLMError(f"x must be [n] or [tokens, n], got shape {x.shape}")
    n, n_rows = x.shape[-1], (x.shape[0] if x.ndim == 2 else 1)
    n_blocks = -(-n // ACT_BLOCK)
    out = _out(out, x.shape[:-1] + (n_blocks,), dtype)
    _check(getattr(lib, function)(_ptr(ffi, f"{ctype}[]", out), n_blocks, _ptr(ffi, "float[]", x), n_rows, n), function)
    return out


def quantize_activations(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 [n] or [tokens, n] -> el_block_q16a blocks [ceil(n/32)] or [tokens, ceil(n/32)]."""
    return _quantize(x, out, 16)


def quantize_activations_q8a(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 [n] or [tokens, n] -> el_block_q8a blocks [ceil(n/32)] or [tokens, ceil(n/32)]."""
    return _quantize(x, out, 8)


def matvec(w: QMatrix, xq: np.ndarray, out: np.ndarray | None = None, pool: ThreadPool | None = None) -> np.ndarray:
    """y float32 [rows] = W x for activation blocks xq [ceil(cols/32)]."""
    ffi, lib = _load()
    _array(xq, Q16A_DTYPE, "xq", w.n_xblocks)
    out = _out(out, (w.rows,), np.float32)
    _check(
        lib.el_matvec(
            _ptr(ffi, "float[]", out),
            w.rows,
            w._struct,
            _ptr(ffi, "el_block_q16a[]", xq),
            w.n_xblocks,
            _pool_handle(pool),
        ),
        "matvec",
    )
    return out


def _matmul(w: QMatrix, xq: np.ndarray, out: np.ndarray | None, pool: ThreadPool | None, bits: int) -> np.ndarray:
    ffi, lib = _load()
    dtype, ctype, _, function = _ACTIVATIONS[bits]
    if xq.ndim != 2:
        raise EdgeLLMError(f"xq must be [tokens, blocks], got shape {xq.shape}")
    _array(xq, dtype, "xq", xq.shape[0] * w.n_xblocks)
    n_tokens = xq.shape[0]
    out = _out(out, (n_tokens, w.rows), np.float32)
    _check(
        getattr(lib, function)(
            _ptr(ffi, "float[]", out),
            n_tokens,
            w.rows,
            w._struct,
            _ptr(ffi, f"{ctype}[]", xq),
            w.n_xblocks,
            _pool_handle(pool),
        ),
        function,
    )
    return out


def matmul(w: QMatrix, xq: np.ndarray, out: np.ndarray | None = None, pool: ThreadPool | None = None) -> np.ndarray:
    """Y float32 [tokens, rows] = X W^T for activation blocks xq [tokens, ceil(cols/32)]."""
    return _matmul(w, xq, out, pool, 16)


def matmul_q8a(w: QMatrix, xq: np.ndarray, out: np.ndarray | None = None, pool: ThreadPool | None = None) -> np.ndarray:
    """Y float32 [tokens, rows] = X W^T for 8-bit activation blocks xq [tokens, ceil(cols/32)]."""
    return _matmul(w, xq, out, pool, 8)


# ---- float kernels ----------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x [n] or [rows, n] float32 -> x / sqrt(mean(x^2) + eps) * weight [n]."""
    ffi, lib = _load()
    _array(x, np.float32, "x")
    n = x.shape[-1]
    _array(weight, np.float32, "weight", n)
    out = _out(out, x.shape, np.float32)
    _check(
        lib.el_rms_norm(
            _ptr(ffi, "float[]", out), _ptr(ffi, "float[]", x), _ptr(ffi, "float[]", weight), x.size // n, n, eps
        ),
        "rms_norm",
    )
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x [heads, head_dim] float32 rotated with cos, sin [head_dim/2] (rotate-half, HF order)."""
    ffi, lib = _load()
    _array(x, np.float32, "x")
    if x.ndim != 2 or x.shape[1] % 2:
        raise EdgeLLMError(f"x must be [heads, head_dim] with an even head_dim, got shape {x.shape}")
    heads, head_dim = x.shape
    _array(cos, np.float32, "cos", head_dim // 2)
    _array(sin, np.float32, "sin", head_dim // 2)
    out = _out(out, x.shape, np.float32)
    _check(
        lib.el_rope(
            _ptr(ffi, "float[]", out),
            _ptr(ffi, "float[]", x),
            _ptr(ffi, "float[]", cos),
            _ptr(ffi, "float[]", sin),
            heads,
            head_dim,
        ),
        "rope",
    )
    return out


def rope_tables(inv_freq: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [half] of angles float32(position) * inv_freq."""
    ffi, lib = _load()
    _array(inv_freq, np.float32, "inv_freq")
    cos, sin = np.empty_like(inv_freq), np.empty_like(inv_freq)
    _check(
        lib.el_rope_tables(
            _ptr(ffi, "float[]", cos),
            _ptr(ffi, "float[]", sin),
            _ptr(ffi, "float[]", inv_freq),
            inv_freq.size,
            float(position),
        ),
        "rope_tables",
    )
    return cos, sin


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis of x [n] or [rows, n] float32."""
    ffi, lib = _load()
    _array(x, np.float32, "x")
    n = x.shape[-1]
    out = _out(out, x.shape, np.float32)
    _check(lib.el_softmax(_ptr(ffi, "float[]", out), _ptr(ffi, "float[]", x), x.size // n, n), "softmax")
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up, elementwise, float32."""
    return _elementwise("silu_mul", gate, up, out)


def add(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a + b, elementwise, float32 (the residual add)."""
    return _elementwise("add", a, b, out)


def _elementwise(kernel: str, a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """out = kernel(a, b) over two float32 arrays of one size (el_silu_mul, el_add)."""
    ffi, lib = _load()
    _array(a, np.float32, "a")
    _array(b, np.float32, "b", a.size)
    out = _out(out, a.shape, np.float32)
    call = getattr(lib, f"el_{kernel}")
    _check(call(_ptr(ffi, "float[]", out), _ptr(ffi, "float[]", a), _ptr(ffi, "float[]", b), a.size), kernel)
    return out


def trim_heap() -> bool:
    """Give freed C-heap memory back to the system (glibc): True if some was released."""
    _, lib = _load()
    return bool(lib.el_heap_trim())


# ---- the decoder engine ------------------------------------------------------------------------


@dataclass
class DecoderLayer:
    """One layer's weights (views of weights.bin), named after the checkpoint's modules."""

    attn_norm: np.ndarray  # float32 [hidden]
    q: QMatrix  # [heads*head_dim, hidden]
    k: QMatrix  # [kv_heads*head_dim, hidden]
    v: QMatrix
    o: QMatrix  # [hidden, heads*head_dim]
    mlp_norm: np.ndarray  # float32 [hidden]
    gate: QMatrix  # [ffn, hidden]
    up: QMatrix
    down: QMatrix  # [hidden, ffn]
    q_bias: np.ndarray | None = None  # float32 [heads*head_dim] (Qwen2)
    k_bias: np.ndarray | None = None  # float32 [kv_heads*head_dim]
    v_bias: np.ndarray | None = None


@dataclass
class DecoderWeights:
    """What el_engine_create reads: hyper-parameters and views of weights.bin (see native/edgellm.h)."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    embed: QMatrix  # [vocab, hidden]
    head: QMatrix  # [vocab, hidden]; the embedding's own QMatrix when tied
    final_norm: np.ndarray  # float32 [hidden]
    inv_freq: np.ndarray  # float32 [head_dim/2]
    layers: list[DecoderLayer]


def _copy_qmatrix(dst, matrix: QMatrix) -> None:
    src = matrix._struct
    dst.format, dst.rows, dst.cols, dst.block = src.format, src.rows, src.cols, src.block
    dst.qweight, dst.scales, dst.mins = src.qweight, src.scales, src.mins


def _f32_pointer(ffi, array: np.ndarray | None, name: str, size: int, keep: list):
    if array is None:
        return ffi.NULL
    _array(array, np.float32, name, size)
    pointer = _ptr(ffi, "float[]", array)
    keep.append(pointer)
    return pointer


class Engine:
    """The whole decoder in C (el_engine_*): a KV cache of `context` positions, chunks of up to
    `max_chunk` tokens, computed by `pool`. It reads `weights` in place; the arrays (and the mapping
    under them) stay referenced by this object for as long as it lives."""

    def __init__(self, weights: DecoderWeights, context: int, max_chunk: int, pool: ThreadPool | None = None):
        ffi, lib = _load()
        bits = os.environ.get("EDGELLM_ACTIVATIONS")
        if bits not in (None, "", "8", "16"):
            raise EdgeLLMError(
                f"EDGELLM_ACTIVATIONS={bits!r}: expected 8 or 16 (the activations of the native products)",
                "unset it to let the kernel variant choose",
            )
        w = weights
        q_size, kv_size = w.heads * w.head_dim, w.kv_heads * w.head_dim
        keep: list = []
        layers = ffi.new("el_layer[]", len(w.layers))
        for i, layer in enumerate(w.layers):
            dst = layers[i]
            dst.attn_norm = _f32_pointer(ffi, layer.attn_norm, f"layer {i} attn_norm", w.hidden, keep)
            dst.mlp_norm = _f32_pointer(ffi, layer.mlp_norm, f"layer {i} mlp_norm", w.hidden, keep)
            dst.q_bias = _f32_pointer(ffi, layer.q_bias, f"layer {i} q_bias", q_size, keep)
            dst.k_bias = _f32_pointer(ffi, layer.k_bias, f"layer {i} k_bias", kv_size, keep)
            dst.v_bias = _f32_pointer(ffi, layer.v_bias, f"layer {i} v_bias", kv_size, keep)
            for role in ("q", "k", "v", "o", "gate", "up", "down"):
                _copy_qmatrix(getattr(dst, role), getattr(layer, role))
        model = ffi.new("el_model *")
        model.n_layers, model.hidden, model.ffn = len(w.layers), w.hidden, w.ffn
        model.n_heads, model.n_kv_heads, model.head_dim, model.vocab = w.heads, w.kv_heads, w.head_dim, w.vocab
        model.rms_eps = w.rms_eps
        _copy_qmatrix(model.embed, w.embed)
        _copy_qmatrix(model.head, w.head)
        model.final_norm = _f32_pointer(ffi, w.final_norm, "final_norm", w.hidden, keep)
        model.inv_freq = _f32_pointer(ffi, w.inv_freq, "inv_freq", w.head_dim // 2, keep)
        model.layers = layers
        handle = ffi.new("el_engine **")
        pool_handle = _pool_handle(pool)
        _check(lib.el_engine_create(handle, model, context, max_chunk, pool_handle), "engine creation")
        # The destructor holds the pool: an engine is always destroyed before the pool it runs on.
        self._engine = ffi.gc(handle[0], lambda engine, _pool=pool_handle: lib.el_engine_destroy(engine))
        self._keep = (weights, keep, pool)  # everything the C side points into
        self.context, self.max_chunk, self.vocab = context, min(max_chunk, context), w.vocab
        self._tokens = np.zeros(self.max_chunk, np.int32)
        self._tokens_ptr = _ptr(ffi, "int32_t[]", self._tokens)
        self._out, self._out_ptr = None, None  # the last logits buffer and its pointer (decode reuses one)
        self._trace: np.ndarray | None = None  # el_engine_trace's buffer, while one is set

    @property
    def allocated_bytes(self) -> int:
        ffi, lib = _loaded
        return int(lib.el_engine_bytes(self._engine)) if self._engine is not None else 0

    @property
    def activation_bits(self) -> int:
        """8 or 16: the activation blocks of the engine's products (EDGELLM_ACTIVATIONS, else the kernels')."""
        ffi, lib = _loaded
        return int(lib.el_engine_activation_bits(self._engine)) if self._engine is not None else 0

    def forward(self, tokens, position: int, out: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions position.. (one chunk); logits into out [vocab] or [tokens, vocab]."""
        ffi, lib = _loaded
        if self._engine is None:
            raise EdgeLLMError("the native engine is closed")
        n = len(tokens)
        if not 1 <= n <= self.max_chunk:
            raise EdgeLLMError(f"a chunk of {n} tokens; the engine takes 1 to {self.max_chunk}")
        try:
            self._tokens[:n] = tokens
        except (OverflowError, TypeError, ValueError):
            raise EdgeLLMError(
                f"token ids must be whole numbers in the vocabulary [0, {self.vocab}), got {list(tokens)}"
            ) from None
        if out is not self._out:
            if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
                raise EdgeLLMError("the logits buffer must be a writable C-contiguous float32 array")
            self._out, self._out_ptr = out, _ptr(ffi, "float[]", out)
        # the sizes (out too short, position past the context) are checked by el_engine_forward: EL_ERANGE
        _check(
            lib.el_engine_forward(
                self._engine, self._out_ptr, out.size, self._tokens_ptr, n, position, int(all_logits)
            ),
            "engine forward",
        )
        return out

    def trace(self, buffer: np.ndarray | None) -> None:
        """Record the residual stream after each layer's attention and MLP into `buffer` float32
        [layers, 2, tokens, hidden] during the forwards that follow (None: stop); el_engine_trace."""
        ffi, lib = _loaded
        if buffer is not None and (buffer.dtype != np.float32 or not buffer.flags.c_contiguous):
            raise EdgeLLMError("the trace buffer must be a C-contiguous float32 array")
        self._trace = buffer  # referenced while the C side may write into it
        pointer = _ptr(ffi, "float[]", buffer) if buffer is not None else ffi.NULL
        _check(lib.el_engine_trace(self._engine, pointer, buffer.size if buffer is not None else 0), "engine trace")

    def profile(self) -> dict[str, float]:
        """Seconds per phase, summed over calls (EDGELLM_PROFILE=1 when the engine was made; else empty)."""
        ffi, lib = _loaded
        names, seconds = ffi.new("const char *[32]"), ffi.new("double[32]")
        count = lib.el_engine_profile(self._engine, names, seconds, 32)
        return {ffi.string(names[i]).decode(): float(seconds[i]) for i in range(count)}

    def close(self) -> None:
        if self._engine is not None:
            ffi, _ = _loaded
            ffi.release(self._engine)  # runs el_engine_destroy now
            self._engine = None
            self._keep = None
            self._out = self._out_ptr = self._trace = None


# ---- numpy definitions: what the C code computes, bit for bit -----------------------------------


def _round_q(s: np.ndarray) -> np.ndarray:
    """roundf (half away from zero) clamped to [-127, 127], in float32 like the C code."""
    whole = np.trunc(s)
    rounded = whole + np.where(np.abs(s - whole) >= np.float32(0.5), np.sign(s), np.float32(0))
    return np.clip(rounded, -127, 127).astype(np.float32)


def _activation_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [..., n] -> (its blocks [..., ceil(n/32), 32] zero-padded, whether each block is finite,
    each block's max |x| (0 where not finite))."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    n_blocks = -(-n // ACT_BLOCK)
    padded = np.zeros(x.shape[:-1] + (n_blocks * ACT_BLOCK,), np.float32)
    padded[..., :n] = x
    blocks = padded.reshape(x.shape[:-1] + (n_blocks, ACT_BLOCK))  # [..., blocks, 32]
    magnitude = np.abs(blocks)
    finite = np.all(magnitude <= np.finfo(np.float32).max, axis=-1)  # False for NaN and inf
    amax = np.where(finite, np.where(finite[..., None], magnitude, 0).max(axis=-1), np.float32(0))
    return blocks, finite, amax


def quantize_activations_numpy(x: np.ndarray) -> np.ndarray:
    """x float32 [..., n] -> Q16A_DTYPE [..., ceil(n/32)], as native/edgellm.h defines it."""
    blocks, finite, amax = _activation_blocks(x)
    c = (amax / np.float32(127)).astype(np.float32)  # [..., blocks]: the coarse scale
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = (blocks / np.where(c == 0, np.float32(1), c)[..., None]).astype(np.float32)
        qh = _round_q(s)
        ql = _round_q(((s - qh) * np.float32(256)).astype(np.float32))  # s - qh is exact
    keep = (finite & (c != 0))[..., None]
    qh = np.where(keep, qh, 0).astype(np.int8)
    ql = np.where(keep, ql, 0).astype(np.int8)
    out = np.empty(finite.shape, Q16A_DTYPE)
    out["d"] = np.where(finite, (c / np.float32(256)).astype(np.float32), np.float32(np.nan))
    out["sum"] = (256 * qh.astype(np.int32) + ql).sum(axis=-1, dtype=np.int32)
    out["qh"] = qh
    out["ql"] = ql
    return out


def activation_values(xq: np.ndarray) -> np.ndarray:
    """int64 [..., blocks, 32]: the 16-bit values 256 * qh + ql of activation blocks."""
    return 256 * xq["qh"].astype(np.int64) + xq["ql"].astype(np.int64)


def reduce_lanes(lanes: np.ndarray) -> np.ndarray:
    """[..., 8] float32 -> [...]: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), in float32."""
    v = lanes
    return ((v[..., 0] + v[..., 4]) + (v[..., 2] + v[..., 6])) + ((v[..., 1] + v[..., 5]) + (v[..., 3] + v[..., 7]))


def matvec_numpy(
    fmt: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, cols: int, xq: np.ndarray
) -> np.ndarray:
    """y float32 [rows] from unpacked codes uint8 [rows, n_blocks, block] (quant_formats' codes),
    scales/mins [rows, n_blocks] (float16, as weights.bin stores them, or float32) and activation blocks
    xq [ceil(cols/32)], in the C order."""
    rows, _, block = codes.shape
    scales = scales.astype(np.float32)  # exact: every float16 is a float32
    mins = None if mins is None else mins.astype(np.float32)
    n_xblocks = -(-cols // ACT_BLOCK)
    c = codes.reshape(rows, -1)[:, : n_xblocks * ACT_BLOCK].reshape(rows, n_xblocks, ACT_BLOCK)
    isum = ((c.astype(np.int64) - (QUANT_FORMATS[fmt].zero_point or 0)) * activation_values(xq)).sum(
        axis=-1
    )  # exact, |isum| < 2**31
    isum = isum.astype(np.float32)  # [rows, n_xblocks], rounded to float32 as (float)isum in C
    lanes = np.zeros((rows, LANES), np.float32)
    for j in range(n_xblocks):
        b, d = j * ACT_BLOCK // block, xq["d"][j]
        term = (scales[:, b] * d) * isum[:, j]
        if fmt == "int4_asym":
            term = term + (mins[:, b] * d) * np.float32(xq["sum"][j])
        lanes[:, j % LANES] += term
    return reduce_lanes(lanes)


def quantize_q8a_numpy(x: np.ndarray) -> np.ndarray:
    """x float32 [..., n] -> Q8A_DTYPE [..., ceil(n/32)], as native/edgellm.h defines el_block_q8a."""
    blocks, finite, amax = _activation_blocks(x)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = (np.float32(127) / amax).astype(np.float32)  # inf for an all-zero block
        q = np.clip(np.rint((blocks * inverse[..., None]).astype(np.float32)), -127, 127)  # ties to even
    live = finite & (d != 0) & (inverse <= np.finfo(np.float32).max)  # else zeros (edgellm.h)
    q = np.where(live[..., None], q, 0).astype(np.int8)
    d = np.where(live, d, np.float32(0))
    out = np.empty(finite.shape, Q8A_DTYPE)
    out["q"] = q
    out["sum"] = q.sum(axis=-1, dtype=np.int32)
    out["d"] = np.where(finite, d, np.float32(np.nan))
    out["ds"] = np.where(finite, (d * out["sum"].astype(np.float32)).astype(np.float32), np.float32(np.nan))
    return out


def fma_float32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once, like C's fmaf: the exact product in float64, the sum rounded to
    odd (an inexact float64 sum gets an odd last bit), then to float32; rounding to odd with 29 bits to
    spare makes the second rounding give the correctly rounded float32."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)  # exact: 24 + 24 bits
    c64 = np.asarray(c, np.float64)
    s = p + c64
    with np.errstate(invalid="ignore"):
        back = s - p
        error = (p - (s - back)) + (c64 - back)  # TwoSum: s + error == p + c exactly
        bits = s.view(np.int64)
        inexact = (error != 0) & np.isfinite(s) & ((bits & 1) == 0)
        toward = np.where(error > 0, np.inf, -np.inf)
    s = np.where(inexact, np.nextafter(s, toward), s)
    return s.astype(np.float32)


def matmul_q8a_numpy(
    fmt: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, cols: int, xq: np.ndarray
) -> np.ndarray:
    """y float32 [tokens, rows] from unpacked codes uint8 [rows, n_blocks, block], scales/mins
    [rows, n_blocks] and 8-bit activation blocks xq [tokens, ceil(cols/32)], in the C order."""
    rows, _, block = codes.shape
    scales = scales.astype(np.float32)
    mins = None if mins is None else mins.astype(np.float32)
    xq = np.atleast_2d(xq)
    n_xblocks = -(-cols // ACT_BLOCK)
    c = codes.reshape(rows, -1)[:, : n_xblocks * ACT_BLOCK].reshape(rows, n_xblocks, ACT_BLOCK)
    weights = c.astype(np.int64) - (QUANT_FORMATS[fmt].zero_point or 0)
    isum = np.einsum("rjk,tjk->trj", weights, xq["q"].astype(np.int64)).astype(np.float32)  # exact, then (float)
    lanes = np.full((xq.shape[0], rows, Q8A_LANES), -0.0, np.float32)  # edgellm.h: they start at -0.0
    for j in range(n_xblocks):
        b = j * ACT_BLOCK // block
        lane = lanes[..., j % Q8A_LANES]
        sd = (scales[None, :, b] * xq["d"][:, j, None]).astype(np.float32)
        lane = fma_float32(sd, isum[:, :, j], lane)
        if fmt == "int4_asym":
            lane = fma_float32(mins[None, :, b], xq["ds"][:, j, None], lane)
        lanes[..., j % Q8A_LANES] = lane
    v = lanes
    return (v[..., 0] + v[..., 1]) + (v[..., 2] + v[..., 3])
