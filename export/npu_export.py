"""The `npu` export profile: static-shape QDQ graphs for the Hexagon NPU, added to a bundle.

  canonical float weights -> float prefill + decode graphs (export/npu_graph.py)
    -> calibration on shipped text through the runtime's host loop, static QDQ quantization
       (export/npu_quantize.py)
    -> both graphs' initializers written once into npu_weights.bin (shared, 64-byte aligned)
    -> verification of the quantized graphs on ONNX Runtime's CPU provider (export/npu_verify.py)
    -> the manifest's graphs["npu"] entry.
The float weights are the source's own values (dequantized if the source was quantized), not the
CPU bundle's int4 blocks: re-quantizing int4 codes to int8 channels would add both errors. The
embedding lookup runs on the host from weights.bin's table (see npu_graph.py for why).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx

from edgellm.backends.npu.host import MASK_VALUE, HostEmbedding, NpuDecoder, npu_graph_io
from edgellm.bundle.architectures import EMBED
from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.manifest import Manifest
from edgellm.bundle.weights import BundleWeights
from edgellm.errors import EdgeLLMError
from edgellm.export.canonical import CanonicalModel, as_float
from edgellm.export.graph.npu import build_npu_graph
from edgellm.export.options import NpuOptions
from edgellm.export.quant.npu import (
    INT4_BLOCK,
    SCHEMES,
    calibration_feeds,
    calibration_plan,
    calibration_summary,
    feed_count,
    quantize_graphs,
)
from edgellm.export.reference import ReferenceModel
from edgellm.export.verify.npu import cpu_sessions, verify_npu
from edgellm.export.writer import append_aligned, attach_initializers, point_to_external, write_weights

NPU_FILES = {"prefill": "model.npu.prefill.onnx", "decode": "model.npu.decode.onnx", "weights": "npu_weights.bin"}
INLINE_BYTES = 1024  # scales, zero points and shape constants stay inside the graph files


def externalize(models: dict[str, onnx.ModelProto], path: Path) -> None:
    """Move every large initializer of `models` into one file, each distinct tensor once (the
    prefill and decode graphs share their weights byte for byte), aligned as weights.bin is."""
    written: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    with open(path, "wb") as out:
        for model in models.values():
            for tensor in model.graph.initializer:
                if len(tensor.raw_data) < INLINE_BYTES:
                    continue
                digest = hashlib.sha256(tensor.raw_data).hexdigest()
                if digest not in written:
                    written[digest] = (append_aligned(out, tensor.raw_data), len(tensor.raw_data))
                tensor.ClearField("raw_data")
                point_to_external(tensor, path.name, *written[digest])


def describe_io(config, chunk: int, context: int) -> dict:
    """Each graph's inputs and outputs with their static shapes; per-layer names once, as {i}."""
    io = {}
    for role, seq in (("prefill", chunk), ("decode", 1)):
        inputs, outputs = npu_graph_io(config, seq, context)
        io[role] = {
            kind: {re.sub(r"\.\d+\.", ".{i}.", name): shape for name, shape in names.items()}
            for kind, names in (("inputs", inputs), ("outputs", outputs))
        }
    return io


def write_float_graphs(config, weights: dict, chunk: int, context: int, work: Path) -> dict[int, Path]:
    """The float prefill and decode graphs in `work`, sharing one external weights file."""
    graphs = {seq: build_npu_graph(config, weights, seq, context) for seq in (chunk, 1)}
    index = write_weights(work / "float.bin", {k: v for _, arrays in graphs.values() for k, v in arrays.items()})
    paths = {}
    for seq, (graph, arrays) in graphs.items():
        attach_initializers(graph, arrays, index, weights_file="float.bin")
        paths[seq] = work / f"float{seq}.onnx"
        paths[seq].write_bytes(graph.SerializeToString())
    return paths


