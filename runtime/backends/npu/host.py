"""The host side of the static-shape NPU graphs: embedding lookup, the fixed-size KV cache, masks.

The NPU graphs (export/npu_graph.py) take fixed shapes: a prefill chunk of S tokens or a single
decode token, over a cache window of C slots. This module feeds them, whichever execution
provider runs them (QNN on the NPU, or ONNX Runtime's CPU provider when the exporter verifies):

  - the embedding rows of the tokens, dequantized from weights.bin's table on the host;
  - positions P..P+n-1 and an additive mask: cache slots < P and the chunk's causal triangle are
    visible, every other slot (unwritten or stale cache, padding) gets MASK_VALUE;
  - the cache [1, KV, C, D] per layer and K/V, bound once; after a run the valid rows of the new
    slices [1, KV, S, D] are written into it in place at P.
A short last prefill chunk is padded to S: pad rows repeat the last position, their keys are
never written to the cache and no valid row can see them (they lie in its causal future).
Every buffer is bound to its graph once (IO binding); a step rewrites their contents, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgellm.bundle.manifest import MatrixEntry
from edgellm.bundle.model_config import ModelConfig
from edgellm.bundle.quant_formats import dequantize, unpack_codes
from edgellm.errors import BundleError, ContextOverflowError, InvalidSettingError

# Added to the scores of hidden slots (the manifest's mask_value: the graphs are calibrated with it).
# Not -inf: the mask and the masked scores are quantized to 16 bits over their calibrated range, so a
# huge value would leave the visible scores a coarse grid. exp(-100) underflows to 0 like -inf would.
MASK_VALUE = np.float32(-100.0)


class HostEmbedding:
    """Rows of the bundle's block-quantized embedding table (weights.bin), dequantized on demand."""

    def __init__(self, weights, matrix: MatrixEntry):
        self.format, self.bits, self.cols = matrix.format, matrix.bits, matrix.cols
        self.codes = weights.array(matrix.qweight)  # uint8 [V, n_blocks, block*bits/8]
        self.scales = weights.array(matrix.scales)  # float16 [V, n_blocks]
        self.mins = weights.array(matrix.mins) if matrix.mins is not None else None

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, E] for token ids [n]."""
        if ids.min() < 0 or ids.max() >= len(self.codes):
            raise InvalidSettingError(
                f"token ids must be 0..{len(self.codes) - 1} (the vocabulary), got "
                f"{int(ids.min() if ids.min() < 0 else ids.max())}"
            )
        codes = unpack_codes(np.asarray(self.codes[ids]), self.bits)  # [n, nb, block]
        mins = self.mins[ids] if self.mins is not None else None
        return dequantize(self.format, codes, self.scales[ids], mins, self.cols)


class StaticGraph:
    """One static graph (prefill or decode) with every input and output bound to a host buffer."""

    def __init__(self, session, config: ModelConfig, seq: int, context: int, cache: dict[str, np.ndarray]):
        c = config
        self.session, self.seq = session, seq
        self.valid = 0  # rows of the current chunk that are real tokens (the rest is padding)
        self.embeds = np.zeros((1, seq, c.hidden_size), np.float32)
        self.positions = np.zeros((1, seq), np.int32)
        self.mask = np.full((1, seq, context + seq), MASK_VALUE, np.float32)
        self.logits = np.zeros((1, seq, c.vocab_size), np.float32)
        self.new_kv = {name: np.zeros((1, c.num_key_value_heads, seq, c.head_dim), np.float32) for name in cache}
        self.inputs: dict[str, np.ndarray] = {
            "inputs_embeds": self.embeds,
            "position_ids": self.positions,
            "attention_mask": self.mask,
            **{f"past_key_values.{n}": buf for n, buf in cache.items()},
        }
        self.outputs: dict[str, np.ndarray] = {
            "logits": self.logits,
            **{f"new_key_values.{n}": buf for n, buf in self.new_kv.items()},
        }
        self.binding = session.io_binding()
        for name, array in self.inputs.items():
            self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in self.outputs.items():
            self.binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the current inputs (calibration data for the quantizer)."""
        return {name: array.copy() for name, array in self.inputs.items()}


