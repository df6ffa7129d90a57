"""Resident-memory estimate, checked before a model is loaded.

What a loaded model keeps resident:
  weights   weights.bin, mapped: the native engine reads it in place (the file once); ONNX Runtime also
            prepacks its MatMulNBits weights (and folds the int8 head into 4-bit planes), so its
            backend holds about twice the file; the NPU backend holds its own npu_weights.bin as the
            graphs' initializers and two compiled QNN contexts (prefill, decode), each a copy
  kv cache  2 (K and V) x layers x context x kv_heads x head_dim x 2 bytes (native: float16) or 4
            (ONNX Runtime, NPU: float32), preallocated
  scratch   logits for one prefill chunk, the chunk's activations and attention scores
  runtime   the interpreter, ONNX Runtime and the tokenizer (measured: ~90 MB on x86-64)
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

from edgellm.bundle.format import WEIGHTS_FILE
from edgellm.bundle.manifest import Manifest
from edgellm.bundle.model_config import ModelConfig
from edgellm.errors import MemoryBudgetError
from edgellm.units import format_bytes

# resident bytes per byte of weights.bin: native maps the file once; ONNX Runtime's measured on SmolLM2.
# npu: per byte of npu_weights.bin, the peak of a load from the context cache on the x86-64 HTP
# simulator, SmolLM2 a16w8 (1.27 GB for 161 MB; a first load, which compiles, peaks ~30% higher).
WEIGHT_FACTOR = {"native": 1.0, "onnxruntime": 2.2, "npu": 7.0}
RUNTIME_OVERHEAD = 90 * 2**20
MIB = 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    scratch: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch + self.runtime

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        return (
            f"{format_bytes(self.total)} (weights {format_bytes(self.weights)}, KV cache "
            f"{format_bytes(self.kv_cache)}, scratch {format_bytes(self.scratch)}, "
            f"runtime {format_bytes(self.runtime)})"
        )


KV_BYTES = {"native": 2}  # bytes per cached value; float32 (4) elsewhere


def kv_cache_bytes(config: ModelConfig, context: int, backend: str) -> int:
    per_value = KV_BYTES.get(backend, 4)
    return 2 * config.num_hidden_layers * context * config.num_key_value_heads * config.head_dim * per_value


def scratch_bytes(config: ModelConfig, context: int, chunk: int) -> int:
    logits = chunk * config.vocab_size * 4
    activations = (
        chunk * (4 * config.hidden_size + 3 * config.intermediate_size + config.q_size + 2 * config.kv_size) * 4
    )
    scores = 2 * config.num_attention_heads * chunk * context * 4  # scores and probabilities
    keys = 2 * context * config.kv_size * 4  # the per-layer concatenated keys and values
    return logits + activations + scores + keys


def weights_bytes(manifest: Manifest, backend: str) -> int:
    """The size of the file a backend's weights come from: weights.bin, or the NPU graphs' own for the npu
    backend (when the bundle has none, the backend itself will say so)."""
    name = manifest.npu.weights_file if backend == "npu" and manifest.npu is not None else WEIGHTS_FILE
    return manifest.files[name].bytes


def estimate(manifest: Manifest, backend: str, context: int, chunk: int) -> MemoryEstimate:
    return _estimate(weights_bytes(manifest, backend), manifest.config, backend, context, chunk)


def _estimate(weights_bytes: int, config: ModelConfig, backend: str, context: int, chunk: int) -> MemoryEstimate:
    return MemoryEstimate(
        weights=int(weights_bytes * WEIGHT_FACTOR.get(backend, 1.0)),
        kv_cache=kv_cache_bytes(config, context, backend),
        scratch=scratch_bytes(config, context, min(chunk, context)),
        runtime=RUNTIME_OVERHEAD,
    )


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by a cgroup v2 limit if one is set."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def largest_context(manifest: Manifest, backend: str, chunk: int, budget: int) -> int:
    """The longest context (a multiple of 256, at least 256) whose estimate fits in `budget`, or 0."""
    return _largest_context(weights_bytes(manifest, backend), manifest.config, backend, chunk, budget)


def _largest_context(weights_bytes: int, config: ModelConfig, backend: str, chunk: int, budget: int) -> int:
    best, context = 0, 256
    while context <= config.max_position_embeddings:
        if _estimate(weights_bytes, config, backend, context, chunk).total > budget:
            break
        best, context = context, context + 256
    return best


def check_budget(manifest: Manifest, backend: str, context: int, chunk: int, max_memory: int | None) -> MemoryEstimate:
    """The estimate, or MemoryBudgetError naming a context length that would fit."""
    config, size = manifest.config, weights_bytes(manifest, backend)
    needed = _estimate(size, config, backend, context, chunk)
    limits = [(max_memory, "the --max-memory setting")] if max_memory else []
    available = available_memory()
    if available is not None:
        limits.append((available, "the memory available on this machine"))
    for budget, what in limits:
        if needed.total > budget:
            fits = _largest_context(size, config, backend, chunk, budget)
            hint = (
                f"a context of {fits} tokens fits: pass --context {fits}"
                if fits
                else "the weights alone do not fit; use a smaller model or free memory"
            )
            raise MemoryBudgetError(
                f"the model with a context of {context} tokens needs about {needed.describe()}, "
                f"more than {what} ({format_bytes(budget)})",
                hint,
            )
    return needed


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()
