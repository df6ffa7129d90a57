"""ONNX Runtime backend: runs model.onnx with the KV cache in preallocated buffers.

The graph reads the cache so far (past_key_values.{i}.*, [1, P, KV, D]) and writes only the new
slice (new_key_values.{i}.*, [1, S, KV, D]). With IO binding both are views of one buffer per
layer and tensor, [1, context, KV, D]: the past is buffer[:, :P], the new slice is bound to
buffer[:, P:P+S], so ONNX Runtime writes the cache in place and nothing is reallocated per token.
Logits go to a preallocated [1, prefill_chunk, V] buffer the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgellm.backends.base import Backend
from edgellm.bundle.manifest import Manifest
from edgellm.errors import BundleError, InvalidSettingError
from edgellm.settings import RuntimeSettings


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, settings: RuntimeSettings, context_length: int):
        import onnxruntime as ort

        self.config = manifest.config
        self.context_length = context_length
        self.prefill_chunk = min(settings.prefill_chunk, context_length)
        self.position = 0
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.thread_count
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers, provider_options = self._providers(settings, ort.get_available_providers())
        graph = manifest.path(manifest.cpu_graph)  # checked: a regular file inside the bundle, its hash matched
        try:
            self.session = ort.InferenceSession(
                str(graph), options, providers=providers, provider_options=provider_options
            )
        except Exception as exc:  # ORT raises its own types for a bad or mismatched graph
            raise BundleError(
                f"{graph}: ONNX Runtime cannot load it ({exc})",
                "the bundle is damaged or from an incompatible exporter; export it again",
            ) from None
        c = self.config
        cache_shape = (1, context_length, c.num_key_value_heads, c.head_dim)  # [1, T, KV, D]
        self.cache = {
            f"{i}.{kind}": np.zeros(cache_shape, np.float32)
            for i in range(c.num_hidden_layers)
            for kind in ("key", "value")
        }
        self.logits = np.zeros((1, self.prefill_chunk, c.vocab_size), np.float32)  # [1, chunk, V]
        self.row_bytes = c.num_key_value_heads * c.head_dim * 4  # one position of one layer's K or V
        self.binding = self.session.io_binding()

    @staticmethod
    def _providers(settings: RuntimeSettings, available: list[str]) -> tuple[list[str], list[dict]]:
        """The providers to ask for, with their options. Ones this ONNX Runtime lacks are an error when
        the user named them, and skipped when they are a board profile's wish list (CUDA on a Jetson
        whose onnxruntime is the CPU build)."""
        options = list(settings.provider_options) or [{} for _ in settings.providers]
        chosen = [(p, o) for p, o in zip(settings.providers, options, strict=False) if p in available]
        missing = [p for p in settings.providers if p not in available]
        if missing and not (settings.optional_providers and chosen):
            raise InvalidSettingError(
                f"ONNX Runtime execution provider(s) {', '.join(missing)} not available",
                f"available here: {', '.join(available)}",
            )
        return [p for p, _ in chosen], [o for _, o in chosen]

    def _forward_chunk(self, token_ids: Sequence[int], all_logits: bool) -> np.ndarray:
        s, p = len(token_ids), self.position
        c = self.config
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        ids = np.asarray(token_ids, np.int64).reshape(1, s)
        positions = np.arange(p, p + s, dtype=np.int64).reshape(1, s)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions)
        for name, buffer in self.cache.items():
            base = buffer.ctypes.data
            binding.bind_input(
                f"past_key_values.{name}", "cpu", 0, np.float32, [1, p, c.num_key_value_heads, c.head_dim], base
            )
            binding.bind_output(
                f"new_key_values.{name}",
                "cpu",
                0,
                np.float32,
                [1, s, c.num_key_value_heads, c.head_dim],
                base + p * self.row_bytes,
            )
        binding.bind_output("logits", "cpu", 0, np.float32, [1, s, c.vocab_size], self.logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.position = p + s
        return self.logits[0, :s].copy() if all_logits else self.logits[0, s - 1].copy()

    def close(self) -> None:
        self.session = None
        self.cache = {}

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "context_length": self.context_length,
            "providers": self.session.get_providers() if self.session else [],
            "threads": self.session.get_session_options().intra_op_num_threads if self.session else 0,
        }
