"""Check the quantized NPU graphs against the float reference before the bundle is published.

The graphs run on ONNX Runtime's CPU provider through the runtime's own host loop
(runtime/npu_host.py: host embedding, padded prefill chunks, the decode graph, the fixed KV
cache), teacher-forced over fixed prompts, and are compared with the numpy reference forward
over the source's float weights: top-1 agreement and KL(reference || NPU) per prompt. Unlike
the CPU graph (fp32 over the same weights), these graphs compute in 16-bit integer activations
over 8- or 4-bit weights, so the limits measure quantization, not summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgellm.backends.npu.host import NpuDecoder
from edgellm.bundle.model_config import ModelConfig
from edgellm.export.reference import ReferenceModel
from edgellm.export.verify.cpu import DECODE_STEPS, VERIFY_PROMPTS, cpu_session
from edgellm.export.verify.numerics import kl_divergence, top1

# A prompt longer than one prefill chunk, so chunks at positions > 0 and the padded last chunk are checked.
LONG_PROMPT = (
    "Rivers shape the land they cross. Over thousands of years, water carries sand and stones from the "
    "mountains to the sea, cutting valleys, building deltas and leaving fertile plains where farmers "
    "settle. Towns grow at the places where a river can be crossed, and bridges, mills and harbours "
    "follow. When the climate changes, rivers change their course, and old channels become lakes, marshes "
    "or dry beds that still show on maps long after the water has gone elsewhere."
)
NPU_PROMPTS = VERIFY_PROMPTS + (LONG_PROMPT,)
# An export fails beyond these. Measured, a16w8: SmolLM2 top-1 0.977 and KL 0.0065, a tiny random
# llama 0.935 and 0.0002 (its logits are nearly flat, so top-1 flips on noise). a16w4 costs a 135M
# model a lot (SmolLM2: top-1 0.73, KL 0.43; tiny random: 0.56, 0.027): its limits catch a broken
# export, not a lossy one; a16w8 is the default for that reason.
THRESHOLDS = {"a16w8": {"min_top1": 0.85, "max_kl": 0.1}, "a16w4": {"min_top1": 0.4, "max_kl": 0.75}}


def teacher_forced_logits(decoder: NpuDecoder, ids: Sequence[int], decode_steps: int) -> np.ndarray:
    """Logits [S, V]: all but the last `decode_steps` tokens through the prefill graph (in chunks, the
    last one padded), the rest one at a time through the decode graph, from position 0."""
    decoder.truncate(0)
    split = max(1, len(ids) - decode_steps)
    rows = [decoder.forward(list(ids[:split]))] + [decoder.forward([t]) for t in ids[split:]]
    return np.concatenate(rows)


def cpu_sessions(paths: dict[int, Path], threads: int | None = None) -> dict:
    """chunk length -> an ONNX Runtime CPU session of that NPU graph."""
    return {seq: cpu_session(path, threads) for seq, path in paths.items()}


def verify_npu(
    paths: dict[int, Path],
    config: ModelConfig,
    context: int,
    scheme: str,
    reference: ReferenceModel,
    encode: Callable[[str], list[int]],
    embed,
    prompts=NPU_PROMPTS,
) -> dict:
    decoder = NpuDecoder(config, context, cpu_sessions(paths), embed)
    rows = []
    for prompt in prompts:
        ids = encode(prompt)[:context]
        expected = reference.forward(ids)
        actual = teacher_forced_logits(decoder, ids, DECODE_STEPS)
        finite = bool(np.isfinite(actual).all())
        rows.append(
            {
                "prompt": prompt,
                "tokens": len(ids),
                "finite": finite,
                "top1": top1(actual, expected),
                "kl": float(kl_divergence(expected, actual).mean()) if finite else float("inf"),
            }
        )
    mean_top1 = float(np.mean([r["top1"] for r in rows]))
    mean_kl = float(np.mean([r["kl"] for r in rows]))
    limits = THRESHOLDS[scheme]
    passed = all(r["finite"] for r in rows) and mean_top1 >= limits["min_top1"] and mean_kl <= limits["max_kl"]
    return {
        "engine": "onnxruntime-cpu (the NPU graphs, QDQ)",
        "against": "numpy reference (source float weights)",
        "prompts": rows,
        "mean_top1": mean_top1,
        "mean_kl": mean_kl,
        "thresholds": limits,
        "passed": passed,
    }
