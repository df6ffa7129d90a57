"""The real model: the bundle's ONNX Runtime logits against llama.cpp's on the same GGUF.

The fixture was recorded once with llama-cpp-python by tests/fixtures/record_llamacpp.py; CI
compares against it without building llama.cpp.
"""

import numpy as np
import pytest
from conftest import FIXTURES

from edgellm.bundle.manifest import read_manifest
from edgellm.export.verify.cpu import onnxruntime_backend
from edgellm.export.verify.numerics import kl_divergence, log_softmax, nmse, top1

PREFILL_CHUNK = 64


def teacher_forced_logits(bundle, ids: list[int], prefill_chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Logits at every position, prefilled in chunks through the KV cache as the runtime does."""
    backend = onnxruntime_backend(read_manifest(bundle), len(ids), prefill_chunk=prefill_chunk)
    try:
        return backend.score(ids)
    finally:
        backend.close()


def assert_agrees_with_llamacpp(actual: np.ndarray, expected: np.ndarray, ids: list[int], engine: str) -> None:
    """Issue 2's bar against llama.cpp's teacher-forced logits: top-1 >= 97%, mean KL <= 0.01,
    perplexity within 2%."""
    agreement = top1(actual, expected)
    kl = float(np.mean(kl_divergence(expected, actual)))  # KL(llama.cpp || ours)
    log_p, log_q = log_softmax(expected), log_softmax(actual)
    targets = np.array(ids[1:])
    ppl_ours = float(np.exp(-np.mean(log_q[np.arange(len(targets)), targets])))
    ppl_llama = float(np.exp(-np.mean(log_p[np.arange(len(targets)), targets])))
    print(f"top1 {agreement:.4f}  mean KL {kl:.5f}  ppl {engine} {ppl_ours:.3f} llama.cpp {ppl_llama:.3f}")
    assert agreement >= 0.97
    assert kl <= 0.01
    assert abs(ppl_ours / ppl_llama - 1) <= 0.02


@pytest.fixture(scope="module")
def golden():
    data = np.load(FIXTURES / "llamacpp_logits.npz")
    return data["ids"].astype(np.int64).tolist(), data["logits"].astype(np.float32)


def test_golden_fixture_is_long_enough(golden):
    ids, logits = golden
    assert len(ids) >= 256 and logits.shape == (len(ids), 49152)


def test_onnx_runtime_agrees_with_llamacpp_teacher_forced(smollm2_bundle, golden):
    ids, expected = golden
    actual = teacher_forced_logits(smollm2_bundle, ids)
    assert np.isfinite(actual).all()
    assert_agrees_with_llamacpp(actual, expected, ids, "onnxruntime")


def test_the_chunked_prefill_matches_a_single_pass(smollm2_bundle, golden):
    ids, _ = golden
    single = teacher_forced_logits(smollm2_bundle, ids[:96], prefill_chunk=96)
    chunked = teacher_forced_logits(smollm2_bundle, ids[:96])
    assert top1(chunked, single) >= 0.99
    assert nmse(chunked, single) < 1e-4