def export_npu(
    model: CanonicalModel,
    bundle: Manifest,
    options: NpuOptions,
    encode: Callable[[str], list[int]],
    verify: bool,
    progress,
) -> dict:
    """Write the NPU files into the staged CPU bundle `bundle`; return its graphs["npu"] entry."""
    c, chunk, context, staging = model.config, options.chunk, options.context, bundle.root
    weights_bin = BundleWeights.of(bundle)
    float_weights = {name: as_float(t) for name, t in model.tensors.items()}
    float_weights[INV_FREQ] = weights_bin.array(INV_FREQ)  # RoPE's table as weights.bin holds it for every backend
    embed = HostEmbedding(weights_bin, bundle.matrices[f"{EMBED}.weight"])
    work = staging / ".npu-work"
    work.mkdir()
    try:
        progress("NPU: building the static graphs", 0.65)
        float_paths = write_float_graphs(c, float_weights, chunk, context, work)

        plan = calibration_plan(encode, context)
        float_sessions = cpu_sessions(float_paths)

        def feeds(seq: int):  # the float graphs run the calibration plan; graph `seq`'s inputs on the way
            return calibration_feeds(NpuDecoder(c, context, float_sessions, embed), plan, seq)

        outputs = {seq: work / f"q{seq}.onnx" for seq in float_paths}
        quantize_graphs(
            float_paths,
            outputs,
            feeds,
            {seq: feed_count(plan, chunk, seq) for seq in float_paths},
            options.quant,
            work,
            progress=lambda stage: progress(f"NPU: {stage}", 0.75),
        )
        float_sessions.clear()  # the float graphs' sessions: their memory back before the quantized ones load
        quantized = {"prefill": onnx.load(str(outputs[chunk])), "decode": onnx.load(str(outputs[1]))}
        progress("NPU: writing the graphs", 0.85)
        externalize(quantized, staging / NPU_FILES["weights"])
        for role, graph in quantized.items():
            (staging / NPU_FILES[role]).write_bytes(graph.SerializeToString())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    verification = {"skipped": True}
    if verify:
        progress("NPU: verifying the quantized graphs against the float reference", 0.88)

        reference = ReferenceModel(c, float_weights)
        paths = {chunk: staging / NPU_FILES["prefill"], 1: staging / NPU_FILES["decode"]}
        verification = verify_npu(paths, c, context, options.quant, reference, encode, embed)
        if not verification["passed"]:
            limits = verification["thresholds"]
            raise EdgeLLMError(
                f"NPU verification failed: the {options.quant} graphs vs the float reference: top-1 "
                f"{verification['mean_top1']:.3f} (min {limits['min_top1']}), KL {verification['mean_kl']:.4f} "
                f"(max {limits['max_kl']})",
                "the bundle was not written; try --npu-quant a16w8, or pass --no-verify to inspect it",
            )
    activations, weights = SCHEMES[options.quant]
    return {
        "files": dict(NPU_FILES),
        "chunk": chunk,
        "context": context,
        "io": describe_io(c, chunk, context),
        "kv_layout": "[1, kv_heads, context, head_dim] float32 on the host; "
        "the graphs return [1, kv_heads, chunk, head_dim]",
        "mask_value": float(MASK_VALUE),
        "embedding": {
            "on": "host",
            "table": f"{EMBED}.weight",
            "why": "the HTP gathers only per-tensor quantized tables",
        },
        "quantization": {
            "scheme": options.quant,
            "format": "QDQ",
            "activations": f"{activations[1:].lower()} per tensor, asymmetric",
            "weights": (
                f"{weights[1:].lower()} per output channel, symmetric"
                if options.quant == "a16w8"
                else f"{weights[1:].lower()} in blocks of {INT4_BLOCK} along the input, symmetric"
            ),
            "kept_float": "the residual stream: its adds, every RMSNorm, the MLP's product and down "
            "projection (fp16 weights); fp16 on the HTP",
            "tool": f"onnxruntime.quantization {_ort_version()} (get_qnn_qdq_config, quantize_static)",
            "calibration": calibration_summary(plan, chunk),
        },
        "verification": verification,
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
