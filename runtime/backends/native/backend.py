"""The native backend: the C decoder (native/src/engine.c) over the memory-mapped weights.bin.

Loading is a map, not a copy: the engine reads every matrix where the exporter wrote it, so the
resident set grows only by the pages a forward touches (the weights once, shared with the page
cache). C code reads through raw pointers, so it relies on the manifest's checks (manifest.py:
every tensor inside weights.bin, with the dtype and shape the model needs); this backend adds
what only the native kernels ask for, before any C code sees a pointer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgellm.backends.base import Backend
from edgellm.backends.native import ffi as native
from edgellm.bundle.architectures import EMBED, FINAL_NORM, LM_HEAD, layer_bias, layer_weight
from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.manifest import Manifest, MatrixEntry
from edgellm.bundle.weights import BundleWeights
from edgellm.errors import BundleError
from edgellm.settings import RuntimeSettings

_HINT_OTHER_BACKEND = "run it with --backend onnxruntime, or export it again with --block 32"


def check_native_matrices(manifest: Manifest) -> None:
    """The native kernels run every matrix's format and block size; else BundleError naming the matrix."""
    for m in manifest.matrices.values():
        if m.format not in native.FORMATS:
            raise BundleError(
                f"{manifest.source}: matrix {m.name}: format {m.format!r} is not one the native engine "
                f"runs ({', '.join(native.FORMATS)})",
                _HINT_OTHER_BACKEND,
            )
        if m.block not in native.BLOCK_SIZES:
            raise BundleError(
                f"{manifest.source}: matrix {m.name}: blocks of {m.block} values; the native engine "
                f"runs blocks of {', '.join(map(str, native.BLOCK_SIZES))}",
                _HINT_OTHER_BACKEND,
            )


class NativeBackend(Backend):
    name = "native"

    def __init__(self, manifest: Manifest, settings: RuntimeSettings, context_length: int):
        self.config = c = manifest.config
        check_native_matrices(manifest)
        self.context_length = context_length
        self.prefill_chunk = min(settings.prefill_chunk, context_length)
        self.position = 0
        self.weights = BundleWeights.of(manifest)  # np.memmap: views below point into the mapping

        def matrix(name: str) -> native.QMatrix:
            m: MatrixEntry = manifest.matrices[name]
            mins = self.weights.array(m.mins) if m.mins is not None else None
            return native.QMatrix(
                m.format, m.rows, m.cols, self.weights.array(m.qweight), self.weights.array(m.scales), mins, m.block
            )

        def tensor(name: str) -> np.ndarray:
            return self.weights.array(name)

        def bias(i: int, role: str) -> np.ndarray | None:
            return tensor(layer_bias(i, role)) if c.attention_bias else None

        layers = [
            native.DecoderLayer(
                attn_norm=tensor(layer_weight(i, "attn_norm")),
                q=matrix(layer_weight(i, "q_proj")),
                k=matrix(layer_weight(i, "k_proj")),
                v=matrix(layer_weight(i, "v_proj")),
                o=matrix(layer_weight(i, "o_proj")),
                mlp_norm=tensor(layer_weight(i, "mlp_norm")),
                gate=matrix(layer_weight(i, "gate_proj")),
                up=matrix(layer_weight(i, "up_proj")),
                down=matrix(layer_weight(i, "down_proj")),
                q_bias=bias(i, "q_proj"),
                k_bias=bias(i, "k_proj"),
                v_bias=bias(i, "v_proj"),
            )
            for i in range(c.num_hidden_layers)
        ]
        embed = matrix(f"{EMBED}.weight")
        weights = native.DecoderWeights(
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            vocab=c.vocab_size,
            rms_eps=float(c.rms_norm_eps),
            embed=embed,
            head=embed if c.tie_word_embeddings else matrix(f"{LM_HEAD}.weight"),
            final_norm=tensor(f"{FINAL_NORM}.weight"),
            inv_freq=tensor(INV_FREQ),
            layers=layers,
        )
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

    def trace(self, token_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The residual stream of one prefill of `token_ids` (at most a prefill chunk) from an empty cache,
        after each layer's attention and MLP, named as the reference's trace ("{layer}.attn_residual",
        "{layer}.out"): for a failed parity check to name the layer where the engine strayed."""
        c = self.config
        buffer = np.zeros((c.num_hidden_layers, 2, len(token_ids), c.hidden_size), np.float32)
        self.reset()
        self.engine.trace(buffer)
        try:
            self.engine.forward(token_ids, 0, self.logits)
        finally:
            self.engine.trace(None)
            self.reset()
        return {
            f"{i}.{name}": buffer[i, which]
            for i in range(c.num_hidden_layers)
            for which, name in enumerate(("attn_residual", "out"))
        }

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()  # before the pool it runs on and the mapping it reads
            self.engine = None
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None
        self.weights = None

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "context_length": self.context_length,
            "prefill_chunk": self.prefill_chunk,
            "kernel_variant": self.kernel_variant,
            "activation_bits": self.engine.activation_bits if self.engine else 0,
            "threads": self.pool.n_threads if self.pool else 0,
        }
