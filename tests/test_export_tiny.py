"""Tiny random HF models export to int4 bundles that verify, and the bundle is self-consistent:
weights.bin, the manifest's tensor index and model.onnx's external data all say the same."""

import json

import numpy as np
import onnx
import pytest
import torch
from bundle_reference import reference_from_bundle
from parity import assert_parity
from tiny_models import make_tiny_model, save_tiny_model, tiny_vocab_size

from edgellm.bundle.format import ALIGN
from edgellm.bundle.manifest import read_manifest
from edgellm.export.exporter import export_model
from edgellm.export.options import ExportOptions, QuantOptions
from edgellm.export.verify.cpu import onnx_trace, onnxruntime_backend
from edgellm.export.verify.numerics import first_divergence, nmse


def export_tiny(tmp_path, arch="llama", tie=False, options=ExportOptions(), **model_kw):
    model = make_tiny_model(arch, tie=tie, **model_kw)
    folder = save_tiny_model(model, tmp_path / "hf")
    bundle = tmp_path / "bundle"
    manifest = export_model(folder, bundle, options)
    return model, bundle, manifest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tiny_models_export_to_int4_bundles_that_verify(tmp_path, arch, tie):
    _, bundle, manifest = export_tiny(tmp_path, arch, tie)
    assert manifest["verification"]["passed"]
    formats = {name: m["format"] for name, m in manifest["matrices"].items()}
    assert formats["model.layers.0.mlp.down_proj.weight"] == "int4_asym"
    assert formats["model.embed_tokens.weight"] == "int8_sym"
    assert ("lm_head.weight" in formats) == (not tie)
    assert json.loads((bundle / "manifest.json").read_text()) == manifest
    assert not list(tmp_path.glob(".bundle.tmp-*"))


@pytest.mark.parametrize(
    "quant",
    [QuantOptions(symmetric=True), QuantOptions(block=64), QuantOptions(bits=8), QuantOptions(keep_8bit=())],
    ids=["sym", "block64", "int8", "int4-embeddings"],
)
def test_quantization_options_export_and_verify(tmp_path, quant):
    _, _, manifest = export_tiny(tmp_path, "llama", True, ExportOptions(quant=quant))
    assert manifest["verification"]["passed"]
    blocks = {m["block"] for m in manifest["matrices"].values()}
    assert blocks == {quant.block}


def test_weights_bin_index_matches_the_onnx_external_data_and_the_hashes(tmp_path):
    import hashlib

    _, bundle, manifest = export_tiny(tmp_path, "qwen2", False)
    data = (bundle / "weights.bin").read_bytes()
    for name, entry in manifest["tensors"].items():
        assert entry["offset"] % ALIGN == 0
        chunk = data[entry["offset"] : entry["offset"] + entry["nbytes"]]
        assert hashlib.sha256(chunk).hexdigest() == entry["sha256"], name
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    external = {
        t.name: {kv.key: kv.value for kv in t.external_data}
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert set(external) == set(manifest["tensors"])
    for name, fields in external.items():
        assert fields["location"] == "weights.bin"
        assert int(fields["offset"]) == manifest["tensors"][name]["offset"]
        assert int(fields["length"]) == manifest["tensors"][name]["nbytes"]


def test_weights_bin_stores_the_ropes_table_the_graph_reads_even_for_a_small_head_dim(tmp_path):
    from edgellm.bundle.weights import BundleWeights
    from edgellm.export.reference import rope_inv_freq

    _, bundle, _ = export_tiny(tmp_path, "llama", True, head_dim=16)  # 32 bytes: under the inline limit
    manifest = read_manifest(bundle)
    stored = np.asarray(BundleWeights.of(manifest).array("model.rotary_emb.inv_freq"))
    assert stored.dtype == np.float32 and stored.tobytes() == rope_inv_freq(manifest.config).tobytes()
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    table = next(t for t in graph.initializer if t.name == "model.rotary_emb.inv_freq")
    assert table.data_location == onnx.TensorProto.EXTERNAL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_onnx_runtime_with_kv_cache_equals_the_reference_read_from_weights_bin(tmp_path, arch):
    _, bundle, _ = export_tiny(tmp_path, arch, False, heads=6, kv_heads=2, hidden=96)
    manifest = read_manifest(bundle)
    reference = reference_from_bundle(manifest)
    ids = [int(t) for t in np.random.default_rng(7).integers(0, tiny_vocab_size(), 30)]
    expected = reference.forward(ids)
    backend = onnxruntime_backend(manifest, len(ids), prefill_chunk=8)
    actual = backend.score(ids, decode_steps=10)
    backend.close()

    def traces():
        reference.forward(ids, trace=(expected_trace := {}))
        return expected_trace, onnx_trace(manifest, ids)

    assert_parity(actual, expected, 1e-9, f"{arch}: ONNX Runtime vs the reference", traces)


def test_the_graph_trace_follows_the_reference_trace_tensor_by_tensor(tmp_path):
    _, bundle, _ = export_tiny(tmp_path, "qwen2", False, heads=6, kv_heads=2, hidden=96)
    manifest = read_manifest(bundle)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, tiny_vocab_size(), 12)]
    reference_from_bundle(manifest).forward(ids, trace=(expected := {}))
    traced = onnx_trace(manifest, ids)
    assert {"0.attn_norm", "0.attn", "0.attn_residual", "0.mlp_norm", "0.out", "final_norm"} <= set(traced)
    assert first_divergence(expected, traced, 1e-9) is None


def test_int4_bundle_stays_close_to_the_float_transformers_model(tmp_path):
    model, bundle, manifest = export_tiny(tmp_path, "llama", False)
    ids = [int(t) for t in np.random.default_rng(11).integers(0, tiny_vocab_size(), 24)]
    with torch.no_grad():
        expected = model(torch.tensor(ids)[None]).logits[0].numpy()
    backend = onnxruntime_backend(read_manifest(bundle), len(ids))
    actual = backend.score(ids, decode_steps=4)
    backend.close()
    assert nmse(actual, expected) < 0.05  # int4 quantization error, not a numerics bug: those are caught above at 1e-9
    assert manifest["quantization"]["overall_nmse"] < 0.02


def test_manifest_describes_the_model_tokenizer_and_provenance(tmp_path):
    _, bundle, manifest = export_tiny(tmp_path, "llama", True)
    read_manifest(bundle)  # passes the runtime's own checks
    assert manifest["model"]["architecture"] == "llama"
    assert manifest["tokenizer"]["eos_token_ids"] == [2]
    assert "<|im_start|>" in manifest["chat_template"]
    assert manifest["provenance"]["source"]["format"] == "hf"
    assert len(manifest["provenance"]["source"]["sha256"]) == 64
    assert manifest["files"]["weights.bin"]["bytes"] == (bundle / "weights.bin").stat().st_size
