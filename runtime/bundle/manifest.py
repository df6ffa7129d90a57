"""A bundle's manifest.json, read once into typed facts that every backend and command shares.

The manifest comes from a file the user was given, so it is checked completely before anything
uses it: every field's JSON type (SCHEMA), every value's range, and the rules between fields:

  - every file it names is a plain relative path (no `..`, no absolute path) to a regular file
    inside the bundle (a symlink only if it resolves inside), listed in `files` with its size,
    which must match; files up to HASH_AT_LOAD_LIMIT also match their sha256 (weights.bin with
    --verify-weights). Paths are judged by their spelling before the file system is touched, so
    nothing outside the bundle is opened, read or sized;
  - the tensor index lies inside weights.bin, aligned, each entry's dtype and shape its byte count;
  - each quantized matrix names its arrays with the shapes its format implies, and the decoder's
    tensors are all there with the shapes the model's hyper-parameters give (every backend reads
    them, so every backend gets this check);
  - token ids are ids of the vocabulary.

Any failure is one BundleError naming the manifest and the field, e.g.
`.../manifest.json: tokenizer.eos_token_ids[0]: expected a token id in [0, 49151], got 1000000000`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from edgellm.bundle.format import (
    ALIGN,
    FORMAT_NAME,
    FORMAT_VERSION,
    INV_FREQ,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    file_sha256,
    stream_sha256,
)
from edgellm.bundle.model_config import Expected, ModelConfig, decoder_matrices, decoder_vectors
from edgellm.bundle.quant_formats import BLOCK_SIZES, QUANT_FORMATS, n_blocks
from edgellm.errors import BundleError, EdgeLLMError

HINT = "the bundle is damaged or was edited; export the bundle again"
HASH_AT_LOAD_LIMIT = 16 * 2**20  # smaller files are hashed at every load; weights.bin on request
MANIFEST_LIMIT = 16 * 2**20  # bytes: SmolLM2's manifest is ~100 kB, a 300-tensor model's well under 1 MB
TEMPLATE_LIMIT = 1 << 20  # characters of chat template (real ones are 1-20 kB)
DTYPES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}
# A path a manifest may name: relative, '/'-separated parts of safe characters that never begin with
# a dot (so no '.', '..' or hidden names).
_SAFE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# -- the document's types ------------------------------------------------------------------------
class Opt:
    """A key that may be absent or null."""

    def __init__(self, spec: Any):
        self.spec = spec


class MapOf:
    """An object whose keys are names (tensors, files) and whose values all have one type."""

    def __init__(self, spec: Any):
        self.spec = spec


class Report:
    """A verification report: {"skipped": true} (export --no-verify), or an object of `spec`."""

    def __init__(self, spec: dict):
        self.spec = spec


Number = float  # in SCHEMA: an int or a float (JSON does not tell them apart reliably)
_SCALAR = (str, int, float, bool)
_ROW = {"prompt": str, "tokens": int, "finite": bool, "top1": Number}
_CPU_VERIFICATION = Report(
    {
        "engine": str,
        "against": str,
        "prompts": [{**_ROW, "nmse": Number, "max_abs": Number}],
        "worst_nmse": Number,
        "mean_top1": Number,
        "passed": bool,
        "thresholds": {"max_nmse": Number, "min_top1": Number},
    }
)
_NPU_VERIFICATION = Report(
    {
        "engine": str,
        "against": str,
        "prompts": [{**_ROW, "kl": Number}],
        "mean_top1": Number,
        "mean_kl": Number,
        "passed": bool,
        "thresholds": {"min_top1": Number, "max_kl": Number},
    }
)
SCHEMA = {  # what `edgellm export` writes; Opt marks values that may be null (or, for graphs.npu, absent)
    "format": str,
    "format_version": int,
    "model": {
        "name": Opt(str),
        "architecture": str,
        "vocab_size": int,
        "hidden_size": int,
        "intermediate_size": int,
        "num_hidden_layers": int,
        "num_attention_heads": int,
        "num_key_value_heads": int,
        "head_dim": int,
        "rms_norm_eps": Number,
        "rope_theta": Number,
        "max_position_embeddings": int,
        "tie_word_embeddings": bool,
        "attention_bias": bool,
        "rope_scaling": Opt(MapOf((str, Number))),
    },
    "files": MapOf({"bytes": int, "sha256": str}),
    "graphs": {
        "cpu": {"file": str, "inputs": [str], "outputs": [str], "kv_layout": str},
        "npu": Opt(
            {
                "files": {"prefill": str, "decode": str, "weights": str},
                "chunk": int,
                "context": int,
                "mask_value": Number,
                "io": MapOf(MapOf(MapOf([int]))),
                "kv_layout": str,
                "embedding": MapOf(str),
                "quantization": {
                    "scheme": str,
                    "format": str,
                    "activations": str,
                    "weights": str,
                    "kept_float": str,
                    "tool": str,
                    "calibration": {
                        "file": str,
                        "sha256": str,
                        "documents": int,
                        "tokens": int,
                        "stream_tokens": int,
                        "prefill_samples": int,
                        "decode_samples": int,
                        "method": str,
                    },
                },
                "verification": _NPU_VERIFICATION,
            }
        ),
    },
    "tensors": MapOf({"offset": int, "nbytes": int, "shape": [int], "dtype": str, "sha256": str}),
    "matrices": MapOf(
        {
            "format": str,
            "bits": int,
            "block": int,
            "rows": int,
            "cols": int,
            "source_format": str,
            "qweight": str,
            "scales": str,
            "mins": Opt(str),
        }
    ),
    "quantization": {
        "options": MapOf((_SCALAR, [str])),
        "carried_over": [str],
        "quantized": [{"name": str, "format": str, "block": int, "elements": int, "nmse": Number, "max_abs": Number}],
        "overall_nmse": Opt(Number),
    },
    "tokenizer": {
        "file": str,
        "bos_token_id": Opt(int),
        "eos_token_ids": [int],
        "pad_token_id": Opt(int),
        "unk_token_id": Opt(int),
        "add_bos_token": bool,
        "special_tokens": MapOf(str),
    },
    "chat_template": Opt(str),
    "provenance": {
        "source": MapOf(Opt(_SCALAR)),
        "exporter": str,
        "created": str,
        "export_seconds": Number,
        "warnings": [str],
    },
    "verification": _CPU_VERIFICATION,
}


def _describe(spec: Any) -> str:
    if isinstance(spec, Opt):
        return _describe(spec.spec) + " or null"
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, (dict, MapOf, Report)):
        return "an object"
    return {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}[spec]


def _show(value: Any) -> str:
    """A value for an error message: short, and never the repr of a deep structure."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    text = json.dumps(value) if isinstance(value, (bool, str)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is(value: Any, kind: Any) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


