"""The real model end to end: `edgellm export default` and `edgellm info` on the command line, and
SmolLM2 written out as a float Hugging Face folder exports to (nearly) the same bundle."""

import json
import subprocess
import sys

import pytest

from edgellm.bundle.manifest import read_manifest
from edgellm.default_model import default_gguf_path
from edgellm.export.exporter import export_model
from edgellm.export.sources.float_hf import write_float_hf_folder
from edgellm.export.verify.cpu import onnxruntime_backend
from edgellm.export.verify.numerics import nmse, top1

pytestmark = pytest.mark.slow  # exports the real SmolLM2


def edgellm(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_export_default_and_info_on_the_command_line(tmp_path):
    bundle = tmp_path / "smollm2"
    done = edgellm("export", "default", "-o", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "verification" in done.stdout and "passed" in done.stdout
    manifest = read_manifest(bundle).raw
    assert manifest["verification"]["passed"]
    assert len(manifest["quantization"]["carried_over"]) == 211  # every Q4_1/Q8_0 matrix, none re-quantized
    assert manifest["quantization"]["quantized"] == []
    shown = edgellm("info", str(bundle))
    assert shown.returncode == 0 and "134,515,008" in shown.stdout and "int4_asym" in shown.stdout
    summary = json.loads(edgellm("info", str(bundle), "--json").stdout)
    assert summary["architecture"] == "llama" and summary["layers"] == 30
    assert summary["source"]["sha256"] == manifest["provenance"]["source"]["sha256"]


def test_smollm2_as_a_float_hf_folder_exports_to_the_same_model(tmp_path, smollm2_bundle):
    folder = write_float_hf_folder(default_gguf_path(), tmp_path / "hf")
    bundle = tmp_path / "from-float"
    manifest = export_model(folder, bundle)
    assert manifest["verification"]["passed"]
    assert manifest["provenance"]["source"]["format"] == "hf"
    assert len(manifest["quantization"]["quantized"]) == 211  # quantized by us this time
    # Q4_1 values re-quantized on the same 32-blocks land on the same grid: the two bundles agree.
    ids = list(range(100, 160))
    logits = []
    for b in (bundle, smollm2_bundle):
        backend = onnxruntime_backend(read_manifest(b), len(ids))
        logits.append(backend.score(ids, decode_steps=2))
        backend.close()
    assert nmse(logits[0], logits[1]) < 1e-4
    assert top1(logits[0], logits[1]) >= 0.95
