"""Native kernels (native/, through edgellm.backends.native.ffi): the C reference equals the numpy definitions
bit for bit, every SIMD variant this CPU runs equals the C reference bit for bit on the integer
paths (for any thread count, on sizes that hit every SIMD tail), float kernels agree with the
numpy reference forward to a normalized MSE of 1e-10, and NaN never turns into a finite value.

Skipped when the extension was not built (no compiler or no cffi at install), unless
EDGELLM_REQUIRE_NATIVE=1, which makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_without_native  # noqa: E402

from edgellm.backends.native import ffi as native
from edgellm.errors import EdgeLLMError
from edgellm.export import reference
from edgellm.export.quant.formats import quantize
from edgellm.export.verify.numerics import nmse

skip_without_native(module=True)

RNG = np.random.default_rng(20261122)
COLS = (32, 64, 96, 100, 288, 576, 1536 + 32)  # one, two, three blocks, a partial block, 9, 18, 49
ROWS = (1, 3, 17, 64, 577)
THREADS = (1, 2, 3)
FORMATS = ("int4_asym", "int4_sym", "int8_sym")
VARIANTS = native.available_variants()
NMSE_FLOAT = 1e-10


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal bit patterns, except that any NaN equals any NaN."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), f"{what}: NaN at different places"
    bits_got, bits_want = got.view(np.uint32)[~nan_got], want.view(np.uint32)[~nan_want]
    bad = np.flatnonzero(bits_got != bits_want)
    assert bad.size == 0, (
        f"{what}: {bad.size} values differ, first at {bad[0]}: {got[~nan_got][bad[0]]!r} != {want[~nan_want][bad[0]]!r}"
    )


def assert_same_blocks(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert_same_bits(got["d"], want["d"], f"{what} d")
    np.testing.assert_array_equal(got["sum"], want["sum"], err_msg=f"{what} sum")
    np.testing.assert_array_equal(got["qh"], want["qh"], err_msg=f"{what} qh")
    np.testing.assert_array_equal(got["ql"], want["ql"], err_msg=f"{what} ql")


def corner_case_activations() -> np.ndarray:
    """Ties at .5 (amax 127 makes d = 1), a zero block, a subnormal, NaN and inf, a partial block."""
    x = RNG.standard_normal(32 * 6 + 7).astype(np.float32)
    x[:7] = [127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -1.5]
    x[32:64] = 0
    x[64:96] = 0
    x[70] = 1e-40
    x[100] = np.nan
    x[140] = np.inf
    return x


def random_matrix(fmt: str, rows: int, cols: int, block: int = 32):
    """(quant_formats' BlockQuantTensor, the same matrix as a native.QMatrix)."""
    tensor = quantize((RNG.standard_normal((rows, cols)) * 0.05).astype(np.float32), fmt, block)
    return tensor, native.QMatrix(fmt, rows, cols, tensor.packed_codes(), tensor.scales, tensor.mins, block)


def numpy_matvec(tensor, xq: np.ndarray) -> np.ndarray:
    return native.matvec_numpy(tensor.format, tensor.codes, tensor.scales, tensor.mins, tensor.cols, xq)


# ---- activation quantization --------------------------------------------------------------------


def test_the_extension_reports_its_abi_version_and_a_variant_this_cpu_runs():
    header = (Path(__file__).resolve().parents[1] / "native" / "edgellm.h").read_text()
    assert f"#define EL_ABI_VERSION {native.ABI_VERSION}\n" in header  # the Python side reads what the C side writes
    assert native._load()[1].el_abi_version() == native.ABI_VERSION
    assert VARIANTS[0] == "ref"
    assert native.kernel_variant() in VARIANTS
    if os.environ.get("EDGELLM_KERNELS"):
        assert native.kernel_variant() == os.environ["EDGELLM_KERNELS"]
    else:
        assert native.kernel_variant() == VARIANTS[-1]


def test_the_c_reference_quantizes_activations_exactly_like_the_numpy_definition():
    x = np.concatenate([corner_case_activations(), (RNG.standard_normal(1000) * 3).astype(np.float32)])
    x[300:400:3] = np.round(x[300:400:3] * 4) / 2  # many exact halves
    with native.using_variant("ref"):
        got = native.quantize_activations(x)
    want = native.quantize_activations_numpy(x)
    assert_same_blocks(got, want, "ref vs numpy")
    assert list(got[0]["qh"][:7]) == [127, 3, -3, 1, -1, 127, -2]  # half away from zero
    assert got[0]["d"] == np.float32(1 / 256)  # amax 127: the coarse scale is 1
    assert list(got[0]["ql"][:7]) == [0, -127, 127, -127, 127, -127, 127]  # the remainders -+128/256 clamp
    assert got[1]["d"] == 0 and got[1]["sum"] == 0
    assert np.isnan(got[3]["d"]) and np.isnan(got[4]["d"]) and got[3]["sum"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_quantizes_activations_bit_for_bit_like_the_reference(variant):
    for n in (*COLS, 7, 33, 1000):
        x = (RNG.standard_normal((3, n)) * 2).astype(np.float32)
        x[:, ::5] = np.round(x[:, ::5] * 8) / 2
        with native.using_variant(variant):
            got = native.quantize_activations(x)
        assert_same_blocks(got, native.quantize_activations_numpy(x), f"{variant} n={n}")
    corners = corner_case_activations()
    with native.using_variant(variant):
        got = native.quantize_activations(corners)
    assert_same_blocks(got, native.quantize_activations_numpy(corners), f"{variant} corners")


# ---- quantized products ----------------------------------------------------------------------


@pytest.mark.parametrize("block", (32, 64, 128))
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_c_reference_matvec_equals_the_numpy_definition_over_quant_formats_codes(fmt, block):
    for cols in (32, 100, 288, 1568):
        tensor, w = random_matrix(fmt, 17, cols, block)
        x = RNG.standard_normal(cols).astype(np.float32)
        xq = native.quantize_activations_numpy(x)
        with native.using_variant("ref"):
            got = native.matvec(w, xq)
        assert_same_bits(got, numpy_matvec(tensor, xq), f"{fmt} block {block} cols {cols}")
        # and it is the product of the dequantized weights and the dequantized activations
        x_hat = (xq["d"][:, None] * native.activation_values(xq).astype(np.float32)).reshape(-1)[:cols]
        exact = tensor.dequantize().astype(np.float64) @ x_hat.astype(np.float64)
        assert nmse(got, exact) < 1e-10


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_variant_matvec_and_matmul_equal_the_reference_bit_for_bit_for_any_thread_count(fmt):
    pools = [native.ThreadPool(n) for n in THREADS]
    try:
        for cols in COLS:
            for rows in ROWS:
                tensor, w = random_matrix(fmt, rows, cols)
                xq = native.quantize_activations_numpy(RNG.standard_normal((5, cols)).astype(np.float32))
                want = np.stack([numpy_matvec(tensor, xq[t]) for t in range(5)])  # [tokens, rows]
                for variant in VARIANTS:
                    with native.using_variant(variant):
                        for pool in pools:
                            what = f"{variant} {fmt} rows {rows} cols {cols} threads {pool.n_threads}"
                            assert_same_bits(native.matvec(w, xq[0], pool=pool), want[0], f"matvec {what}")
                            for tokens in (2, 5):  # SMMLA takes tokens in pairs: 5 leaves one alone
                                got = native.matmul(w, xq[:tokens], pool=pool)
                                assert_same_bits(got, want[:tokens], f"matmul {tokens} tokens {what}")
    finally:
        for pool in pools:
            pool.close()


@pytest.mark.parametrize("fmt,block", [("int4_asym", 64), ("int4_sym", 128), ("int8_sym", 64)])
def test_larger_weight_blocks_give_the_same_bits_in_every_variant(fmt, block):
    tensor, w = random_matrix(fmt, 33, 576, block)
    xq = native.quantize_activations_numpy(RNG.standard_normal((3, 576)).astype(np.float32))
    want = np.stack([numpy_matvec(tensor, xq[t]) for t in range(3)])
    for variant in VARIANTS:
        with native.using_variant(variant):
            assert_same_bits(native.matmul(w, xq), want, f"{variant} {fmt} block {block}")


@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf))
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_nan_or_infinity_in_the_activations_makes_every_output_nan(variant, bad):
    x = RNG.standard_normal((2, 288)).astype(np.float32)
    x[:, 200] = bad
    with native.using_variant(variant):
        xq = native.quantize_activations(x)
        for fmt in FORMATS:
            _, w = random_matrix(fmt, 17, 288)
            assert np.isnan(native.matvec(w, xq[0])).all(), f"{variant} {fmt} matvec"
            assert np.isnan(native.matmul(w, xq)).all(), f"{variant} {fmt} matmul"


