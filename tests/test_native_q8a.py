"""The 8-bit-activation products (native/edgellm.h, el_block_q8a): the C reference against the numpy
definition bit for bit, every variant against the reference, and the definition against exact math."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import skip_without_native
from test_native_kernels import assert_same_bits, corner_case_activations, random_matrix

from edgellm.backends.native import ffi as native
from edgellm.export.verify.numerics import nmse

skip_without_native(module=True)

RNG = np.random.default_rng(20261207)
FORMATS = ("int4_asym", "int4_sym", "int8_sym")
VARIANTS = native.available_variants()


def assert_same_q8a(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert_same_bits(got["d"], want["d"], f"{what} d")
    assert_same_bits(got["ds"], want["ds"], f"{what} ds")
    np.testing.assert_array_equal(got["sum"], want["sum"], err_msg=f"{what} sum")
    np.testing.assert_array_equal(got["q"], want["q"], err_msg=f"{what} q")


def numpy_products(tensor, xq: np.ndarray) -> np.ndarray:
    return native.matmul_q8a_numpy(tensor.format, tensor.codes, tensor.scales, tensor.mins, tensor.cols, xq)


def test_fma_float32_rounds_once_like_c():
    a = RNG.standard_normal(20000).astype(np.float32)
    b = RNG.standard_normal(20000).astype(np.float32)
    c = (RNG.standard_normal(20000) * np.float32(2.0) ** RNG.integers(-30, 30, 20000)).astype(np.float32)
    got = native.fma_float32(a, b, c)
    for i in range(0, 20000, 97):  # against exact rational arithmetic, rounded to nearest float32 by hand
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        below = np.float32(float(exact))  # within a float64 of exact; fix the float32 choice exactly
        candidates = [np.nextafter(below, np.float32(-np.inf)), below, np.nextafter(below, np.float32(np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.uint32)) & 1))
        assert got[i] == best, (a[i], b[i], c[i])
    assert math.isnan(native.fma_float32(np.float32(np.nan), np.float32(1), np.float32(0)))


def test_the_c_reference_quantizes_8_bit_activations_like_the_numpy_definition():
    x = np.concatenate([corner_case_activations(), (RNG.standard_normal(1000) * 3).astype(np.float32)])
    x[300:400:3] = np.round(x[300:400:3] * 4) / 2
    with native.using_variant("ref"):
        got = native.quantize_activations_q8a(x)
    want = native.quantize_q8a_numpy(x)
    assert_same_q8a(got, want, "ref vs numpy")
    assert list(got[0]["q"][:7]) == [127, 2, -2, 0, 0, 126, -2]  # d = 1: ties to even, as llama.cpp
    assert got[1]["d"] == 0 and got[1]["sum"] == 0 and got[1]["ds"] == 0
    assert np.isnan(got[3]["d"]) and np.isnan(got[3]["ds"]) and got[3]["sum"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_quantizes_8_bit_activations_like_the_reference(variant):
    for n in (32, 100, 576, 1000):
        x = (RNG.standard_normal((3, n)) * 2).astype(np.float32)
        x[:, ::5] = np.round(x[:, ::5] * 8) / 2
        with native.using_variant(variant):
            got = native.quantize_activations_q8a(x)
        assert_same_q8a(got, native.quantize_q8a_numpy(x), f"{variant} n={n}")


@pytest.mark.parametrize("block", (32, 64, 128))
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_c_reference_8_bit_products_equal_the_numpy_definition(fmt, block):
    for cols in (32, 100, 288, 576, 1568):
        tensor, w = random_matrix(fmt, 17, cols, block)
        x = RNG.standard_normal((5, cols)).astype(np.float32)
        xq = native.quantize_q8a_numpy(x)
        with native.using_variant("ref"):
            got = native.matmul_q8a(w, xq)
        assert_same_bits(got, numpy_products(tensor, xq), f"{fmt} block {block} cols {cols}")
        # and it is the product of the dequantized weights and the dequantized activations
        x_hat = (xq["d"][..., None] * xq["q"].astype(np.float32)).reshape(5, -1)[:, :cols]
        exact = x_hat.astype(np.float64) @ tensor.dequantize().astype(np.float64).T
        assert nmse(got, exact) < 1e-10


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_variant_8_bit_products_equal_the_reference_for_any_tokens_and_threads(fmt):
    pools = [native.ThreadPool(n) for n in (1, 2, 3)]
    for rows, cols in ((1, 32), (17, 100), (64, 576), (37, 1568)):
        tensor, w = random_matrix(fmt, rows, cols)
        xq = native.quantize_q8a_numpy(RNG.standard_normal((70, cols)).astype(np.float32))
        want = numpy_products(tensor, xq)
        for variant in VARIANTS:
            with native.using_variant(variant):
                for pool in pools:
                    for tokens in (1, 3, 4, 9, 70):
                        got = native.matmul_q8a(w, xq[:tokens], pool=pool)
                        assert_same_bits(got, want[:tokens], f"{variant} {fmt} {rows}x{cols} tokens {tokens}")


def test_8_bit_products_are_within_an_8_bit_rounding_of_the_16_bit_ones():
    tensor, w = random_matrix("int4_asym", 64, 576)
    x = RNG.standard_normal((4, 576)).astype(np.float32)
    eight = native.matmul_q8a(w, native.quantize_activations_q8a(x))
    sixteen = native.matmul(w, native.quantize_activations(x))
    exact = x.astype(np.float64) @ tensor.dequantize().astype(np.float64).T
    assert nmse(sixteen, exact) < 1e-8 < nmse(eight, exact) < 1e-3  # one int8 step per value costs ~1e-4