def npu_graph_io(config: ModelConfig, seq: int, context: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(inputs, outputs): name -> static shape, in graph order. The exporter builds the graphs to this
    table and this host checks a loaded session against it, so it lives here, where the runtime can read it."""
    c = config
    kv, kv_new = [1, c.num_key_value_heads, context, c.head_dim], [1, c.num_key_value_heads, seq, c.head_dim]
    inputs = {
        "inputs_embeds": [1, seq, c.hidden_size],
        "position_ids": [1, seq],
        "attention_mask": [1, seq, context + seq],
    }
    outputs = {"logits": [1, seq, c.vocab_size]}
    for i in range(c.num_hidden_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = kv
            outputs[f"new_key_values.{i}.{kind}"] = kv_new
    return inputs, outputs


def check_graph_io(session, config: ModelConfig, seq: int, context: int, what: str) -> None:
    """The session's inputs and outputs are the static ones this host feeds; else BundleError."""
    inputs, outputs = npu_graph_io(config, seq, context)
    expected = {**inputs, **outputs}
    found = {arg.name: list(arg.shape) for arg in [*session.get_inputs(), *session.get_outputs()]}
    if found != expected:
        wrong = sorted(name for name in set(found) | set(expected) if found.get(name) != expected.get(name))
        raise BundleError(
            f"{what}: its inputs/outputs are not the static ones the NPU host feeds "
            f"(first mismatch: {wrong[0]}: {found.get(wrong[0])} vs {expected.get(wrong[0])})",
            "the NPU graphs are damaged or from another model; export the bundle again",
        )


class NpuDecoder:
    """The fixed-size KV cache on the host and the two static graphs that read it."""

    def __init__(
        self, config: ModelConfig, context: int, sessions: dict[int, Any], embed: Callable[[np.ndarray], np.ndarray]
    ):
        """`sessions`: chunk length -> ONNX Runtime session (the prefill chunk and 1 for decode)."""
        c = config
        self.config, self.context, self.embed = config, context, embed
        self.chunk = max(sessions)
        self.position = 0
        self.cache = {
            f"{i}.{kind}": np.zeros((1, c.num_key_value_heads, context, c.head_dim), np.float32)
            for i in range(c.num_hidden_layers)
            for kind in ("key", "value")
        }  # [1, KV, C, D]
        self.graphs = {seq: StaticGraph(session, config, seq, context, self.cache) for seq, session in sessions.items()}

    def prepare(self, token_ids: Sequence[int]) -> StaticGraph:
        """Fill the inputs of the graph that takes these n <= chunk tokens at `position`."""
        n, p = len(token_ids), self.position
        if not 1 <= n <= self.chunk:
            raise ValueError(f"a chunk holds 1..{self.chunk} tokens, got {n}")
        if p + n > self.context:
            raise ContextOverflowError(
                f"{p + n} tokens do not fit in the NPU graphs' fixed context of {self.context}",
                "shorten the prompt, or export with a larger --npu-context",
            )
        graph = self.graphs[1] if n == 1 and 1 in self.graphs else self.graphs[self.chunk]
        s, c = graph.seq, self.context
        graph.valid = n
        graph.embeds[0, :n] = self.embed(np.asarray(token_ids, np.int64))
        graph.embeds[0, n:] = 0
        graph.positions[0] = np.minimum(np.arange(p, p + s), p + n - 1)  # pad rows repeat the last position
        graph.mask.fill(MASK_VALUE)
        graph.mask[0, :, :p] = 0  # the cache so far
        graph.mask[0, :, c:][np.tril(np.ones((s, s), bool))] = 0  # the chunk itself, causally
        return graph

    def commit(self, graph: StaticGraph) -> np.ndarray:
        """After `graph` ran: its valid new keys and values into the cache at `position`; their logits [n, V],
        a view of the graph's output buffer that the graph's next run overwrites (callers copy what they keep)."""
        n, p = graph.valid, self.position
        for name, buffer in self.cache.items():
            buffer[:, :, p : p + n] = graph.new_kv[name][:, :, :n]
        self.position = p + n
        return graph.logits[0, :n]

    def forward_chunk(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [n, V] of n <= chunk tokens at `position` (a view, as commit's); their keys and values
        join the cache."""
        graph = self.prepare(token_ids)
        graph.run()
        return self.commit(graph)

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [len, V]: the tokens in chunks (the last one padded), decode graph for single tokens."""
        rows = [self.forward_chunk(token_ids[i : i + self.chunk]).copy() for i in range(0, len(token_ids), self.chunk)]
        return np.concatenate(rows)

    def truncate(self, position: int) -> None:
        """Forget positions >= `position`: the mask hides them, so the buffers need no clearing."""
        self.position = position
