"""A manifest is checked completely before anything uses it: paths that leave the bundle are refused
before a byte outside it is read, and any field of the wrong type or out of range ends in one
BundleError that names the field, on both CPU backends and in `edgellm info`."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import edgellm
from edgellm.bundle.manifest import check_document, read_manifest
from edgellm.cli.info import summarize
from edgellm.errors import BundleError
from edgellm.model import Model
from edgellm.settings import RuntimeSettings

BACKENDS = ("native", "onnxruntime")


@pytest.fixture(scope="module")
def pristine(tiny_llama_bundle, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_llama_bundle, tmp_path_factory.mktemp("manifest-checks") / "bundle"))


def raw(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def rewrite(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# ---- opens outside the bundle -----------------------------------------------------------------

_opened: list[str] = []
_recording = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _recording.is_set() and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed: it records only inside `recording_opens`


@contextmanager
def recording_opens():
    _opened.clear()
    _recording.set()
    try:
        yield _opened
    finally:
        _recording.clear()


def outside(paths: list[str], bundle: Path) -> list[str]:
    """The opened paths that are neither inside the bundle nor part of Python's installation (lazy imports)
    nor the machine's description (board detection reads /proc/cpuinfo and the device tree, the memory
    check /proc/meminfo and the cgroup)."""
    root = os.path.realpath(bundle)
    allowed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path, "/proc", "/sys") if p}
    return [
        p
        for p in paths
        if os.path.commonpath([os.path.realpath(p), root]) != root
        and not any(os.path.realpath(p).startswith(a + os.sep) for a in allowed)
    ]


def a_path_field(manifest: dict, field: str, value: str) -> dict:
    """`manifest` with the path field `field` set to `value` (for `files`: the key of weights.bin's entry)."""
    manifest = copy.deepcopy(manifest)
    if field == "files":
        manifest["files"][value] = manifest["files"].pop("weights.bin")
    elif field == "tokenizer.file":
        manifest["tokenizer"]["file"] = value
    elif field == "graphs.cpu.file":
        manifest["graphs"]["cpu"]["file"] = value
    return manifest


PATH_FIELDS = ("files", "tokenizer.file", "graphs.cpu.file")


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("target", ["../secret.json", "/etc/passwd", "/dev/zero", "a symlink out of the bundle"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_path_that_leaves_the_bundle_is_refused_before_anything_outside_is_opened(
    pristine, tmp_path, field, target, backend
):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"secret": "x" * 631}))
    manifest = raw(bundle)
    if target == "a symlink out of the bundle":
        name = {"files": "weights.bin", "tokenizer.file": "tokenizer.json", "graphs.cpu.file": "model.onnx"}[field]
        (bundle / name).unlink()
        (bundle / name).symlink_to(secret)
        foreign = secret
    else:
        rewrite(bundle, a_path_field(manifest, field, target))
        foreign = Path(os.path.normpath(bundle / target))
    with recording_opens() as opened:
        with pytest.raises(BundleError) as failure:
            edgellm.load(bundle, backend=backend)
    assert outside(opened, bundle) == [], f"opened outside the bundle: {outside(opened, bundle)}"
    message = str(failure.value)
    if foreign.exists() and foreign.is_file():
        assert f"{foreign.stat().st_size} bytes" not in message  # nothing about the foreign file is disclosed
    assert "manifest.json" in message or bundle.name in message


@pytest.mark.parametrize("role", ["prefill", "decode", "weights"])
@pytest.mark.parametrize("target", ["../secret.onnx", "/etc/passwd", "/dev/zero"])
def test_an_npu_graph_path_that_leaves_the_bundle_is_refused_unopened(tmp_path, role, target):
    from npu_support import npu_bundle

    bundle = Path(shutil.copytree(npu_bundle("random"), tmp_path / "bundle"))
    (tmp_path / "secret.onnx").write_bytes(b"x" * 631)
    manifest = raw(bundle)
    manifest["graphs"]["npu"]["files"][role] = target
    rewrite(bundle, manifest)
    with recording_opens() as opened:
        with pytest.raises(BundleError, match=f"graphs.npu.files.{role}") as failure:
            read_manifest(bundle)
    assert outside(opened, bundle) == []
    assert "631 bytes" not in str(failure.value)


def test_the_manifest_itself_as_a_symlink_out_of_the_bundle_is_refused_unread(pristine, tmp_path):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(bundle / "manifest.json", elsewhere)
    (bundle / "manifest.json").symlink_to(elsewhere)
    with recording_opens() as opened:
        with pytest.raises(BundleError, match="outside the bundle"):
            read_manifest(bundle)
    assert outside(opened, bundle) == []


def test_a_symlink_that_stays_inside_the_bundle_is_followed(pristine, tmp_path):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    (bundle / "data").mkdir()
    shutil.move(bundle / "tokenizer.json", bundle / "data" / "tokenizer.json")
    (bundle / "tokenizer.json").symlink_to(Path("data") / "tokenizer.json")
    with edgellm.load(bundle, backend="onnxruntime") as model:
        assert model.encode("Hello")


def test_a_listed_file_that_is_a_fifo_is_refused_without_blocking(pristine, tmp_path):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    (bundle / "tokenizer.json").unlink()
    os.mkfifo(bundle / "tokenizer.json")
    with pytest.raises(BundleError, match="not a regular file"):
        read_manifest(bundle)


