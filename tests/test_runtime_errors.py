"""Bad input to the runtime: one clear error, a typed exception in Python, exit 1 in the CLI."""

import json
import shutil
import subprocess
import sys

import pytest

import edgellm
from edgellm.errors import BundleError, ContextOverflowError, InvalidSettingError, MemoryBudgetError


@pytest.fixture(scope="module")
def pristine(tiny_llama_bundle):
    return tiny_llama_bundle


@pytest.fixture
def bundle(pristine, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(pristine, copy)
    return copy


def cli(*args, stdin=None):
    done = subprocess.run(
        [sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, input=stdin, timeout=300
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def test_a_missing_file_is_a_bundle_error(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: missing"):
        edgellm.load(bundle)
    assert "tokenizer.json: missing" in cli("run", str(bundle), "hi")


def test_a_truncated_weights_file_is_a_bundle_error(bundle):
    data = (bundle / "weights.bin").read_bytes()
    (bundle / "weights.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        edgellm.load(bundle)
    assert "weights.bin" in cli("run", str(bundle), "hi")


def test_a_modified_graph_fails_its_hash(bundle):
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        edgellm.load(bundle)


def test_tampered_weights_are_caught_when_verification_is_asked_for(bundle, monkeypatch):
    data = bytearray((bundle / "weights.bin").read_bytes())
    data[1000] ^= 0x01
    (bundle / "weights.bin").write_bytes(bytes(data))
    # Files above the limit (real weights) are only hashed on request; make this small one count as large.
    monkeypatch.setattr("edgellm.bundle.manifest.HASH_AT_LOAD_LIMIT", 0)
    edgellm.load(bundle).close()
    with pytest.raises(BundleError, match="sha256"):
        edgellm.load(bundle, verify_weights=True)
    assert "sha256" in cli("run", str(bundle), "hi", "--verify-weights")


def test_a_manifest_of_a_newer_format_is_refused(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer"):
        edgellm.load(bundle)
    assert "upgrade edgellm" in cli("run", str(bundle), "hi")


def test_a_manifest_of_an_older_format_is_refused_with_how_to_export_again(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 1  # float32 block scales: the engine would read them as float16
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="older"):
        edgellm.load(bundle)
    assert "export it again" in cli("run", str(bundle), "hi")


@pytest.mark.parametrize("cached", [None, 1, "current"])
def test_the_default_bundle_is_exported_when_missing_or_of_another_format(tmp_path, monkeypatch, cached):
    from edgellm.bundle.format import FORMAT_VERSION
    from edgellm.cli import run as run_command

    folder = tmp_path / "smollm2"
    if cached is not None:
        folder.mkdir()
        version = FORMAT_VERSION if cached == "current" else cached
        (folder / "manifest.json").write_text(json.dumps({"format_version": version}))
    exports = []
    monkeypatch.setattr(run_command, "default_bundle_dir", lambda: folder)
    monkeypatch.setattr("edgellm.cli.export.require_export_extras", lambda: None)
    monkeypatch.setattr(
        run_command.subprocess,
        "run",
        lambda argv, **kw: exports.append((argv, kw)) or subprocess.CompletedProcess(argv, 0),
    )
    assert run_command.ensure_default_bundle() == folder
    assert len(exports) == (0 if cached == "current" else 1)
    if exports:
        argv, kw = exports[0]
        assert argv[-4:] == ["default", "-o", str(folder), "--force"]
        assert kw["cwd"] == folder.parent  # not wherever the user is: an edgellm/ folder there would shadow the package


@pytest.mark.parametrize("xdg, under_home", [(None, True), ("", True), ("relative/cache", True), ("/srv/cache", False)])
def test_the_cache_folder_follows_xdg_only_when_it_is_an_absolute_path(monkeypatch, tmp_path, xdg, under_home):
    from edgellm.bundle.format import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    expected = tmp_path / ".cache" / "edgellm" if under_home else tmp_path.__class__(xdg) / "edgellm"
    assert cache_root() == expected


def test_a_prompt_longer_than_the_context_is_refused(pristine):
    long_prompt = "word " * 400
    with edgellm.load(pristine, context_length=64) as model:
        with pytest.raises(ContextOverflowError, match="context holds 64"):
            model.generate(long_prompt, max_tokens=4)
    assert "context" in cli("run", str(pristine), "--raw", "--context", "64", long_prompt)


def test_a_context_that_does_not_fit_in_memory_is_refused_with_one_that_fits(pristine):
    from edgellm.backends.memory import estimate
    from edgellm.bundle.manifest import read_manifest
    from edgellm.settings import RuntimeSettings

    manifest, settings = read_manifest(pristine), RuntimeSettings.resolve()
    needs = {
        context: estimate(manifest, settings.backend, context, settings.prefill_chunk).total for context in (256, 512)
    }
    assert needs[256] < needs[512]
    with pytest.raises(MemoryBudgetError, match="context of 256 tokens fits") as error:  # a budget between the two
        edgellm.load(pristine, context_length=512, max_memory=(needs[256] + needs[512]) // 2)
    assert "--context" in str(error.value)
    assert "--max-memory" in cli("run", str(pristine), "hi", "--context", "512", "--max-memory", "20M")


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--min-p", "2"], "min_p"),
    ],
)
def test_invalid_sampling_values_are_refused(pristine, flags, field):
    assert field in cli("run", str(pristine), "hi", *flags)
    with edgellm.load(pristine) as model:
        name, value = flags[0].lstrip("-").replace("-", "_"), float(flags[1])
        with pytest.raises(InvalidSettingError, match=field):
            model.generate("hi", **{name: int(value) if name == "top_k" else value})


def test_invalid_runtime_settings_are_refused(pristine):
    with pytest.raises(InvalidSettingError, match="threads"):
        edgellm.load(pristine, threads=-1)
    assert "max_memory" in cli("run", str(pristine), "hi", "--max-memory", "lots")
    assert "max_tokens" in cli("run", str(pristine), "hi", "--max-tokens", "0")
