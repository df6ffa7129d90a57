"""GGUF files written the way llama.cpp's converter writes them load back to the Hugging Face
checkpoint: F32/F16/BF16 to the same values, Q/K rows un-permuted for llama, Q8_0/Q4_0/Q4_1
blocks carried as they are, K-quants dequantized with a warning, llama3 `rope_freqs` honoured.
The references are the transformers model the file was written from and gguf-py's dequantizer;
the files come from tests/tiny_gguf.py, which mirrors convert_hf_to_gguf.py.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from tiny_gguf import llama3_rope_freqs, permute_qk, write_tiny_gguf
from tiny_models import make_tiny_model, tiny_vocab_size

from edgellm.bundle.architectures import gguf_tensor_name as gguf_name
from edgellm.export.canonical import as_float
from edgellm.export.exporter import export_model
from edgellm.export.quant.formats import BlockQuantTensor, quantization_error, quantize
from edgellm.export.reference import ReferenceModel
from edgellm.export.sources.gguf import load_gguf
from edgellm.export.verify.numerics import nmse

SHAPES = [  # (query heads, key-value heads, head_dim, hidden)
    (4, 2, 16, 64),
    (6, 2, 16, 96),
]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, tiny_vocab_size(), n)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].float().numpy()


def reference_logits(canonical, ids: np.ndarray) -> np.ndarray:
    weights = {name: as_float(t) for name, t in canonical.tensors.items()}
    return ReferenceModel(canonical.config, weights).forward(ids)


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as a GGUF reader should return them (no lm_head when tied)."""
    tie = model.config.tie_word_embeddings
    return {
        name: value.float().numpy()
        for name, value in model.state_dict().items()
        if not (tie and name == "lm_head.weight")
    }


def file_tensors(path) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """GGUF name -> (type, raw data) exactly as stored, read with gguf-py."""
    return {t.name: (t.tensor_type, np.asarray(t.data)) for t in GGUFReader(str(path)).tensors}


def kv_heads_of(name: str, config) -> int | None:
    """How many heads convert_hf_to_gguf permuted this llama tensor's rows by (None: not permuted)."""
    if ".q_proj." in name:
        return config.num_attention_heads
    if ".k_proj." in name:
        return config.num_key_value_heads
    return None


