"""SmolLM2-135M with --profile npu (a16w8): its graphs against the float reference over 128 tokens on
ONNX Runtime's CPU provider, and a 64-token prefill plus 4 decode steps on the HTP simulator."""

import time

import numpy as np
import pytest
from conftest import FIXTURES
from npu_support import cpu_provider_decoder

pytestmark = pytest.mark.system  # runs the HTP simulator (onnxruntime-qnn)

GOLDEN_TOKENS = 128


@pytest.fixture(scope="module")
def smollm2_npu(tmp_path_factory):
    from edgellm.export.exporter import export_model
    from edgellm.export.options import ExportOptions

    bundle = tmp_path_factory.mktemp("smollm2-npu") / "bundle"
    started = time.perf_counter()
    manifest = export_model("default", bundle, ExportOptions(profile="npu"))  # chunk 64, context 512, a16w8
    report = manifest["graphs"]["npu"]["verification"]
    print(
        f"\nexport --profile npu: {time.perf_counter() - started:.0f} s; verification on "
        f"{len(report['prompts'])} prompts: top-1 {report['mean_top1']:.3f}, KL {report['mean_kl']:.4f}"
    )
    return bundle, manifest


@pytest.fixture(scope="module")
def golden_ids(smollm2_npu):
    from edgellm.bundle.manifest import read_manifest
    from edgellm.generate.tokenizer import BundleTokenizer

    bundle, _ = smollm2_npu
    ids = BundleTokenizer.of(read_manifest(bundle)).encode((FIXTURES / "golden_text.txt").read_text())
    assert len(ids) >= GOLDEN_TOKENS
    return ids[:GOLDEN_TOKENS]


@pytest.mark.slow
def test_smollm2_npu_graphs_agree_with_the_float_reference_over_128_tokens(smollm2_npu, golden_ids):
    """Done when #2, accuracy: teacher-forced over 128 tokens (64 through the prefill graph, 64 decode
    steps) on the CPU provider, top-1 >= 90% against the numpy reference over the source's float weights."""
    from edgellm.bundle.manifest import read_manifest
    from edgellm.export.canonical import as_float
    from edgellm.export.exporter import load_source
    from edgellm.export.reference import ReferenceModel
    from edgellm.export.verify.npu import teacher_forced_logits
    from edgellm.export.verify.numerics import kl_divergence

    bundle, _ = smollm2_npu
    manifest = read_manifest(bundle)
    source = load_source("default")
    reference = ReferenceModel(manifest.config, {n: as_float(t) for n, t in source.tensors.items()})
    expected = reference.forward(golden_ids)
    actual = teacher_forced_logits(cpu_provider_decoder(manifest), golden_ids, decode_steps=64)
    top1 = float(np.mean(actual.argmax(-1) == expected.argmax(-1)))
    kl = float(kl_divergence(expected, actual).mean())
    print(
        f"\nteacher-forced over {len(golden_ids)} tokens, NPU graphs on the CPU provider vs the float reference: "
        f"top-1 {top1:.3f}, mean KL {kl:.4f}"
    )
    assert top1 >= 0.90
    assert kl < 0.05


@pytest.mark.slow
def test_smollm2_prefills_64_tokens_and_decodes_4_on_the_htp_simulator(smollm2_npu, golden_ids):
    """Done when #2, the simulator: a 64-token prompt in one prefill call and 4 decode steps, CPU fallback
    disabled; each step's distribution matches the same graphs on the CPU provider."""
    pytest.importorskip("onnxruntime_qnn", reason="the NPU backend needs onnxruntime-qnn (pip install 'edgellm[npu]')")
    import edgellm
    from edgellm.export.verify.numerics import kl_divergence

    bundle, _ = smollm2_npu
    started = time.perf_counter()
    model = edgellm.load(bundle, backend="npu")
    load_seconds = time.perf_counter() - started
    backend, prompt = model.backend, golden_ids[:64]
    started = time.perf_counter()
    rows = [backend.forward(prompt)]
    prefill_seconds = time.perf_counter() - started
    tokens = [int(rows[0].argmax())]
    started = time.perf_counter()
    for _ in range(4):
        rows.append(backend.forward([tokens[-1]]))
        tokens.append(int(rows[-1].argmax()))
    decode_seconds = time.perf_counter() - started
    cpu = cpu_provider_decoder(model.manifest)
    expected = [cpu.forward(prompt)[-1]] + [cpu.forward([t])[-1] for t in tokens[:-1]]
    kl = kl_divergence(np.stack(expected), np.stack(rows))
    loads = ", ".join(f"{r['graph']} {r['seconds']:.1f} s" for r in backend.loads)
    print(
        f"\nHTP simulator (soc {backend.describe()['soc_model']}): load {load_seconds:.1f} s "
        f"({loads}), prefill of 64 tokens "
        f"{prefill_seconds:.1f} s, 4 decode steps {decode_seconds:.1f} s; greedy: {model.tokenizer.decode(tokens)!r}; "
        f"KL vs the CPU provider per step {np.round(kl, 4).tolist()}"
    )
    assert backend.position == 68
    assert np.isfinite(np.stack(rows)).all()
    assert [int(e.argmax()) for e in expected] == tokens
    assert kl.max() < 0.05
