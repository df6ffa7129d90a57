"""Static QDQ quantization of the NPU graphs with onnxruntime.quantization, calibrated on shipped text.

Activations are uint16 per tensor (asymmetric). a16w8: the matrices are int8 per output channel,
symmetric. get_qnn_qdq_config would make MatMul weights per-tensor (it assumes QNN has no
per-channel MatMul); the HTP does take per-channel weights, and one scale per matrix costs far
more accuracy, so every MatMul weight gets an explicit override. a16w4: int4 in blocks of
INT4_BLOCK along the input dimension, symmetric (quantize_static's BlockSize); on SmolLM2 that
measured top-1 0.73 against the reference where int4 per channel gave 0.58. Asymmetric (uint4)
blocks are not offered: the HTP simulator computes garbage with them (KL ~80 against the CPU
provider on the same graph). The nodes npu_graph.float_nodes names (the residual stream, its
norms, the MLP's down projection) are left unquantized: the HTP runs them in fp16.

Both graphs get the same activation ranges: MinMax over every calibration sample of either graph
(the tensors have the same names in both), widened by RANGE_MARGIN, then handed to the quantizer
as overrides. Ranges calibrated on one graph alone clip the other: the decode graph's samples
never hold the first token, whose activations are the largest, and the prefill graph's logits
never reached the confidence some decode steps have.

Calibration runs the float graphs on ONNX Runtime's CPU provider through the same host loop the
runtime uses (runtime/npu_host.py), over export/data/npu_calibration.txt: each document from
position 0 (a padded prefill chunk, then a few decode steps), and all of them as one stream that
fills the context window (prefill chunks at every offset, decode steps near its end), so the
calibrated ranges cover short and full caches, early and late positions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from edgellm.backends.npu.host import NpuDecoder
from edgellm.errors import EdgeLLMError
from edgellm.export.graph.npu import float_nodes
from edgellm.export.options import SCHEMES

CALIBRATION_FILE = Path(__file__).parent.parent / "data" / "npu_calibration.txt"  # export/data/
INT4_BLOCK = 32  # a16w4: weights per scale, along the input dimension
DOC_DECODE_STEPS = 2  # decode-graph samples at the end of each document
STREAM_DECODE_STEPS = 8  # ... and at the end of the stream that fills the context
RANGE_MARGIN = 1.25  # calibrated ranges are widened: 16 bits have precision to spare, clipping costs more
FIXED_SCALE_OPS = ("Sigmoid", "Tanh")  # QNN requires fixed output scales for these (get_qnn_qdq_config sets them)


def calibration_documents() -> list[str]:
    """The shipped sample text, one document per paragraph (several languages, code, JSON, chat)."""
    text = CALIBRATION_FILE.read_text(encoding="utf-8")
    return [doc.strip("\n") for doc in text.split("\n\n") if doc.strip()]


def calibration_plan(encode: Callable[[str], list[int]], context: int) -> list[tuple[list[int], list[int]]]:
    """Runs of (prefilled ids, then ids decoded one at a time), each from position 0."""
    docs = [encode(doc) for doc in calibration_documents()]
    plan = []
    for ids in docs:
        ids = ids[:context]
        split = max(1, len(ids) - DOC_DECODE_STEPS)
        plan.append((ids[:split], ids[split:]))
    stream = [t for ids in docs for t in ids][:context]
    split = max(1, len(stream) - STREAM_DECODE_STEPS)
    plan.append((stream[:split], stream[split:]))
    return plan


def plan_chunks(plan, chunk: int) -> Iterator[list[int]]:
    """The forward calls of the plan, in order; None starts a run over (truncate to 0)."""
    for prefill, decode in plan:
        yield None
        yield from [prefill[i : i + chunk] for i in range(0, len(prefill), chunk)]
        yield from [[t] for t in decode]


def graph_seq(n: int, chunk: int) -> int:
    return 1 if n == 1 else chunk  # a single token goes through the decode graph (NpuDecoder.prepare)


def calibration_feeds(decoder: NpuDecoder, plan, seq: int) -> Iterator[dict[str, np.ndarray]]:
    """The inputs of every run of the graph with chunk length `seq`, while the float graphs run the plan."""
    for chunk in plan_chunks(plan, decoder.chunk):
        if chunk is None:
            decoder.truncate(0)
            continue
        graph = decoder.prepare(chunk)
        if graph.seq == seq:
            yield graph.snapshot()
        graph.run()
        decoder.commit(graph)


def feed_count(plan, chunk: int, seq: int) -> int:
    return sum(1 for c in plan_chunks(plan, chunk) if c is not None and graph_seq(len(c), chunk) == seq)


def calibration_summary(plan, chunk: int) -> dict:
    return {
        "file": CALIBRATION_FILE.name,
        "sha256": hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest(),
        "documents": len(plan) - 1,
        "tokens": sum(len(p) + len(d) for p, d in plan[:-1]),
        "stream_tokens": len(plan[-1][0]) + len(plan[-1][1]),
        "prefill_samples": feed_count(plan, chunk, chunk),
        "decode_samples": feed_count(plan, chunk, 1),
        "method": "MinMax",
    }


def matmul_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers that are a quantized MatMul's B operand (the projections and the output head)."""
    initializers = {t.name for t in model.graph.initializer}
    keep_float = set(float_nodes(model))
    return sorted(
        {
            node.input[1]
            for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers and node.name not in keep_float
        }
    )


