"""The real model: the bundle's ONNX Runtime logits against llama.cpp's on the same GGUF.

The fixture was recorded once with llama-cpp-python by tests/fixtures/record_llamacpp.py; CI
compares against it without building llama.cpp.
"""

import numpy as np
import onnxruntime as ort
import pytest

from conftest import FIXTURES
from edgellm.export.verify import run_onnx_logits
from edgellm.manifest import read_manifest

PREFILL_CHUNK = 64


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced_logits(bundle, ids: list[int]) -> np.ndarray:
    """Logits at every position, prefilled in chunks through the KV cache as the runtime will."""
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return run_onnx_logits(session, read_manifest(bundle).config, ids, 0, prefill_chunk=PREFILL_CHUNK)


def assert_agrees_with_llamacpp(actual: np.ndarray, expected: np.ndarray, ids: list[int], engine: str) -> None:
    """Issue 2's bar against llama.cpp's teacher-forced logits: top-1 >= 97%, mean KL <= 0.01,
    perplexity within 2%."""
    top1 = float(np.mean(actual.argmax(-1) == expected.argmax(-1)))
    log_p, log_q = log_softmax(expected), log_softmax(actual)  # p: llama.cpp, q: ours
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    targets = np.array(ids[1:])
    ppl_ours = float(np.exp(-np.mean(log_q[np.arange(len(targets)), targets])))
    ppl_llama = float(np.exp(-np.mean(log_p[np.arange(len(targets)), targets])))
    print(f"top1 {top1:.4f}  mean KL {kl:.5f}  ppl {engine} {ppl_ours:.3f} llama.cpp {ppl_llama:.3f}")
    assert top1 >= 0.97
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
    manifest = read_manifest(smollm2_bundle)
    session = ort.InferenceSession(str(smollm2_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    single = run_onnx_logits(session, manifest.config, ids[:96], decode_steps=0)
    chunked = teacher_forced_logits(smollm2_bundle, ids[:96])
    assert (single.argmax(-1) == chunked.argmax(-1)).mean() >= 0.99
    assert np.mean((single - chunked) ** 2) / np.mean(single ** 2) < 1e-4
