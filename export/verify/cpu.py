"""Check a freshly written bundle against the numpy reference before it is published.

On fixed prompts the bundle runs on the runtime's own ONNX Runtime backend, exactly as `edgellm run
--backend onnxruntime` would run it (its manifest read and checked, a prefill chunk, then single-token
steps through the preallocated KV cache), and its logits are compared with the reference forward over
the same (dequantized) weights: normalized MSE and top-1 agreement per prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgellm.backends.onnxruntime import OnnxRuntimeBackend
from edgellm.bundle.manifest import Manifest
from edgellm.export.graph.cpu import TRACE_KEY
from edgellm.export.reference import ReferenceModel
from edgellm.export.verify.numerics import first_divergence, nmse, top1
from edgellm.settings import DEFAULT_PREFILL_CHUNK, RuntimeSettings

VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    '{"name": "edgellm", "tags": ["onnx", "arm"], "size": 135}',
    "Once upon a time, in a small village by the sea, there lived",
)
DECODE_STEPS = 4  # the last tokens of each prompt go through the single-token decode path

# An export fails when ONNX Runtime strays further than this from the reference. The graph
# computes in fp32 over the same dequantized weights, so only summation order differs (~1e-11).
THRESHOLDS = {"max_nmse": 1e-6, "min_top1": 0.98}


def cpu_session(model: Path | bytes, threads: int | None = None):
    """An ONNX Runtime session of `model` (a path, or a serialized graph) on the CPU provider (ONNX Runtime's
    own thread count unless given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )


def onnxruntime_backend(
    manifest: Manifest, context: int, threads: int = 0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
) -> OnnxRuntimeBackend:
    """The runtime's ONNX Runtime backend over a checked bundle, with a context of `context` tokens."""
    settings = RuntimeSettings(
        backend="onnxruntime", threads=threads, context_length=context, prefill_chunk=prefill_chunk
    )
    return OnnxRuntimeBackend(manifest, settings, min(context, manifest.config.max_position_embeddings))


def verify_bundle(
    manifest: Manifest, reference: ReferenceModel, encode, prompts=VERIFY_PROMPTS, threads: int = 0
) -> dict:
    """The verification report of `manifest`'s bundle against `reference`, on the ONNX Runtime backend."""
    encoded = [(prompt, encode(prompt)) for prompt in prompts]
    backend = onnxruntime_backend(manifest, max(len(ids) for _, ids in encoded), threads)
    rows = []
    try:
        for prompt, ids in encoded:
            expected = reference.forward(ids)
            actual = backend.score(ids, DECODE_STEPS)
            finite = bool(np.isfinite(actual).all())
            rows.append(
                {
                    "prompt": prompt,
                    "tokens": len(ids),
                    "finite": finite,
                    "nmse": nmse(actual, expected) if finite else float("inf"),
                    "top1": top1(actual, expected),
                    "max_abs": float(np.abs(actual - expected).max()) if finite else float("inf"),
                }
            )
    finally:
        backend.close()
    worst_nmse = max(r["nmse"] for r in rows)
    mean_top1 = float(np.mean([r["top1"] for r in rows]))
    limits = THRESHOLDS
    passed = all(r["finite"] for r in rows) and worst_nmse <= limits["max_nmse"] and mean_top1 >= limits["min_top1"]
    report = {
        "engine": "onnxruntime-cpu",
        "against": "numpy reference (dequantized weights)",
        "prompts": rows,
        "worst_nmse": worst_nmse,
        "mean_top1": mean_top1,
        "thresholds": limits,
        "passed": passed,
    }
    if not passed:  # say where: the worst prompt's intermediates, the graph's against the reference's
        _, ids = encoded[max(range(len(rows)), key=lambda i: rows[i]["nmse"])]
        reference.forward(ids, trace=(expected := {}))
        report["first_divergence"] = first_divergence(expected, onnx_trace(manifest, ids), limits["max_nmse"])
    return report


def onnx_trace(manifest: Manifest, token_ids: list[int]) -> dict[str, np.ndarray]:
    """The graph's intermediates for one prefill of `token_ids`, named as the reference's trace
    (`ReferenceModel.forward(trace=...)`): the builder records where each lives (TRACE_KEY), and a copy
    of the graph, weights inline, exposes them as outputs. For a failed parity check to say where the
    graph strayed (a diagnosis for models under ONNX's 2 GB limit on one serialized graph)."""
    import onnx

    model = onnx.load(str(manifest.path(manifest.cpu_graph)))  # with its external data, read from the bundle
    points = json.loads({p.key: p.value for p in model.metadata_props}.get(TRACE_KEY, "{}"))
    model.graph.output.extend(onnx.ValueInfoProto(name=value) for value in points.values())
    c = manifest.config
    feed = {
        "input_ids": np.array([token_ids], np.int64),
        "position_ids": np.arange(len(token_ids), dtype=np.int64)[None],
    }
    for i in range(c.num_hidden_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, 0, c.num_key_value_heads, c.head_dim), np.float32)
    values = cpu_session(model.SerializeToString()).run(list(points.values()), feed)
    return {name: value[0] for name, value in zip(points, values, strict=True)}