class _Feeds:
    """A CalibrationDataReader over an iterator of feeds, `count` long, consumed in strides."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]], count: int):
        self.feeds, self.count, self.taken, self.end = feeds, count, 0, count

    def __len__(self):
        return self.count

    def set_range(self, start_index: int, end_index: int):
        self.end = end_index

    def get_next(self):
        if self.taken >= self.end:
            return None
        self.taken += 1
        return next(self.feeds)


def calibrate_ranges(
    float_path: Path, feeds: Iterator[dict[str, np.ndarray]], count: int, op_types: list[str], work: Path
) -> dict[str, tuple[float, float]]:
    """tensor name -> (min, max) over the samples, one sample at a time (a whole SmolLM2 prefill's
    activations are ~1 GB, so they are folded in before the next sample runs)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        float_path,
        op_types,
        augmented_model_path=str(work / f"{float_path.stem}.aug.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
    )
    reader = _Feeds(feeds, count)
    for start in range(count):
        reader.set_range(start, start + 1)
        calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    return {
        name: tuple(float(np.asarray(v).max() if i else np.asarray(v).min()) for i, v in enumerate(data.range_value))
        for name, data in ranges.data.items()
    }


def merge_ranges(*ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    merged: dict[str, tuple[float, float]] = {}
    for table in ranges:
        for name, (low, high) in table.items():
            old = merged.get(name, (low, high))
            merged[name] = (min(old[0], low), max(old[1], high))
    return merged


def qnn_config(float_path: Path, reader, scheme: str, ranges: dict[str, tuple[float, float]] | None = None):
    """get_qnn_qdq_config for `scheme`: per-channel weights, float nodes excluded, `ranges` (widened) as overrides."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if scheme not in SCHEMES:
        raise EdgeLLMError(f"unknown NPU quantization {scheme!r}", f"choose one of {', '.join(SCHEMES)}")
    activations, weights = (getattr(QuantType, name) for name in SCHEMES[scheme])
    model = onnx.load(str(float_path), load_external_data=False)
    layout = {"axis": 1} if scheme == "a16w8" else {}  # per output channel; a16w4's blocks run along axis 0
    overrides: dict[str, list[dict]] = {
        name: [{**layout, "quant_type": weights, "symmetric": True}] for name in matmul_weights(model)
    }
    fixed = {node.output[0] for node in model.graph.node if node.op_type in FIXED_SCALE_OPS}
    for name, (low, high) in (ranges or {}).items():
        if name not in fixed:
            overrides[name] = [
                {"rmin": np.float32(min(low, 0.0) * RANGE_MARGIN), "rmax": np.float32(max(high, 0.0) * RANGE_MARGIN)}
            ]
    config = get_qnn_qdq_config(
        str(float_path),
        reader,
        activation_type=activations,
        weight_type=QuantType.QUInt8,
        init_overrides=overrides,
        nodes_to_exclude=float_nodes(model),
    )
    if scheme == "a16w4":
        if not _writes_blocked_weights():
            import onnxruntime

            raise EdgeLLMError(
                f"--npu-quant a16w4 needs blockwise int4 from onnxruntime.quantization, which "
                f"onnxruntime {onnxruntime.__version__} does not write",
                "upgrade onnxruntime, or use a16w8",
            )
        config.extra_options["BlockSize"] = INT4_BLOCK
    return config


def _writes_blocked_weights() -> bool:
    """quantize_static's QDQ quantizer reads extra_options["BlockSize"] (onnxruntime 1.32 does)."""
    import inspect

    from onnxruntime.quantization import qdq_quantizer

    try:
        return '"BlockSize"' in inspect.getsource(qdq_quantizer.QDQQuantizer.__init__)
    except (OSError, TypeError):  # no source to read: let verification judge the result
        return True


def quantize_graphs(
    float_paths: dict[int, Path],
    outputs: dict[int, Path],
    feeds,
    counts: dict[int, int],
    scheme: str,
    work: Path,
    progress=None,
) -> None:
    """float_paths[seq] -> outputs[seq]: QDQ graphs sharing one set of calibrated activation ranges.
    `feeds(seq)` returns an iterator over the calibration inputs of graph `seq` (`counts[seq]` of them)."""
    progress = progress or (lambda stage: None)
    ranges = []
    for seq, path in float_paths.items():
        progress(f"calibrating the {'decode' if seq == 1 else 'prefill'} graph on {counts[seq]} samples")
        op_types = qnn_config(path, _Feeds(iter(()), 0), scheme).op_types_to_quantize
        ranges.append(calibrate_ranges(path, feeds(seq), counts[seq], op_types, work))
    shared = merge_ranges(*ranges)
    for seq, path in float_paths.items():
        progress(f"quantizing the {'decode' if seq == 1 else 'prefill'} graph ({scheme})")
        with _quiet_root_logger():
            quantize_with_ranges(path, outputs[seq], scheme, shared, functools.partial(_one_feed, feeds, seq), work)


def _one_feed(feeds, seq: int) -> _Feeds:
    return _Feeds(feeds(seq), 1)


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static logs "please consider pre-processing" to the root logger; the graphs are built
    with static shapes and need none, and the CLI's stderr is for errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_with_ranges(
    path: Path, output: Path, scheme: str, ranges: dict[str, tuple[float, float]], one_sample, work: Path
) -> None:
    """quantize_static with every activation range given. Where quantize_static takes a calibration
    cache (onnxruntime >= 1.32) the ranges go there and it calibrates nothing; before that it runs
    its own calibration on one sample (`one_sample()`), which the range overrides then replace."""
    import inspect

    from onnxruntime.quantization import calibrate, quantize, quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        quantize(str(path), str(output), qnn_config(path, one_sample(), scheme, ranges))
        return
    config = qnn_config(path, None, scheme, ranges)
    cache = work / f"{path.stem}.ranges.json"
    calibrate.save_tensors_data(
        calibrate.TensorsData(
            calibrate.CalibrationMethod.MinMax,
            {name: (np.float32(low), np.float32(high)) for name, (low, high) in ranges.items()},
        ),
        cache,
    )
    quantize_static(
        str(path),
        str(output),
        None,
        quant_format=config.quant_format,
        op_types_to_quantize=config.op_types_to_quantize,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=config.activation_type,
        weight_type=config.weight_type,
        nodes_to_quantize=config.nodes_to_quantize,
        nodes_to_exclude=config.nodes_to_exclude,
        use_external_data_format=config.use_external_data_format,
        calibrate_method=config.calibrate_method,
        extra_options=config.extra_options,
        calibration_cache_path=cache,
    )
