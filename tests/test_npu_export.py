"""The `npu` export profile: static-shape QDQ graphs next to the CPU graph, verified on ONNX Runtime's
CPU provider against the float reference. Nothing here needs onnxruntime-qnn."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from npu_support import NPU_CHUNK, NPU_CONTEXT, cpu_provider_decoder, npu_bundle
from tiny_models import make_tiny_model, save_tiny_model, tiny_vocab_size

from edgellm.backends.npu.host import HostEmbedding, NpuDecoder
from edgellm.bundle.manifest import read_manifest
from edgellm.bundle.weights import BundleWeights
from edgellm.export.canonical import as_float
from edgellm.export.exporter import load_source
from edgellm.export.graph.npu import build_npu_graph, float_nodes
from edgellm.export.quant.npu import calibration_documents
from edgellm.export.reference import FREQ_FACTORS, INV_FREQ, ReferenceModel, rope_inv_freq
from edgellm.export.verify.npu import cpu_sessions, teacher_forced_logits
from edgellm.export.verify.numerics import kl_divergence


@pytest.fixture(scope="module")
def bundle():
    return npu_bundle("random")


def graph_files(bundle, manifest):
    files = manifest["graphs"]["npu"]["files"]
    return {role: onnx.load(str(bundle / files[role]), load_external_data=False) for role in ("prefill", "decode")}


def test_the_npu_graphs_have_static_shapes_and_only_standard_onnx_ops(bundle):
    manifest = read_manifest(bundle).raw
    for role, graph in graph_files(bundle, manifest).items():
        for value in [*graph.graph.input, *graph.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), (role, value.name)
        ops = {(node.domain or "", node.op_type) for node in graph.graph.node}
        assert {domain for domain, _ in ops} == {""}, f"{role}: non-standard domains in {ops}"
        names = {op for _, op in ops}
        assert {"QuantizeLinear", "DequantizeLinear", "RMSNormalization", "Softmax", "Gather"} <= names
        assert not names & {"MatMulNBits", "RotaryEmbedding", "GroupQueryAttention", "SimplifiedLayerNormalization"}
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.graph.input}
        seq = NPU_CHUNK if role == "prefill" else 1
        assert shapes["inputs_embeds"] == [1, seq, 64]
        assert shapes["attention_mask"] == [1, seq, NPU_CONTEXT + seq]
        assert shapes["past_key_values.0.key"] == [1, 2, NPU_CONTEXT, 16]


def test_the_matrices_are_int8_per_channel_and_both_graphs_share_one_weights_file(bundle):
    manifest = read_manifest(bundle).raw
    graphs = graph_files(bundle, manifest)
    weights_file = manifest["graphs"]["npu"]["files"]["weights"]
    locations = {}
    for graph in graphs.values():
        initializers = {t.name: t for t in graph.graph.initializer}
        q_proj = initializers["model.layers.0.self_attn.q_proj.weight.T.attn_scaled_quantized"]
        assert q_proj.data_type == onnx.TensorProto.INT8 and list(q_proj.dims) == [64, 64]
        assert list(initializers["model.layers.0.self_attn.q_proj.weight.T.attn_scaled_scale"].dims) == [64]
        down = initializers["model.layers.0.mlp.down_proj.weight.T.fp16"]  # the residual path stays float
        assert down.data_type == onnx.TensorProto.FLOAT16
        for t in graph.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                fields = {kv.key: kv.value for kv in t.external_data}
                assert fields["location"] == weights_file
                locations.setdefault(t.name, set()).add((fields["offset"], fields["length"]))
        assert set(float_nodes(graph)) >= {
            "/model/layers.0/residual_attn",
            "/model/layers.1/residual_mlp",
            "/model/norm/RMSNormalization",
            "/model/layers.0/mlp/down_proj/MatMul",
        }
    assert all(len(spots) == 1 for spots in locations.values()), "a weight stored twice"
    stored = sum(int(length) for spots in locations.values() for _, length in spots)
    assert (bundle / weights_file).stat().st_size < stored + 64 * len(locations)


def test_the_manifest_describes_the_npu_variant_and_its_verification(bundle):
    manifest = read_manifest(bundle).raw  # the runtime's own checks: every listed file present, hashes match
    entry = manifest["graphs"]["npu"]
    assert entry["chunk"] == NPU_CHUNK and entry["context"] == NPU_CONTEXT
    assert set(entry["files"].values()) <= set(manifest["files"])
    assert entry["io"]["prefill"]["inputs"]["past_key_values.{i}.key"] == [1, 2, NPU_CONTEXT, 16]
    assert entry["io"]["decode"]["outputs"]["new_key_values.{i}.value"] == [1, 2, 1, 16]
    assert entry["io"]["prefill"]["inputs"]["attention_mask"] == [1, NPU_CHUNK, NPU_CONTEXT + NPU_CHUNK]
    quant = entry["quantization"]
    assert quant["scheme"] == "a16w8" and quant["activations"].startswith("uint16")
    assert quant["weights"].startswith("int8 per output channel")
    assert quant["calibration"]["documents"] >= 8 and quant["calibration"]["decode_samples"] > 0
    report = entry["verification"]
    # the export raises when the verification fails, so a written bundle passed: what is checked here is
    # that the manifest records the run (the numbers are re-measured independently below)
    assert report["passed"] and report["engine"].startswith("onnxruntime-cpu")
    assert set(report["thresholds"]) == {"min_top1", "max_kl"} and 0 < report["mean_top1"] <= 1
    assert max(r["tokens"] for r in report["prompts"]) > NPU_CHUNK  # a prompt spans several prefill chunks
    assert "cpu" in manifest["graphs"] and manifest["verification"]["passed"]  # the CPU bundle is whole


def test_the_quantized_graphs_follow_the_float_reference_through_prefill_and_decode(bundle):
    """The random model's logits, teacher-forced: prefill chunks at positions 0, 16, 32 (the last one
    padded) and decode steps, against the numpy reference over the source's float weights."""
    manifest = read_manifest(bundle)
    source = load_source(bundle.parent / "hf")
    reference = ReferenceModel(manifest.config, {n: as_float(t) for n, t in source.tensors.items()})
    decoder = cpu_provider_decoder(manifest)
    ids = list(np.random.default_rng(5).integers(3, tiny_vocab_size(), 45))
    expected = reference.forward(ids)
    actual = teacher_forced_logits(decoder, ids, decode_steps=8)
    assert kl_divergence(expected, actual).mean() < 0.005  # measured ~3e-4
    assert np.mean(actual.argmax(-1) == expected.argmax(-1)) >= 0.85  # near-ties flip: the random model is flat


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_float_npu_graphs_equal_the_reference_with_padding_offsets_and_decode(tmp_path, arch):
    """Before quantization the static graphs compute the reference's math exactly: RoPE from the
    tables, GQA over [past, chunk], the additive mask, padded chunks, the host's in-place cache."""
    source = load_source(
        save_tiny_model(make_tiny_model(arch, tie=False, heads=6, kv_heads=2, hidden=96), tmp_path / "hf")
    )
    weights = {n: as_float(t) for n, t in source.tensors.items()}
    weights[INV_FREQ] = rope_inv_freq(source.config, weights.get(FREQ_FACTORS))  # as the exporter stores it
    paths = {}
    for seq in (8, 1):
        graph, arrays = build_npu_graph(source.config, weights, seq, 48)
        for name, array in arrays.items():
            graph.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        onnx.checker.check_model(graph, full_check=True)
        paths[seq] = tmp_path / f"float{seq}.onnx"
        onnx.save(graph, str(paths[seq]))
    table = weights["model.embed_tokens.weight"]
    decoder = NpuDecoder(source.config, 48, cpu_sessions(paths), lambda ids: table[ids])
    ids = list(np.random.default_rng(3).integers(0, tiny_vocab_size(), 30))
    # The MLP's down projection runs in fp16 (weights and input), so the reference gets the same weights.
    rounded = {n: w.astype(np.float16).astype(np.float32) if ".down_proj." in n else w for n, w in weights.items()}
    expected = ReferenceModel(source.config, rounded).forward(ids)
    actual = teacher_forced_logits(decoder, ids, decode_steps=9)  # chunks of 8 at 0, 8, 16 (5 real rows), then 9 steps
    assert np.mean((actual - expected) ** 2) / np.mean(expected**2) < 1e-7  # the fp16 input: ~1e-8
    assert (actual.argmax(-1) == expected.argmax(-1)).all()


