"""The numpy reference forward reproduces transformers on tiny random models, and its KV cache
path gives the same logits as a full forward."""

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model, save_tiny_model, tiny_vocab_size

from edgellm.export.reference import ReferenceModel
from edgellm.export.sources.hf import load_hf_folder
from edgellm.export.verify.numerics import first_divergence

SHAPES = [  # (query heads, key-value heads, head_dim, hidden)
    (4, 2, 16, 64),
    (4, 4, 16, 64),
    (6, 2, 16, 96),
    (4, 1, 32, 64),
]


def reference_and_torch(tmp_path, arch, tie, heads, kv, head_dim, hidden, **kw):
    model = make_tiny_model(arch, tie=tie, heads=heads, kv_heads=kv, head_dim=head_dim, hidden=hidden, **kw)
    canonical = load_hf_folder(save_tiny_model(model, tmp_path / "hf"))
    return ReferenceModel(canonical.config, canonical.tensors), model


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, tiny_vocab_size(), n)


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_matches_transformers(reference: ReferenceModel, model, ids, max_error: float = 1e-4) -> None:
    """The reference's logits within `max_error` (relative) of transformers'; a failure names the first
    layer whose output strays (transformers' hidden states against the reference's trace)."""
    with torch.no_grad():
        out = model(torch.tensor(ids)[None], output_hidden_states=True)
    expected, trace = out.logits[0].numpy(), {}
    actual = reference.forward(ids, trace=trace)
    error = max_relative_error(actual, expected)
    if error > max_error:
        layers = len(out.hidden_states) - 1  # the embeddings, each layer's input, then the final norm's output
        theirs = {f"{i}.out": out.hidden_states[i + 1][0].numpy() for i in range(layers - 1)}
        theirs["final_norm"] = out.hidden_states[layers][0].numpy()
        where = first_divergence(trace, theirs, max_error**2)
        raise AssertionError(f"logits relative error {error:.3g} (max {max_error:g}); first divergence: {where}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("heads,kv,head_dim,hidden", SHAPES)
def test_reference_logits_match_transformers(tmp_path, arch, tie, heads, kv, head_dim, hidden):
    reference, model = reference_and_torch(tmp_path, arch, tie, heads, kv, head_dim, hidden)
    assert_matches_transformers(reference, model, token_ids(19))


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    reference, model = reference_and_torch(
        tmp_path, "llama", True, 4, 2, 16, 64, rope_scaling=scaling, rope_theta=500000.0
    )
    assert_matches_transformers(reference, model, token_ids(120, seed=3))  # long: the scaled frequencies matter


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_incremental_decoding_with_the_cache_equals_the_full_forward(tmp_path, arch):
    reference, _ = reference_and_torch(tmp_path, arch, False, 6, 2, 16, 96)
    ids = token_ids(23, seed=5)
    full = reference.forward(ids)
    cache = reference.new_cache()
    pieces = [reference.forward(ids[:9], cache)]  # a prefill chunk, then a smaller chunk, then single tokens
    pieces.append(reference.forward(ids[9:14], cache))
    pieces.extend(reference.forward(ids[i : i + 1], cache) for i in range(14, 23))
    assert cache.length == 23
    np.testing.assert_allclose(np.concatenate(pieces), full, rtol=0, atol=1e-5 * np.abs(full).max())