# -- typed facts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    name: str  # a relative path inside the bundle
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """An array of weights.bin: bytes [offset, offset + nbytes), `dtype` [shape]."""

    name: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, name: str, entry: Mapping[str, Any]) -> TensorEntry:
        return cls(name, entry["offset"], entry["nbytes"], tuple(entry["shape"]), entry["dtype"])


@dataclass(frozen=True)
class MatrixEntry:
    """A block-quantized [rows, cols] matrix and the tensors that hold it (quant_formats.py)."""

    name: str
    format: str
    bits: int
    block: int
    rows: int
    cols: int
    qweight: str
    scales: str
    mins: str | None
    source_format: str

    @classmethod
    def from_json(cls, name: str, m: Mapping[str, Any]) -> MatrixEntry:
        return cls(
            name,
            m["format"],
            m["bits"],
            m["block"],
            m["rows"],
            m["cols"],
            m["qweight"],
            m["scales"],
            m.get("mins"),
            m.get("source_format") or "",
        )


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    special_tokens: Mapping[str, str]


@dataclass(frozen=True)
class NpuGraphs:
    """The static-shape NPU graphs (`edgellm export --profile npu`)."""

    prefill_file: str
    decode_file: str
    weights_file: str
    chunk: int
    context: int
    mask_value: float
    scheme: str
    raw: Mapping[str, Any]  # the whole entry as checked against SCHEMA (quantization, verification, ...)

    @property
    def files(self) -> dict[str, str]:
        return {"prefill": self.prefill_file, "decode": self.decode_file, "weights": self.weights_file}