def test_the_host_embedding_reads_the_same_values_as_the_quantized_table(tmp_path):
    from edgellm.export.exporter import export_model
    from edgellm.export.options import ExportOptions, QuantOptions
    from edgellm.export.quant.formats import quantize

    for fmt, options in (
        ("int8_sym", QuantOptions()),
        ("int4_asym", QuantOptions(keep_8bit=())),
        ("int4_sym", QuantOptions(keep_8bit=(), symmetric=True)),
    ):
        folder = tmp_path / fmt
        hf = save_tiny_model(make_tiny_model("llama", tie=True), folder / "hf")
        manifest = export_model(hf, folder / "bundle", ExportOptions(quant=options, verify=False))
        checked = read_manifest(folder / "bundle")
        matrix = checked.matrices["model.embed_tokens.weight"]
        assert manifest["matrices"]["model.embed_tokens.weight"]["format"] == matrix.format == fmt
        embed = HostEmbedding(BundleWeights.of(checked), matrix)
        table = as_float(quantize(as_float(load_source(hf).tensors["model.embed_tokens.weight"]), fmt, 32))
        ids = np.array([0, 5, 399, 17, 5])
        np.testing.assert_array_equal(embed(ids), table[ids])


def test_the_calibration_text_is_a_few_hundred_tokens_in_several_languages():
    docs = calibration_documents()
    text = "\n".join(docs)
    assert len(docs) >= 8
    for sample in ("Le train", "Der Wetterbericht", "El mercado", "今日は", "我们", "def ", '{"id"', "<|im_start|>"):
        assert sample in text
    from tiny_models import tiny_tokenizer_json
    from tokenizers import Tokenizer

    assert 300 <= sum(len(Tokenizer.from_str(tiny_tokenizer_json()).encode(d).ids) for d in docs) <= 3000


