"""Block formats: GGUF blocks carry over losslessly, our quantizers keep their promises, and the
stored layout means to ONNX Runtime's MatMulNBits exactly what the numpy definition says."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from edgellm.bundle.quant_formats import QUANT_FORMATS as FORMATS
from edgellm.bundle.quant_formats import unpack_codes
from edgellm.export.quant.formats import BlockQuantTensor, from_gguf_q4_0, from_gguf_q4_1, from_gguf_q8_0, quantize

RNG = np.random.default_rng(1234)


def gguf_blocks(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return quants.quantize(values, qtype)  # uint8 [rows, bytes_per_row]


@pytest.mark.parametrize(
    "qtype,reader", [(GGMLQuantizationType.Q4_0, from_gguf_q4_0), (GGMLQuantizationType.Q8_0, from_gguf_q8_0)]
)
def test_symmetric_gguf_blocks_dequantize_bit_exactly(qtype, reader):
    values = RNG.standard_normal((48, 256)).astype(np.float32)
    raw = gguf_blocks(values, qtype)
    ours = reader(raw, 48, 256)
    np.testing.assert_array_equal(ours.dequantize(), quants.dequantize(raw, qtype))


def test_q4_1_blocks_dequantize_bit_exactly():
    values = (RNG.standard_normal((64, 320)) * 0.05 + 0.01).astype(np.float32)
    raw = gguf_blocks(values, GGMLQuantizationType.Q4_1)
    ours = from_gguf_q4_1(raw, 64, 320)
    np.testing.assert_array_equal(ours.dequantize(), quants.dequantize(raw, GGMLQuantizationType.Q4_1))


def test_q4_1_block_with_zero_scale_is_represented_exactly():
    values = np.full((1, 32), 0.375, np.float32)
    raw = gguf_blocks(values, GGMLQuantizationType.Q4_1)
    ours = from_gguf_q4_1(raw, 1, 32)
    np.testing.assert_array_equal(ours.dequantize(), quants.dequantize(raw, GGMLQuantizationType.Q4_1))


def test_gguf_nibble_order_is_low_nibbles_first_then_high():
    codes = np.arange(32, dtype=np.uint8) % 16
    qs = codes[:16] | (codes[16:] << 4)
    raw = np.concatenate([np.array([1.0], np.float16).view(np.uint8), qs])[None]
    ours = from_gguf_q4_0(raw, 1, 32)
    np.testing.assert_array_equal(ours.codes[0, 0], codes)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_quantize_error_is_within_half_a_step(fmt, block):
    values = RNG.standard_normal((16, 384)).astype(np.float32)
    t = quantize(values, fmt, block)
    step = np.repeat(np.abs(t.scales), block, axis=1)[:, :384]
    # int4_sym puts the largest magnitude at code 0 (-8 steps), so the far side only reaches
    # +7 steps and a value there may be clipped by one whole step (as in GGUF Q4_0).
    allowed = step * (1.0 if fmt == "int4_sym" else 0.5) * (1 + 1e-5) + 1e-7
    assert np.all(np.abs(t.dequantize() - values) <= allowed)
    assert t.codes.max() < 2**t.bits


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_flat_blocks_and_zero_blocks_quantize_exactly(fmt):
    values = np.zeros((3, 64), np.float32)
    values[1, :32] = -0.25
    values[2] = 1.5
    t = quantize(values, fmt, 32)
    if fmt == "int4_asym":  # any constant block is exact with scale + minimum
        np.testing.assert_array_equal(t.dequantize(), values)
    else:  # symmetric formats: zero blocks exact, +-max within the float16 scale's rounding (one ulp: 2**-10)
        np.testing.assert_allclose(t.dequantize(), values, rtol=2.0**-10, atol=0)


def test_columns_not_a_multiple_of_the_block_are_padded_and_trimmed():
    values = RNG.standard_normal((5, 40)).astype(np.float32)
    t = quantize(values, "int4_asym", 32)
    assert t.n_blocks == 2 and t.dequantize().shape == (5, 40)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_packed_codes_unpack_to_the_same_codes(fmt):
    t = quantize(RNG.standard_normal((7, 64)).astype(np.float32), fmt, 32)
    np.testing.assert_array_equal(unpack_codes(t.packed_codes(), t.bits), t.codes)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows,cols,block", [(64, 128, 32), (33, 96, 32), (16, 256, 64), (48, 128, 128), (8, 80, 32)])
def test_the_onnx_matmul_lowering_computes_the_numpy_definition(fmt, rows, cols, block):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgellm.export.graph.cpu import DecoderGraphBuilder

    t = quantize(RNG.standard_normal((rows, cols)).astype(np.float32), fmt, block)
    builder = DecoderGraphBuilder(None, {"w": t})  # only its matmul lowering is used
    y = builder.make_matmul("x", "w", "/w")
    builder.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(
        builder.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, rows])],
        [numpy_helper.from_array(a, n) for n, a in builder.arrays.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((1, 3, cols)).astype(np.float32)
    expected = x.astype(np.float64) @ t.dequantize().astype(np.float64).T
    actual = session.run(None, {"x": x})[0]
    nmse = np.mean((actual - expected) ** 2) / np.mean(expected**2)
    assert nmse < 1e-10


@pytest.mark.slow  # reads every block of the real SmolLM2
def test_real_model_blocks_are_carried_over_losslessly():
    from edgellm.default_model import default_gguf_path
    from edgellm.export.sources.gguf_metadata import open_gguf

    reader = open_gguf(default_gguf_path())
    by_name = {t.name: t for t in reader.tensors}
    for name, reader_fn in (
        ("token_embd.weight", from_gguf_q8_0),
        ("blk.0.ffn_down.weight", from_gguf_q4_1),
        ("blk.29.attn_v.weight", from_gguf_q4_1),
    ):
        t = by_name[name]
        rows, cols = int(t.shape[1]), int(t.shape[0])
        ours: BlockQuantTensor = reader_fn(np.asarray(t.data), rows, cols)
        expected = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, cols)
        np.testing.assert_allclose(ours.dequantize(), expected, rtol=1e-6, atol=1e-7)