# ---- float kernels ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_kernels_of_every_variant_match_the_numpy_reference_within_nmse_1e_10(variant):
    with native.using_variant(variant):
        for n in (1, 7, 64, 576, 1000):
            x = (RNG.standard_normal((3, n)) * 4).astype(np.float32)
            weight = RNG.standard_normal(n).astype(np.float32)
            gate, up = RNG.standard_normal((2, n)).astype(np.float32) * 3
            assert nmse(native.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)) <= NMSE_FLOAT
            assert nmse(native.softmax(x), reference.softmax(x)) <= NMSE_FLOAT
            assert nmse(native.silu_mul(gate, up), reference.silu(gate) * up) <= NMSE_FLOAT
            assert_same_bits(native.add(gate, up), gate + up, "add")
        for heads, head_dim, position in ((9, 64, 37), (3, 6, 5), (1, 2, 0)):
            x = RNG.standard_normal((heads, head_dim)).astype(np.float32)
            inv_freq = (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
            cos, sin = native.rope_tables(inv_freq, position)
            want = reference.rope(x[None], np.array([position]), inv_freq)[0]
            assert nmse(native.rope(x, cos, sin), want) <= NMSE_FLOAT


def test_float_kernels_work_in_place():
    x = RNG.standard_normal((2, 100)).astype(np.float32)
    want = native.softmax(x)
    native.softmax(x, out=x)
    assert_same_bits(x, want, "softmax in place")


# ---- the Python boundary ---------------------------------------------------------------------


def test_bad_arrays_raise_edgellm_errors_instead_of_reaching_c():
    tensor, w = random_matrix("int4_asym", 8, 64)
    xq = native.quantize_activations(RNG.standard_normal(64).astype(np.float32))
    with pytest.raises(EdgeLLMError, match="float32"):
        native.quantize_activations(np.zeros(64, np.float64))
    with pytest.raises(EdgeLLMError, match="C-contiguous"):
        native.quantize_activations(np.zeros((64, 2), np.float32).T[0])
    with pytest.raises(EdgeLLMError, match="elements"):
        native.matvec(w, xq[:1])
    with pytest.raises(EdgeLLMError, match="mins"):
        native.QMatrix("int4_asym", 8, 64, tensor.packed_codes(), tensor.scales, None)
    with pytest.raises(EdgeLLMError, match="qweight"):
        native.QMatrix("int4_asym", 8, 96, tensor.packed_codes(), tensor.scales, tensor.mins)
    with pytest.raises(EdgeLLMError, match="blocks of"):
        native.QMatrix("int4_asym", 8, 64, tensor.packed_codes(), tensor.scales, tensor.mins, block=16)
    with pytest.raises(EdgeLLMError, match="does not run on this CPU"):
        native.set_variant("no-such-variant")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "EDGELLM_KERNELS"} | env
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=60
    )