def test_a16w4_exports_int4_channels_and_passes_its_own_thresholds():
    bundle = npu_bundle("random", "a16w4")
    manifest = read_manifest(bundle).raw
    entry = manifest["graphs"]["npu"]
    assert entry["quantization"]["scheme"] == "a16w4"  # exported at all: its verification passed (else it raises)
    prefill = onnx.load(str(bundle / entry["files"]["prefill"]), load_external_data=False)
    kinds = {t.data_type for t in prefill.graph.initializer if t.name.endswith(".weight.T_quantized")}
    assert kinds == {onnx.TensorProto.INT4}


def cli(*args, expect=0):
    done = subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stderr
    return done


def test_the_cli_exports_an_npu_variant_and_prints_its_verification(tmp_path):
    hf = save_tiny_model(make_tiny_model("llama", tie=True), tmp_path / "hf")
    done = cli(
        "export", str(hf), "-o", str(tmp_path / "b"), "--profile", "npu", "--npu-chunk", "8", "--npu-context", "32"
    )
    assert "NPU verification" in done.stdout and "passed" in done.stdout
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["graphs"]["npu"]["chunk"], manifest["graphs"]["npu"]["context"]) == (8, 32)
    report = json.loads(cli("doctor", str(tmp_path / "b"), "--json").stdout)
    assert report["npu"]["bundle"]["graphs"]["context"] == 32
    info = json.loads(cli("info", str(tmp_path / "b"), "--json").stdout)
    assert info["npu"]["quantization"] == "a16w8" and info["npu"]["verification"]["passed"]
    assert "NPU verification" in cli("info", str(tmp_path / "b")).stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--profile", "gpu"], "--profile must be one of cpu, npu"),
        (["--profile", "npu", "--npu-quant", "a8w2"], "--npu-quant must be one of a16w8, a16w4"),
        (["--profile", "npu", "--npu-chunk", "1"], "--npu-chunk must be 2.."),
        (["--profile", "npu", "--npu-chunk", "64", "--npu-context", "32"], "--npu-chunk must be 2..32"),
    ],
)
def test_bad_npu_export_options_are_one_error_line_and_no_bundle(tmp_path, flags, message):
    hf = save_tiny_model(make_tiny_model("llama", tie=True), tmp_path / "hf")
    done = cli("export", str(hf), "-o", str(tmp_path / "b"), *flags, expect=1)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert not (tmp_path / "b").exists()


def test_the_npu_runtime_modules_import_without_the_export_packages(tmp_path):
    from test_lean_import import run_blocked

    body = """
        import importlib
        import json

        for name in ("edgellm.backends.npu.host", "edgellm.backends.npu.session", "edgellm.cli.info",
                     "edgellm.backends.npu.backend"):
            importlib.import_module(name)
        print(json.dumps(heavy_modules_loaded()))
    """
    result = run_blocked(body, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_qnn_missing_is_a_clear_error_that_says_what_to_install(monkeypatch):
    """Runs with or without onnxruntime-qnn: where it is installed, its import is made to fail."""
    import edgellm
    from edgellm.errors import NpuError

    trained = npu_bundle("trained")
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import fails as if it were not installed
    with pytest.raises(NpuError, match="pip install onnxruntime-qnn"):
        edgellm.load(trained, backend="npu")
    blocker = (
        "import sys; sys.modules['onnxruntime_qnn'] = None; from edgellm.cli.app import main; "
        "sys.argv[0] = 'edgellm'; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker, "run", str(trained), "Hi", "--backend", "npu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the NPU backend needs onnxruntime-qnn") and "pip install" in lines[0]


def test_doctor_sizes_an_npu_run_for_the_graphs_window_and_reports_a_bundle_without_them(bundle, tiny_llama_bundle):
    from edgellm.cli.doctor import memory_report
    from edgellm.settings import RuntimeSettings

    npu = RuntimeSettings.resolve(environ={}, board="none", backend="npu")
    assert memory_report(npu, bundle)["bundle"]["context"] == NPU_CONTEXT  # not the default 2048
    assert "no NPU graphs" in memory_report(npu, tiny_llama_bundle)["bundle"]["error"]
