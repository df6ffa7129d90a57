"""Every user mistake in `edgellm export` and `edgellm info` ends in one `error:` line and no half bundle.

These tests run the real command line in a subprocess, as a user would, and check the whole
contract: a non-zero exit code, exactly one non-empty line on stderr that starts with `error:`
and names the problem, no traceback anywhere, and no bundle folder (nor a `.NAME.tmp-*` staging
folder) left behind. The real 98 MB GGUF is only ever copied in truncated pieces here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_model, save_tiny_model, tiny_tokenizer_json

from edgellm.default_model import default_gguf_path

BUNDLE_FILES = {"manifest.json", "model.onnx", "weights.bin", "tokenizer.json"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgellm", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def leftovers(folder: Path) -> list[str]:
    """Staging (`.NAME.tmp-PID`) or retired (`.NAME.old-PID`) folders a failed export left behind."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The error contract; returns the error line so a test can check more about it."""
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("error:"), shown
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in the error line\n{shown}"
    return line


def assert_no_bundle(output: Path) -> None:
    assert not output.exists(), f"{output} was left behind: {sorted(p.name for p in output.iterdir())}"
    assert leftovers(output.parent) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory) -> Path:
    """An untied fp32 tiny llama, saved as a Hugging Face folder; tests copy it before breaking it."""
    return save_tiny_model(make_tiny_model("llama", tie=False), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_bundle(tiny_hf_folder, tmp_path_factory) -> Path:
    """The tiny llama exported once (with verification); tests copy it before changing it."""
    where = tmp_path_factory.mktemp("tiny-bundle")
    result = run_cli("export", tiny_hf_folder, "-o", "bundle", cwd=where)
    assert result.returncode == 0, result.stderr
    return where / "bundle"


# ------------------------------------------------------------------------------- GGUF sources


@pytest.fixture(scope="module")
def truncation_points(real_gguf) -> dict[str, int]:
    """Byte counts that cut the real GGUF in each of its sections (parsing it takes seconds: once)."""
    import gguf

    reader = gguf.GGUFReader(str(real_gguf))
    first, later = reader.tensors[0], reader.tensors[len(reader.tensors) // 2]
    assert first.data_offset == reader.data_offset  # the first tensor starts the data section
    return {
        "inside the header": 20,  # magic, version, tensor count, half of the key-value count
        "inside the metadata": reader.data_offset // 2,  # somewhere in the tokenizer's token list
        "inside the first tensor": first.data_offset + first.n_bytes // 2,
        "inside a later tensor": later.data_offset + later.n_bytes // 2,
    }


TRUNCATIONS = ["inside the header", "inside the metadata", "inside the first tensor", "inside a later tensor"]


@pytest.mark.slow  # cuts the real SmolLM2 GGUF four ways
@pytest.mark.parametrize("where", TRUNCATIONS)
def test_a_truncated_gguf_fails_with_one_line_naming_the_file(where, real_gguf, truncation_points, tmp_path):
    size = truncation_points[where]
    with open(real_gguf, "rb") as handle:
        (tmp_path / "cut.gguf").write_bytes(handle.read(size))
    result = run_cli("export", "cut.gguf", "-o", "bundle", "--no-verify", cwd=tmp_path)
    assert_one_line_error(result, "cut.gguf", "truncated")
    assert_no_bundle(tmp_path / "bundle")


def _write_gpt2_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_name("tiny gpt2")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_of_an_unsupported_architecture_fails_listing_the_supported_ones(tmp_path):
    from edgellm.bundle.architectures import GGUF_ARCHITECTURES

    _write_gpt2_gguf(tmp_path / "gpt2.gguf")
    result = run_cli("export", "gpt2.gguf", "-o", "bundle", cwd=tmp_path)
    line = assert_one_line_error(result, "gpt2.gguf", "'gpt2'", "not supported")
    for arch in GGUF_ARCHITECTURES:
        assert arch in line.split("'gpt2'", 1)[1], f"supported architecture {arch!r} not listed: {line}"
    assert_no_bundle(tmp_path / "bundle")


# --------------------------------------------------------------------- Hugging Face folders


def _folder_without_config(folder: Path, contents: str) -> None:
    from safetensors.numpy import save_file

    folder.mkdir()
    if "tokenizer" in contents:
        (folder / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    if "safetensors" in contents:
        save_file({"model.embed_tokens.weight": np.zeros((4, 8), np.float32)}, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "contents", ["tokenizer.json only", "model.safetensors only", "tokenizer and safetensors", "nothing"]
)
def test_a_hugging_face_folder_without_config_json_fails_saying_so(contents, tmp_path):
    _folder_without_config(tmp_path / "model", contents)
    result = run_cli("export", "model", "-o", "bundle", cwd=tmp_path)
    assert_one_line_error(result, "model", "no config.json")
    assert_no_bundle(tmp_path / "bundle")


def test_a_safetensors_shape_that_disagrees_with_config_json_names_the_tensor(tiny_hf_folder, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(tiny_hf_folder, tmp_path / "model")
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="numpy") as reader:
        metadata = reader.metadata()
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.up_proj.weight"
    rows, cols = tensors[name].shape
    tensors[name] = np.zeros((rows // 2, cols), np.float32)  # as if config.json said another ffn size
    save_file(tensors, str(weights), metadata)

    result = run_cli("export", "model", "-o", "bundle", cwd=tmp_path)
    assert_one_line_error(result, name, f"({rows // 2}, {cols})", "config.json")
    assert_no_bundle(tmp_path / "bundle")


# ------------------------------------------------------------------------ paths and options


def test_an_output_path_that_is_a_file_fails_and_the_file_is_untouched(tiny_hf_folder, tmp_path):
    (tmp_path / "bundle").write_text("not a folder\n")
    result = run_cli("export", tiny_hf_folder, "-o", "bundle", cwd=tmp_path)
    assert_one_line_error(result, "bundle", "not a folder")
    assert (tmp_path / "bundle").read_text() == "not a folder\n"
    assert leftovers(tmp_path) == []


def test_an_existing_bundle_is_left_untouched_without_force(tiny_bundle, tiny_hf_folder, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    before = snapshot(bundle)
    result = run_cli("export", tiny_hf_folder, "-o", "bundle", cwd=tmp_path)
    assert_one_line_error(result, "bundle", "already exists", "--force")
    assert snapshot(bundle) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "contents",
    ["a folder of notes", "a bundle with a file of the user's in it", "a manifest that is not an edgellm bundle's"],
)
def test_force_onto_a_folder_that_is_not_only_a_bundle_fails_and_leaves_it_byte_for_byte(
    tiny_bundle, tiny_hf_folder, tmp_path, contents
):
    folder = tmp_path / "DIR"
    if contents == "a folder of notes":
        (folder / "sub").mkdir(parents=True)
        (folder / "notes.txt").write_text("my notes\n")
        (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    elif contents == "a bundle with a file of the user's in it":
        shutil.copytree(tiny_bundle, folder)
        (folder / "notes.txt").write_text("my notes\n")
    else:
        folder.mkdir()
        (folder / "manifest.json").write_text('{"format": "something-else", "files": {}}')
    before = snapshot(folder)
    result = run_cli("export", tiny_hf_folder, "-o", "DIR", "--force", cwd=tmp_path)
    assert_one_line_error(result, "DIR", "--force replaces only a bundle")
    assert snapshot(folder) == before
    assert leftovers(tmp_path) == []


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tiny_hf_folder, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "export", str(tiny_hf_folder), "-o", "bundle"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = tmp_path / f".bundle.tmp-{process.pid}"
    deadline = time.monotonic() + 120
    while not staging.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert staging.is_dir(), "the export finished (or never staged) before it could be killed"
    assert leftovers(tmp_path) == [staging.name]
    result = run_cli("export", tiny_hf_folder, "-o", "bundle", "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == []


def test_an_output_under_a_missing_folder_fails_naming_the_folder(tiny_hf_folder, tmp_path):
    result = run_cli("export", tiny_hf_folder, "-o", "missing/bundle", cwd=tmp_path)
    assert_one_line_error(result, "missing", "does not exist")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "source, phrases",
    [
        ("no-such-model", ("no-such-model", "no such file")),
        ("no-such-model.gguf", ("no-such-model.gguf", "no such file")),
        ("notes.txt", ("notes.txt", "not a GGUF file or a model folder")),
        ("notes.gguf", ("notes.gguf", "not a readable GGUF file")),
    ],
)
def test_a_source_that_is_missing_or_not_a_model_fails_naming_it(source, phrases, tmp_path):
    for name in ("notes.txt", "notes.gguf"):
        (tmp_path / name).write_text("These are my notes, not a model.\n" * 10)
    result = run_cli("export", source, "-o", "bundle", cwd=tmp_path)
    assert_one_line_error(result, *phrases)
    assert_no_bundle(tmp_path / "bundle")


# ---------------------------------------------------------------- success, --force and info


def test_a_tiny_model_exports_into_a_complete_bundle(tiny_bundle):
    assert {p.name for p in tiny_bundle.iterdir()} == BUNDLE_FILES
    assert leftovers(tiny_bundle.parent) == []
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "llama"
    assert manifest["verification"]["passed"] is True


def test_force_replaces_an_existing_bundle_without_leftovers(tiny_bundle, tiny_hf_folder, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    (bundle / "npu_cache").mkdir()  # what the runtime itself may add to a bundle
    old_manifest = json.loads((bundle / "manifest.json").read_text())
    assert old_manifest["quantization"]["options"]["bits"] == 4

    result = run_cli("export", tiny_hf_folder, "-o", "bundle", "--force", "--bits", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES  # the old folder is gone, not merged
    new_manifest = json.loads((bundle / "manifest.json").read_text())
    assert new_manifest["quantization"]["options"]["bits"] == 8
    assert new_manifest["files"]["weights.bin"] != old_manifest["files"]["weights.bin"]
    assert leftovers(tmp_path) == []


def test_info_prints_a_bundle_as_a_table_and_as_json(tiny_bundle):
    table = run_cli("info", tiny_bundle, cwd=tiny_bundle.parent)
    assert table.returncode == 0, table.stderr
    assert "llama" in table.stdout and table.stderr.strip() == ""

    as_json = run_cli("info", tiny_bundle, "--json", cwd=tiny_bundle.parent)
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["architecture"] == "llama"
    assert summary["layers"] == 2


@pytest.mark.parametrize("what", ["a folder without manifest.json", "a missing folder"])
def test_info_on_something_that_is_not_a_bundle_fails_with_one_line(what, tmp_path):
    if what == "a folder without manifest.json":
        (tmp_path / "bundle").mkdir()
        (tmp_path / "bundle" / "weights.bin").write_bytes(b"\0" * 64)
        phrases = ("manifest.json", "missing")
    else:
        phrases = ("bundle", "not a bundle folder")
    for args in (["info", "bundle"], ["info", "bundle", "--json"]):
        result = run_cli(*args, cwd=tmp_path)
        assert_one_line_error(result, *phrases)
        assert result.stdout.strip() == ""
