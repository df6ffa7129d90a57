"""The real model end to end: `edgellm export default` and `edgellm info` on the command line, and
SmolLM2 written out as a float Hugging Face folder exports to (nearly) the same bundle."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
from safetensors.numpy import save_file

from edgellm.default_model import default_gguf_path
from edgellm.export.canonical import as_float
from edgellm.export.exporter import export_model
from edgellm.export.gguf_source import load_gguf
from edgellm.export.verify import run_onnx_logits
from edgellm.manifest import read_manifest


def edgellm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


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


def write_float_hf_folder(folder):
    """SmolLM2 dequantized to fp32 and saved the way transformers would save it."""
    model = load_gguf(default_gguf_path())
    folder.mkdir()
    save_file({name: np.ascontiguousarray(as_float(t)) for name, t in model.tensors.items()},
              str(folder / "model.safetensors"))
    c = model.config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
              "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
              "bos_token_id": model.tokenizer.bos_token_id, "eos_token_id": model.tokenizer.eos_token_ids[0]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(model.tokenizer.tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": model.tokenizer.chat_template, "add_bos_token": False, **model.tokenizer.special_tokens}))
    return folder


def test_smollm2_as_a_float_hf_folder_exports_to_the_same_model(tmp_path, smollm2_bundle):
    folder = write_float_hf_folder(tmp_path / "hf")
    bundle = tmp_path / "from-float"
    manifest = export_model(folder, bundle)
    assert manifest["verification"]["passed"]
    assert manifest["provenance"]["source"]["format"] == "hf"
    assert len(manifest["quantization"]["quantized"]) == 211  # quantized by us this time
    # Q4_1 values re-quantized on the same 32-blocks land on the same grid: the two bundles agree.
    ids = list(range(100, 160))
    logits = []
    for b in (bundle, smollm2_bundle):
        session = ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"])
        logits.append(run_onnx_logits(session, read_manifest(b).config, ids, decode_steps=2))
    nmse = np.mean((logits[0] - logits[1]) ** 2) / np.mean(logits[1] ** 2)
    assert nmse < 1e-4
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).mean() >= 0.95