# ---- every field, every type ------------------------------------------------------------------


def leaf_paths(value, path=()) -> list[tuple]:
    """Every field of the document (objects and lists included), as key/index paths; long tables sampled."""
    paths = [path] if path else []
    if isinstance(value, dict):
        items = list(value.items())
        if len(items) > 12:  # the tensor and matrix tables: their first, a layer's and their last entries
            items = items[:4] + items[len(items) // 2 : len(items) // 2 + 2] + items[-2:]
        for key, item in items:
            paths += leaf_paths(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:2]):
            paths += leaf_paths(item, path + (i,))
    return paths


def set_path(document: dict, path: tuple, value) -> dict:
    document = copy.deepcopy(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def names_the_field(message: str, path: tuple) -> bool:
    return any(str(part) in message for part in path if not isinstance(part, int))


def attempt(bundle: Path, document: dict) -> BundleError | None:
    """Check the document, then run it where it passed: info, and a few tokens on both backends.
    Returns the BundleError, or None when everything ran; any other exception fails the test."""
    try:
        manifest = check_document(bundle, document)
        summarize(manifest)
        for backend in BACKENDS:
            with Model(manifest, RuntimeSettings(backend=backend, threads=1, context_length=32)) as model:
                model.generate([1, 2, 3], max_tokens=2, temperature=0)
    except BundleError as error:
        return error
    return None


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.lists(st.integers(0, 8), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def document(pristine) -> dict:
    return raw(pristine)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_field_set_to_any_json_value_ends_in_a_bundle_error_naming_it_or_a_clean_run(pristine, document, data):
    path = data.draw(st.sampled_from(leaf_paths(document)), label="field")
    value = data.draw(JSON_VALUES, label="value")
    error = attempt(pristine, set_path(document, path, value))
    event("refused" if error is not None else "loaded and ran")
    if error is not None:
        assert names_the_field(str(error), path), f"{path} = {value!r}: {error}"


WRONG_TYPES = {
    "a string": "8192",
    "a list": [1],
    "an object": {"a": 1},
    "true": True,
    "null": None,
    "a huge number": 10**30,
    "a negative number": -5,
    "a fraction": 0.5,
}


def json_type(value) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", list: "list", dict: "dict", type(None): "null"}[
        type(value)
    ]


@pytest.mark.parametrize(
    "path",
    [
        ("format",),
        ("format_version",),
        ("model",),
        ("model", "vocab_size"),
        ("model", "max_position_embeddings"),
        ("model", "num_key_value_heads"),
        ("model", "rms_norm_eps"),
        ("model", "tie_word_embeddings"),
        ("files",),
        ("files", "weights.bin"),
        ("files", "weights.bin", "bytes"),
        ("tensors",),
        ("matrices",),
        ("tokenizer",),
        ("tokenizer", "eos_token_ids"),
        ("tokenizer", "add_bos_token"),
        ("tokenizer", "special_tokens"),
        ("tokenizer", "file"),
        ("graphs",),
        ("graphs", "cpu", "file"),
        ("provenance",),
        ("verification", "prompts"),
    ],
)
def test_a_required_field_of_another_type_is_refused_naming_it(pristine, document, path):
    original = document
    for key in path:
        original = original[key]
    for label, value in WRONG_TYPES.items():
        if json_type(value) == json_type(original) and not isinstance(value, (int, float)):
            continue
        error = attempt(pristine, set_path(document, path, value))
        if error is None:  # only values of the field's own type and range may pass
            assert json_type(value) == json_type(original), f"{path} = {label} was accepted"
            continue
        assert names_the_field(str(error), path), f"{path} = {label}: {error}"


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m["model"].update(vocab_size=1000), "vocab_size"),
        (lambda m: m["model"].update(num_key_value_heads=1), "num_key_value_heads"),
        (lambda m: m["model"].update(max_position_embeddings=-5), "max_position_embeddings"),
        (lambda m: m["tokenizer"].update(bos_token_id=10**9), "bos_token_id"),
        (lambda m: m["tokenizer"].update(eos_token_ids="2"), "eos_token_ids"),
        (lambda m: m["tokenizer"].update(eos_token_ids=[400]), "eos_token_ids"),
        (lambda m: m.update(files=[]), "files"),
        (lambda m: m["files"]["weights.bin"].pop("bytes"), "bytes"),
        (lambda m: m.update(model=[]), "model"),
        (lambda m: m["tokenizer"].update(special_tokens=[]), "special_tokens"),
        (lambda m: m.update(tokenizer="tokenizer.json"), "tokenizer"),
        (lambda m: m.update(tensors=[]), "tensors"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_reported_cases_are_refused_on_both_backends(pristine, tmp_path, change, field, backend):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    manifest = raw(bundle)
    change(manifest)
    rewrite(bundle, manifest)
    with pytest.raises(BundleError, match=field):
        edgellm.load(bundle, backend=backend)


def test_a_deeply_nested_or_huge_manifest_is_one_clear_error(pristine, tmp_path):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="manifest.json"):
        read_manifest(bundle)
    (bundle / "manifest.json").write_text('{"format": ' + "1" * 5000 + "}")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle)