# --- float files --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("heads,kv,head_dim,hidden", SHAPES)
def test_f32_gguf_loads_the_checkpoint_tensors_exactly_and_matches_transformers_logits(
    tmp_path, arch, tie, heads, kv, head_dim, hidden
):
    model = make_tiny_model(arch, tie=tie, heads=heads, kv_heads=kv, head_dim=head_dim, hidden=hidden)
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", arch=arch)
    canonical = load_gguf(path)

    expected = hf_tensors(model)
    assert sorted(canonical.tensors) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(canonical.tensors[name], value, err_msg=name)
    assert canonical.warnings == []
    c = canonical.config
    assert (c.architecture, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (arch, heads, kv, head_dim)
    assert (c.tie_word_embeddings, c.attention_bias) == (tie, arch == "qwen2")
    assert (canonical.tokenizer.bos_token_id, canonical.tokenizer.eos_token_ids) == (1, [2])

    ids = token_ids(19)
    assert max_relative_error(reference_logits(canonical, ids), torch_logits(model, ids)) <= 1e-4


def test_the_llama_file_really_holds_permuted_q_and_k_rows_and_qwen2_does_not(tmp_path):
    # Guards the test above: equality after loading means something only if the file differs.
    for arch in ("llama", "qwen2"):
        model = make_tiny_model(arch, tie=True)
        stored = file_tensors(write_tiny_gguf(model, tmp_path / f"{arch}.gguf", arch=arch))
        k_file = stored["blk.0.attn_k.weight"][1]
        k_hf = model.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy()
        if arch == "llama":
            assert not np.array_equal(k_file, k_hf)
            np.testing.assert_array_equal(k_file, permute_qk(k_hf, model.config.num_key_value_heads))
        else:
            np.testing.assert_array_equal(k_file, k_hf)


@pytest.mark.parametrize("type_name,torch_dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_f16_and_bf16_tensors_read_as_the_checkpoint_cast_to_that_type_and_widened(tmp_path, type_name, torch_dtype):
    model = make_tiny_model("llama", tie=False)
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", tensor_type=type_name)
    assert file_tensors(path)["blk.0.ffn_up.weight"][0].name == type_name
    canonical = load_gguf(path)
    for name, value in model.state_dict().items():
        narrowed = value if value.ndim == 1 else value.to(torch_dtype)  # norms stay F32, as in llama.cpp
        tensor = canonical.tensors[name]
        assert tensor.dtype == np.float32
        np.testing.assert_array_equal(tensor, narrowed.float().numpy(), err_msg=name)


# --- block-quantized files ----------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_q8_0_q4_0_and_q4_1_matrices_are_carried_as_blocks_that_dequantize_like_gguf_py(tmp_path, type_name):
    model = make_tiny_model("llama", tie=False)
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", tensor_type=type_name)
    stored = file_tensors(path)
    canonical = load_gguf(path)
    assert canonical.warnings == []

    matrices = [n for n, v in hf_tensors(model).items() if v.ndim == 2]
    assert len(matrices) == 2 + 7 * model.config.num_hidden_layers
    for name in matrices:
        tensor = canonical.tensors[name]
        assert isinstance(tensor, BlockQuantTensor) and tensor.source_format == f"gguf:{type_name}", name
        ours = tensor.dequantize()
        heads = kv_heads_of(name, model.config)
        if heads is not None:  # put our rows back in the file's order, with the converter's permute
            ours = permute_qk(ours, heads)
        qtype, raw = stored[gguf_name(name)]
        assert qtype.name == type_name
        expected = quants.dequantize(raw, qtype)
        if type_name == "Q4_1":
            # (q - (-m/d)) * d equals d*q + m up to the rounding of the zero point: a few ulps of |m|.
            blocks = raw.reshape(raw.shape[0], -1, 20)
            m = np.abs(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            bound = np.repeat(m, 32, axis=1) * 4 * np.finfo(np.float32).eps + 1e-12
            assert np.all(np.abs(ours - expected) <= bound), name
        else:
            np.testing.assert_array_equal(ours, expected, err_msg=name)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the converter's row permutation, derived from it (not from gguf_source)."""
    return w[np.argsort(permute_qk(np.arange(w.shape[0]), n_head))]


def torch_model_with_file_weights(model, path):
    """A copy of `model` running gguf-py's dequantization of every tensor in the file."""
    import copy

    stored = file_tensors(path)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            qtype, raw = stored[gguf_name(name)]
            values = np.array(quants.dequantize(raw, qtype), np.float32).reshape(param.shape)
            heads = kv_heads_of(name, model.config)
            param.copy_(torch.from_numpy(unpermute_qk(values, heads) if heads else values))
    return twin


# The tiny random model amplifies weight error about 13x (Q8_0: weight NMSE 3e-5, logits 4e-4;
# Q4_0: 0.007 and 0.06-0.13 over seeds 0-2), so the float comparison is loose; Q/K rows in the
# wrong order give 0.4-0.8. The comparison with the file's own dequantized weights is tight.
@pytest.mark.parametrize("type_name,max_nmse_vs_float", [("Q8_0", 2e-3), ("Q4_0", 0.2), ("Q4_1", 0.2)])
def test_block_quantized_files_give_transformers_logits_for_the_dequantized_weights(
    tmp_path, type_name, max_nmse_vs_float
):
    model = make_tiny_model("llama", tie=False)
    path = write_tiny_gguf(model, tmp_path / "tiny.gguf", tensor_type=type_name)
    ours = reference_logits(load_gguf(path), ids := token_ids(19))
    assert max_relative_error(ours, torch_logits(torch_model_with_file_weights(model, path), ids)) <= 1e-4
    assert nmse(ours, torch_logits(model, ids)) < max_nmse_vs_float


# --- K-quants: dequantized on read, re-quantized by the exporter --------------------------------

K_QUANT_SHAPE = dict(heads=4, kv_heads=2, head_dim=64, hidden=256, ffn=256)  # Q4_K rows are 256 wide
K_QUANT_TENSORS = {
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", 2),
    "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj.weight", None),
}


@pytest.fixture(scope="module")
def q4_k_file(tmp_path_factory):
    model = make_tiny_model("llama", tie=False, **K_QUANT_SHAPE)
    path = write_tiny_gguf(
        model, tmp_path_factory.mktemp("q4k") / "tiny-q4k.gguf", tensor_type=dict.fromkeys(K_QUANT_TENSORS, "Q4_K")
    )
    return model, path


def test_a_q4_k_tensor_is_dequantized_like_gguf_py_with_a_warning_that_names_it(q4_k_file):
    model, path = q4_k_file
    stored = file_tensors(path)
    canonical = load_gguf(path)
    for name_in_file, (name, heads) in K_QUANT_TENSORS.items():
        qtype, raw = stored[name_in_file]
        assert qtype == GGMLQuantizationType.Q4_K
        tensor = canonical.tensors[name]
        assert isinstance(tensor, np.ndarray) and tensor.dtype == np.float32
        in_file_order = permute_qk(tensor, heads) if heads else tensor
        np.testing.assert_array_equal(in_file_order, quants.dequantize(raw, qtype))
        assert [w for w in canonical.warnings if name_in_file in w and "Q4_K" in w], canonical.warnings
    # The hand-packed blocks hold the weights (a packing mistake would give noise, not 4-bit error).
    for _, (name, _) in K_QUANT_TENSORS.items():
        assert nmse(canonical.tensors[name], model.state_dict()[name].numpy()) < 0.02
    ids = token_ids(19)
    assert nmse(reference_logits(canonical, ids), torch_logits(model, ids)) < 0.05


def test_a_q4_k_file_exports_with_the_tensor_requantized_reported_and_the_warning_kept(q4_k_file, tmp_path):
    _, path = q4_k_file
    manifest = export_model(path, tmp_path / "bundle")
    assert manifest["verification"]["passed"]
    canonical = load_gguf(path)
    rows = {row["name"]: row for row in manifest["quantization"]["quantized"]}
    for name_in_file, (name, _) in K_QUANT_TENSORS.items():
        assert name in rows
        values = canonical.tensors[name]
        expected = quantization_error(values, quantize(values, rows[name]["format"], rows[name]["block"]))
        assert rows[name]["nmse"] == pytest.approx(expected["nmse"], rel=1e-6)
        assert any(name_in_file in w and "Q4_K" in w for w in manifest["provenance"]["warnings"])


# --- RoPE scaling and export --------------------------------------------------------------------


def llama3_model():
    return make_tiny_model("llama", tie=True, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)


def test_llama3_rope_freqs_tensor_gives_transformers_logits_on_a_long_prompt(tmp_path):
    model = llama3_model()
    path = write_tiny_gguf(model, tmp_path / "llama3.gguf")
    factors = file_tensors(path)["rope_freqs.weight"][1]
    np.testing.assert_array_equal(factors, llama3_rope_freqs(model.config))
    assert factors.min() == 1.0 and factors.max() == 8.0  # fast, slow and smoothed bands all occur
    canonical = load_gguf(path)
    ids = token_ids(120, seed=3)  # long enough that the scaled low frequencies matter
    expected = torch_logits(model, ids)
    assert max_relative_error(reference_logits(canonical, ids), expected) <= 1e-4

    # Without the tensor the same file is measurably wrong, so the check above has teeth.
    unscaled = load_gguf(write_tiny_gguf(model, tmp_path / "no-freqs.gguf", rope_freqs=False))
    assert max_relative_error(reference_logits(unscaled, ids), expected) > 1e-3


@pytest.mark.parametrize(
    "make_model", [lambda: make_tiny_model("llama", tie=False), llama3_model], ids=["f32", "llama3-rope-freqs"]
)
def test_a_bundle_exported_from_an_f32_gguf_verifies(tmp_path, make_model):
    path = write_tiny_gguf(make_model(), tmp_path / "tiny.gguf")
    manifest = export_model(path, tmp_path / "bundle")
    assert manifest["verification"]["passed"]
    assert manifest["provenance"]["source"]["format"] == "gguf"
