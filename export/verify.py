"""Check a freshly written bundle against the numpy reference before it is published.

On fixed prompts the ONNX graph runs the way the runtime will run it (a prefill chunk, then
single-token steps through the KV cache) and its logits are compared with the reference forward
over the same (dequantized) weights: normalized MSE and top-1 agreement per prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.model_config import ModelConfig

from .reference import ReferenceModel

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


def nmse(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    power = float(np.mean(expected ** 2)) or 1.0
    return float(np.mean((actual.astype(np.float64) - expected) ** 2)) / power


def run_onnx_logits(session, config: ModelConfig, ids: list[int], decode_steps: int,
                    prefill_chunk: int | None = None) -> np.ndarray:
    """Logits [S, V]: all but the last `decode_steps` tokens prefilled (in chunks of
    `prefill_chunk` if given), then the rest one token at a time through the KV cache."""
    kv = (1, 0, config.num_key_value_heads, config.head_dim)
    past = {f"past_key_values.{i}.{k}": np.zeros(kv, np.float32)
            for i in range(config.num_hidden_layers) for k in ("key", "value")}
    split = max(1, len(ids) - decode_steps)
    step = prefill_chunk or split
    chunks = [ids[i:i + step] for i in range(0, split, step)] + [[t] for t in ids[split:]]
    rows, position = [], 0
    output_names = [o.name for o in session.get_outputs()]
    for chunk in chunks:
        feed = {"input_ids": np.array([chunk], np.int64),
                "position_ids": np.arange(position, position + len(chunk), dtype=np.int64)[None], **past}
        outputs = dict(zip(output_names, session.run(output_names, feed)))
        rows.append(outputs["logits"][0])
        past = {name: np.concatenate([value, outputs[f"new_key_values.{name.split('.', 1)[1]}"]], axis=1)
                for name, value in past.items()}
        position += len(chunk)
    return np.concatenate(rows)


def cpu_session(model_path: Path, threads: int | None = None):
    """An ONNX Runtime session of `model_path` on the CPU provider (ONNX Runtime's own thread count unless given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model_path: Path, config: ModelConfig, reference: ReferenceModel, encode,
                prompts=VERIFY_PROMPTS, threads: int | None = None) -> dict:
    session = cpu_session(model_path, threads)
    rows = []
    for prompt in prompts:
        ids = encode(prompt)
        expected = reference.forward(ids)
        actual = run_onnx_logits(session, config, ids, DECODE_STEPS)
        finite = bool(np.isfinite(actual).all())
        rows.append({"prompt": prompt, "tokens": len(ids), "finite": finite,
                     "nmse": nmse(actual, expected) if finite else float("inf"),
                     "top1": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
                     "max_abs": float(np.abs(actual - expected).max()) if finite else float("inf")})
    worst_nmse = max(r["nmse"] for r in rows)
    mean_top1 = float(np.mean([r["top1"] for r in rows]))
    limits = THRESHOLDS
    passed = all(r["finite"] for r in rows) and worst_nmse <= limits["max_nmse"] and mean_top1 >= limits["min_top1"]
    return {"engine": "onnxruntime-cpu", "against": "numpy reference (dequantized weights)",
            "prompts": rows, "worst_nmse": worst_nmse, "mean_top1": mean_top1,
            "thresholds": limits, "passed": passed}