def test_edgellm_kernels_forces_a_variant_and_refuses_one_the_cpu_lacks():
    lacking = next(v for v in ("neon", "avx2", "dotprod", "avx512vnni", "i8mm") if v not in VARIANTS)
    code = """
        from edgellm.backends.native import ffi as native
        from edgellm.errors import EdgeLLMError
        try:
            print(native.kernel_variant())
        except EdgeLLMError as error:
            print("error:", error)
    """
    assert run_python(code, EDGELLM_KERNELS="ref").stdout.strip() == "ref"
    refused = run_python(code, EDGELLM_KERNELS=lacking).stdout.strip()
    assert refused.startswith(f"error: EDGELLM_KERNELS='{lacking}' names a kernel variant this CPU does not run")


def test_without_the_extension_the_runtime_says_native_backend_unavailable_and_why():
    code = """
        import importlib.abc, sys
        class NoExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "edgellm._native":
                    raise ModuleNotFoundError("No module named 'edgellm._native'", name=name)
        sys.meta_path.insert(0, NoExtension())
        from edgellm.backends.native import ffi as native
        from edgellm.errors import EdgeLLMError
        print(native.available())
        try:
            native.kernel_variant()
        except EdgeLLMError as error:
            print(error)
    """
    lines = run_python(code).stdout.splitlines()
    assert lines[0] == "False"
    assert lines[1].startswith("native backend unavailable: the C extension edgellm._native is not built")
    assert "pip install -e ." in lines[1]


# ---- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_bundle_matrices_give_the_same_bits_in_every_variant_and_numpy(smollm2_bundle):
    from edgellm.bundle.manifest import read_manifest
    from edgellm.bundle.quant_formats import unpack_codes
    from edgellm.bundle.weights import BundleWeights

    manifest = read_manifest(smollm2_bundle)
    weights = BundleWeights.of(manifest)
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ]  # int4_asym 576x576, int4_asym 576x1536, int8_sym 49152x576
    for name in names:
        entry = manifest.matrices[name]
        rows = min(entry.rows, 4096)  # the head's first 4096 rows: a contiguous view, no copy
        qweight = weights.array(entry.qweight)[:rows]
        scales = weights.array(entry.scales)[:rows]
        mins = weights.array(entry.mins)[:rows] if entry.mins else None
        w = native.QMatrix(entry.format, rows, entry.cols, qweight, scales, mins, entry.block)
        x = RNG.standard_normal((2, entry.cols)).astype(np.float32)
        xq = native.quantize_activations_numpy(x)
        codes = unpack_codes(np.asarray(qweight), entry.bits)
        want = np.stack([native.matvec_numpy(entry.format, codes, scales, mins, entry.cols, xq[t]) for t in range(2)])
        for variant in VARIANTS:
            with native.using_variant(variant):
                assert_same_blocks(native.quantize_activations(x), xq, f"{variant} {name} activations")
                assert_same_bits(native.matmul(w, xq), want, f"{variant} {name}")
                assert_same_bits(native.matvec(w, xq[1]), want[1], f"{variant} {name} matvec")