@dataclass(frozen=True)
class Manifest:
    """What a bundle says about itself, checked. `raw` is the JSON document (for reports)."""

    bundle: Path  # the folder as the user named it
    root: Path  # its real path: every file the manifest names resolves inside it
    format_version: int
    name: str | None
    config: ModelConfig
    files: Mapping[str, FileEntry]
    cpu_graph: str  # file name of the CPU decoder graph
    npu: NpuGraphs | None
    tensors: Mapping[str, TensorEntry]
    matrices: Mapping[str, MatrixEntry]
    tokenizer: TokenizerSpec
    chat_template: str | None
    raw: Mapping[str, Any]

    @property
    def source(self) -> Path:
        return self.bundle / MANIFEST_FILE

    def path(self, name: str) -> Path:
        """The path of a file the manifest lists (checked when the manifest was read)."""
        if name not in self.files:
            raise BundleError(f"{self.source}: {name} is not one of the bundle's files", HINT)
        return self.root / name

    def open(self, name: str) -> BinaryIO:
        """A listed file, opened for reading at its real path, which must still lie inside the bundle; a
        file swapped for a symlink or another file since the manifest was read is refused."""
        path = self.path(name)
        _check_inside(self.root, path, self.source, f"files[{json.dumps(name)}]")
        real = os.path.realpath(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except OSError as error:
            raise BundleError(f"{path}: cannot be opened ({error.strerror})", HINT) from None
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_size != self.files[name].bytes:
            os.close(fd)
            raise BundleError(f"{path}: changed while the bundle was being loaded", HINT)
        return os.fdopen(fd, "rb")

    def read_bytes(self, name: str) -> bytes:
        """A listed file's bytes, which must match its sha256 (read once: what is checked is what is used)."""
        with self.open(name) as handle:
            data = handle.read(self.files[name].bytes + 1)
        if len(data) != self.files[name].bytes or hashlib.sha256(data).hexdigest() != self.files[name].sha256:
            raise BundleError(
                f"{self.path(name)}: sha256 differs from the manifest",
                "the file was modified or damaged; export the bundle again",
            )
        return data

    def verify_file(self, name: str) -> None:
        """Hash a listed file (however large) against the manifest."""
        with self.open(name) as handle:
            digest = stream_sha256(handle)
        if digest != self.files[name].sha256:
            raise BundleError(
                f"{self.path(name)}: sha256 differs from the manifest",
                "the file was modified or damaged; export the bundle again",
            )


# -- reading -------------------------------------------------------------------------------------
def read_manifest(bundle: str | Path) -> Manifest:
    """The checked manifest of the bundle folder `bundle`; BundleError naming the file and field."""
    bundle, path, root = _bundle_paths(bundle)
    if not os.path.lexists(path):
        raise BundleError(f"{path}: missing", "the bundle is incomplete; export it again")
    _check_inside(root, path, path)
    size = path.stat().st_size
    if size > MANIFEST_LIMIT:
        raise BundleError(f"{path}: {size} bytes, larger than any manifest edgellm writes ({MANIFEST_LIMIT})", HINT)
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise BundleError(f"{path}: not valid JSON ({exc})", "the bundle is damaged; export it again") from None
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a manifest", HINT) from None
    return Checker(bundle, root, path).manifest(document)


def check_document(bundle: str | Path, document: Any) -> Manifest:
    """`document` (parsed JSON) checked as if it were the manifest.json of the folder `bundle`."""
    bundle, path, root = _bundle_paths(bundle)
    return Checker(bundle, root, path).manifest(document)


def _bundle_paths(bundle: str | Path) -> tuple[Path, Path, Path]:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder", "export one with: edgellm export SRC -o BUNDLE")
    return bundle, bundle / MANIFEST_FILE, Path(os.path.realpath(bundle))


def _check_inside(root: Path, path: Path, source: Path, where: str | None = None) -> None:
    """`path` (under `root`) resolves inside `root` and is a regular file."""
    label = f"{source}: {where}: " if where else f"{path}: "
    real = os.path.realpath(path)
    if os.path.commonpath([real, str(root)]) != str(root):
        raise BundleError(f"{label}{path.name} is a symlink that leads outside the bundle", HINT)
    try:
        regular = stat.S_ISREG(os.stat(real).st_mode)
    except OSError as error:  # a dangling symlink inside the bundle, a permission problem
        raise BundleError(f"{label}{path.name} cannot be read ({error.strerror})", HINT) from None
    if not regular:
        raise BundleError(f"{label}{path.name} is not a regular file", HINT)


class Checker:
    """Reads one manifest document; every failure names the field."""

    def __init__(self, bundle: Path, root: Path, source: Path):
        self.bundle, self.root, self.source = bundle, root, source

    def fail(self, where: str, problem: str, hint: str = HINT) -> BundleError:
        return BundleError(f"{self.source}: {where}: {problem}", hint)

    # -- types --------------------------------------------------------------------------------
    def check(self, value: Any, spec: Any, where: str) -> None:
        """`value` has the JSON types `spec` describes (see SCHEMA); else BundleError at `where`."""
        if isinstance(spec, Opt):
            if value is None:
                return
            spec = spec.spec
        if isinstance(spec, Report):
            if isinstance(value, dict) and value.get("skipped") is True:
                return
            spec = spec.spec
        if isinstance(spec, tuple):
            for option in spec:
                try:
                    self.check(value, option, where)
                    return
                except BundleError:
                    pass
        elif isinstance(spec, list):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    self.check(item, spec[0], f"{where}[{i}]")
                return
        elif isinstance(spec, MapOf):
            if isinstance(value, dict):
                for key, item in value.items():
                    self.check(item, spec.spec, f"{where}[{json.dumps(key)}]")
                return
        elif isinstance(spec, dict):
            if isinstance(value, dict):
                for key, item_spec in spec.items():
                    field = f"{where}.{key}" if where else key
                    if key not in value:
                        if isinstance(item_spec, Opt):
                            continue
                        raise self.fail(field, "missing")
                    self.check(value[key], item_spec, field)
                return
        elif _is(value, spec):
            return
        raise self.fail(where or "the document", f"expected {_describe(spec)}, got {_show(value)}")

    # -- the whole document --------------------------------------------------------------------
    def manifest(self, doc: Any) -> Manifest:
        if not isinstance(doc, dict):
            raise self.fail("the document", f"expected an object, got {_show(doc)}")
        self.check(doc.get("format"), str, "format")
        if doc["format"] != FORMAT_NAME:
            raise self.fail(
                "format",
                f"is {_show(doc['format'])}, expected {FORMAT_NAME!r}",
                "this folder was not written by edgellm export",
            )
        version = doc.get("format_version")
        self.check(version, int, "format_version")
        if version > FORMAT_VERSION:
            raise self.fail(
                "format_version",
                f"{version} is newer than this edgellm understands ({FORMAT_VERSION})",
                "upgrade edgellm",
            )
        if version < FORMAT_VERSION:  # 1 stored float32 block scales; 2 stores float16, as GGUF
            raise self.fail(
                "format_version",
                f"{version} is older than this edgellm reads ({FORMAT_VERSION}: float16 block scales)",
                f"export it again: edgellm export SRC -o {self.bundle} --force",
            )
        self.check(doc, SCHEMA, "")
        config = self.model_config(doc["model"])
        files = self.files(doc["files"])
        weights = self.listed(files, WEIGHTS_FILE, "files")
        tensors = self.tensors(doc["tensors"], weights.bytes)
        matrices = {name: self.matrix(name, entry, tensors) for name, entry in doc["matrices"].items()}
        self.decoder_tensors(config, tensors, matrices)
        tokenizer = self.tokenizer(doc["tokenizer"], files, config.vocab_size)
        template = doc.get("chat_template")
        if template is not None and len(template) > TEMPLATE_LIMIT:
            raise self.fail("chat_template", f"{len(template)} characters, more than {TEMPLATE_LIMIT}")
        cpu_graph = self.listed(files, doc["graphs"]["cpu"]["file"], "graphs.cpu.file").name
        npu = self.npu(doc["graphs"]["npu"], files) if doc["graphs"].get("npu") is not None else None
        return Manifest(
            bundle=self.bundle,
            root=self.root,
            format_version=version,
            name=doc["model"].get("name"),
            config=config,
            files=MappingProxyType(files),
            cpu_graph=cpu_graph,
            npu=npu,
            tensors=MappingProxyType(tensors),
            matrices=MappingProxyType(matrices),
            tokenizer=tokenizer,
            chat_template=template or None,
            raw=MappingProxyType(doc),
        )

    def model_config(self, model: dict) -> ModelConfig:
        fields = {k: v for k, v in model.items() if k != "name"}
        try:
            return ModelConfig.from_dict(fields)
        except EdgeLLMError as error:
            raise self.fail("model", error.message, error.hint or HINT) from None

    # -- files -----------------------------------------------------------------------------------
    def safe_name(self, name: str, where: str) -> str:
        if len(name) > 255 or not _SAFE_PATH.fullmatch(name):
            raise self.fail(
                where,
                f"{_show(name)} is not a plain file name inside the bundle (no absolute paths, '..' or hidden names)",
            )
        return name

    def files(self, raw: dict) -> dict[str, FileEntry]:
        files = {}
        for name, entry in raw.items():
            where = f"files[{json.dumps(name)}]"
            self.safe_name(name, where)
            if not _SHA256.fullmatch(entry["sha256"]):
                raise self.fail(f"{where}.sha256", f"expected 64 lowercase hex digits, got {_show(entry['sha256'])}")
            path = self.root / name
            if not os.path.lexists(path):
                raise BundleError(f"{self.bundle / name}: missing", "the bundle is incomplete; export it again")
            _check_inside(self.root, path, self.source, where)
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(
                    f"{self.bundle / name}: {size} bytes, the manifest says {entry['bytes']}",
                    "the file is truncated or was replaced; export the bundle again",
                )
            files[name] = FileEntry(name, entry["bytes"], entry["sha256"])
        for entry in files.values():  # after every path was judged, so a bad entry fails before any read
            if entry.bytes <= HASH_AT_LOAD_LIMIT and file_sha256(self.root / entry.name) != entry.sha256:
                raise BundleError(
                    f"{self.bundle / entry.name}: sha256 differs from the manifest",
                    "the file was modified or damaged; export the bundle again",
                )
        return files

    def listed(self, files: dict[str, FileEntry], name: str, where: str) -> FileEntry:
        self.safe_name(name, where)
        if name not in files:
            raise self.fail(where, f"{_show(name)} is not listed in files (with its size and sha256)")
        return files[name]

    # -- tensors and matrices --------------------------------------------------------------------
    def tensors(self, raw: dict, file_size: int) -> dict[str, TensorEntry]:
        out = {}
        for name, e in raw.items():
            where = f"tensors[{json.dumps(name)}]"
            offset, nbytes, shape, dtype = e["offset"], e["nbytes"], e["shape"], e["dtype"]
            if offset < 0 or offset % ALIGN:
                raise self.fail(f"{where}.offset", f"{offset} is not a multiple of {ALIGN} >= 0")
            if nbytes < 0 or offset + nbytes > file_size:
                raise self.fail(
                    where, f"bytes {offset}..{offset + nbytes} lie outside {WEIGHTS_FILE} ({file_size} bytes)"
                )
            if dtype not in DTYPES:
                raise self.fail(f"{where}.dtype", f"{_show(dtype)} is not one of {', '.join(DTYPES)}")
            if any(d < 0 for d in shape) or math.prod(shape) * DTYPES[dtype] != nbytes:
                raise self.fail(f"{where}.shape", f"{shape} of {dtype} is not the {nbytes} bytes of nbytes")
            out[name] = TensorEntry.from_json(name, e)
        return out

    def expect_tensor(
        self, tensors: dict[str, TensorEntry], name: str, dtype: str, shape: list[int], needed_by: str
    ) -> None:
        entry = tensors.get(name)
        if entry is None:
            raise self.fail("tensors", f"has no {name!r}, which {needed_by} needs ({dtype} {shape})")
        if entry.dtype != dtype or list(entry.shape) != shape:
            raise self.fail(
                f"tensors[{json.dumps(name)}]",
                f"is {entry.dtype} {list(entry.shape)}, {needed_by} needs {dtype} {shape}",
            )

    def matrix(self, name: str, m: dict, tensors: dict[str, TensorEntry]) -> MatrixEntry:
        where = f"matrices[{json.dumps(name)}]"
        fmt = QUANT_FORMATS.get(m["format"])
        if fmt is None:
            raise self.fail(f"{where}.format", f"{_show(m['format'])} is not one of {', '.join(QUANT_FORMATS)}")
        if m["bits"] != fmt.bits:
            raise self.fail(where, f"bits {m['bits']}, but format {fmt.name} has {fmt.bits}")
        if m["block"] not in BLOCK_SIZES:
            raise self.fail(f"{where}.block", f"{m['block']} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if m["rows"] <= 0 or m["cols"] <= 0:
            raise self.fail(where, f"rows {m['rows']} and cols {m['cols']} are not a matrix's")
        if fmt.has_mins != (m.get("mins") is not None):
            raise self.fail(f"{where}.mins", f"format {fmt.name} {'needs' if fmt.has_mins else 'has no'} mins")
        needed_by = f"{where} (rows {m['rows']}, cols {m['cols']}, block {m['block']}, format {fmt.name})"
        blocks = [m["rows"], n_blocks(m["cols"], m["block"])]
        self.expect_tensor(
            tensors,
            m["qweight"],
            "uint8",
            fmt.qweight_shape(m["rows"], m["cols"], m["block"]),
            f"its qweight {needed_by}",
        )
        self.expect_tensor(tensors, m["scales"], "float16", blocks, f"its scales {needed_by}")
        if fmt.has_mins:
            self.expect_tensor(tensors, m["mins"], "float16", blocks, f"its mins {needed_by}")
        return MatrixEntry.from_json(name, m)

    def decoder_tensors(
        self, config: ModelConfig, tensors: dict[str, TensorEntry], matrices: dict[str, MatrixEntry]
    ) -> None:
        """The decoder the config describes is all there, with its shapes (every backend reads these)."""

        def config_fields(expected: Expected) -> str:
            return "the model config (" + ", ".join(f"model.{f} {getattr(config, f)}" for f in expected.fields) + ")"

        for name, expected in decoder_matrices(config).items():
            m = matrices.get(name)
            if m is None:
                raise self.fail("matrices", f"has no {name!r}, which {config_fields(expected)} needs")
            if (m.rows, m.cols) != expected.shape:
                raise self.fail(
                    f"matrices[{json.dumps(name)}]",
                    f"is [{m.rows}, {m.cols}], {config_fields(expected)} needs {list(expected.shape)}",
                )
        for name, expected in decoder_vectors(config, INV_FREQ).items():
            self.expect_tensor(tensors, name, "float32", list(expected.shape), config_fields(expected))

    # -- tokenizer and NPU graphs ----------------------------------------------------------------
    def tokenizer(self, t: dict, files: dict[str, FileEntry], vocab_size: int) -> TokenizerSpec:
        self.listed(files, t["file"], "tokenizer.file")

        def token(key: str, value: Any) -> Any:
            if value is not None and not 0 <= value < vocab_size:
                raise self.fail(f"tokenizer.{key}", f"expected a token id in [0, {vocab_size - 1}], got {value}")
            return value

        eos = tuple(token(f"eos_token_ids[{i}]", v) for i, v in enumerate(t["eos_token_ids"]))
        return TokenizerSpec(
            file=t["file"],
            bos_token_id=token("bos_token_id", t.get("bos_token_id")),
            eos_token_ids=eos,
            pad_token_id=token("pad_token_id", t.get("pad_token_id")),
            unk_token_id=token("unk_token_id", t.get("unk_token_id")),
            add_bos_token=t["add_bos_token"],
            special_tokens=MappingProxyType(dict(t["special_tokens"])),
        )

    def npu(self, entry: dict, files: dict[str, FileEntry]) -> NpuGraphs:
        roles = {
            role: self.listed(files, name, f"graphs.npu.files.{role}").name
            for role, name in entry["files"].items()
            if role in ("prefill", "decode", "weights")
        }
        if entry["chunk"] < 1 or entry["context"] < entry["chunk"]:
            raise self.fail(
                "graphs.npu", f"chunk {entry['chunk']} and context {entry['context']}: expected 1 <= chunk <= context"
            )
        if not math.isfinite(entry["mask_value"]):
            raise self.fail("graphs.npu.mask_value", f"expected a finite number, got {entry['mask_value']}")
        return NpuGraphs(
            prefill_file=roles["prefill"],
            decode_file=roles["decode"],
            weights_file=roles["weights"],
            chunk=entry["chunk"],
            context=entry["context"],
            mask_value=float(entry["mask_value"]),
            scheme=entry["quantization"]["scheme"],
            raw=MappingProxyType(entry),
        )
