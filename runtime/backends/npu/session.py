"""QNN sessions for the NPU graphs: the plugin execution provider, its options, the compiled-context cache.

onnxruntime-qnn is a plugin execution provider: its library is registered with ONNX Runtime, and
a session asks for the QNN device with the HTP backend and the SoC model to compile for. CPU
fallback is disabled, so a graph (or one node) the NPU refuses fails the load instead of quietly
running on the CPU.

Compiling a graph for the HTP takes seconds (about 6 s for SmolLM2's 30 layers); loading the
compiled context binary takes a fraction of one. The first load therefore asks ONNX Runtime to
dump an EP context model (`ep.context_*`, the binary embedded) into a cache folder: the bundle's
own `npu_cache/`, or ~/.cache/edgellm/npu when the bundle folder is read-only. The file name
carries the key (graph, model hash, SoC model, onnxruntime-qnn version) and a JSON sidecar records
it with the file's size and fingerprint; a cached file whose sidecar, fingerprint or embedded SoC
does not match, or that ONNX Runtime cannot load, is compiled again (with a warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgellm.bundle.format import cache_root
from edgellm.bundle.manifest import Manifest
from edgellm.errors import InvalidSettingError, NpuError

EP_NAME = "QNNExecutionProvider"
DEFAULT_SOC_MODEL = "57"  # the simulator's target when the board profile names no SoC
DEFAULT_SOC_NAME = "SM8650"  # what DEFAULT_SOC_MODEL is (Hexagon v75)
INSTALL_HINT = "pip install onnxruntime-qnn, or the extra: pip install 'edgellm[npu]'"
COMPAT_KEY = f"ep_compatibility_info.{EP_NAME}"  # metadata QNN writes into a context model: "v2:...:<soc>:..."
COMPAT_SOC_FIELD = 5
FINGERPRINT_BYTES = 1 << 20

log = logging.getLogger("edgellm.npu")


def load_qnn():
    """(onnxruntime, onnxruntime_qnn, the QNN EP devices), registering the plugin once per process."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn as qnn
    except ImportError as error:
        raise NpuError(
            f"the NPU backend needs onnxruntime-qnn, which is not installed ({error})", INSTALL_HINT
        ) from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        try:
            ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
        except Exception as error:  # an onnxruntime too old for plugin EPs, or a broken install
            raise NpuError(
                f"ONNX Runtime {ort.__version__} cannot load the QNN execution provider ({error})", INSTALL_HINT
            ) from None
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise NpuError("the QNN execution provider is installed but offers no device", INSTALL_HINT)
    return ort, qnn, devices


def qnn_version() -> str:
    import onnxruntime_qnn

    return str(getattr(onnxruntime_qnn, "__version__", "unknown"))


def provider_options(board_options: Mapping[str, Any], htp_library: str) -> dict[str, str]:
    """The HTP backend, the SoC model (the board's, else DEFAULT_SOC_MODEL) and any other option the
    board profile's [npu] provider_options give."""
    options = {"backend_path": htp_library, "soc_model": DEFAULT_SOC_MODEL}
    options.update({str(k): str(v) for k, v in board_options.items()})
    if not re.fullmatch(r"[0-9]+", options["soc_model"]):
        # QNN ignores a SoC model it does not know and silently targets an old part.
        raise InvalidSettingError(
            f"the NPU soc_model must be QNN's SoC number (e.g. {DEFAULT_SOC_MODEL} for "
            f"{DEFAULT_SOC_NAME}), got {options['soc_model']!r}",
            "fix the board profile's [npu] provider_options",
        )
    return options


@dataclass(frozen=True)
class CacheKey:
    """What a compiled context binary depends on."""

    graph: str  # "prefill" | "decode"
    model_hash: str  # over the manifest's sha256 of the NPU graph files and their weights
    soc_model: str
    qnn_version: str  # onnxruntime-qnn, which brings the QNN SDK that compiled it
    options: str = ""  # the board's other provider options (htp_arch, ...), in the sidecar only

    def file_name(self) -> str:
        version = re.sub(r"[^0-9A-Za-z.]", "_", self.qnn_version)
        return f"{self.graph}-{self.model_hash[:16]}-soc{self.soc_model}-qnn{version}_ctx.onnx"


def model_hash(manifest: Manifest, files: Iterable[str]) -> str:
    digests = {name: manifest.files[name].sha256 for name in sorted(files)}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def cache_dir(bundle: Path) -> Path | None:
    """The bundle's npu_cache/ if it can be written, else ~/.cache/edgellm/npu (XDG_CACHE_HOME), else None."""
    home = cache_root() / "npu"
    for folder, parent in ((Path(bundle) / "npu_cache", Path(bundle)), (home, None)):
        if not folder.is_dir():
            if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
                continue  # a read-only bundle folder is left as it is
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    return None


def fingerprint(path: Path) -> str:
    """sha256 of the size, the first and the last MiB: cheap, and enough to tell two compiled models apart."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        handle.seek(max(0, size - FINGERPRINT_BYTES))
        digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


class QnnSessions:
    """Opens the NPU graphs on the QNN EP, through the context cache."""

    def __init__(self, board_options: Mapping[str, Any], threads: int = 1):
        self.ort, qnn, self.devices = load_qnn()
        self.options = provider_options(board_options, qnn.get_qnn_htp_path())
        self.soc_model = self.options["soc_model"]
        self.qnn_version = qnn_version()
        self.threads = threads

    def key(self, graph: str, model_hash: str) -> CacheKey:
        others = {k: v for k, v in sorted(self.options.items()) if k not in ("backend_path", "soc_model")}
        return CacheKey(graph, model_hash, self.soc_model, self.qnn_version, json.dumps(others) if others else "")

    def session_options(self, context_file: Path | None = None):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3  # errors only: the QNN EP warns about Windows-only features at every load
        so.add_provider_for_devices(self.devices, dict(self.options))
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if context_file is not None:
            so.add_session_config_entry("ep.context_enable", "1")
            so.add_session_config_entry("ep.context_file_path", str(context_file))
            so.add_session_config_entry("ep.context_embed_mode", "1")  # one file: renamed into place whole
        return so

    def open(self, graph_file: Path, key: CacheKey, folder: Path | None) -> tuple[Any, dict]:
        """(session, report): report says where the context came from and how long the load took."""
        started = time.perf_counter()
        if folder is not None:
            cached = folder / key.file_name()
            session, problem = self._load_cached(cached, key)
            if session is not None:
                return session, self._report(key, cached, True, started, session)
            if problem:
                log.warning("%s: %s; compiling the %s graph again", cached, problem, key.graph)
                for stale in (cached, _sidecar(cached)):
                    stale.unlink(missing_ok=True)
        session = self._compile(graph_file, key, folder)
        return session, self._report(key, folder / key.file_name() if folder else None, False, started, session)

    def _load_cached(self, cached: Path, key: CacheKey) -> tuple[Any, str | None]:
        """(session, None) on a hit; (None, why) for a cache file that must be rebuilt; (None, None) if absent."""
        if not cached.is_file():
            return None, None
        try:
            recorded = json.loads(_sidecar(cached).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, "no readable sidecar says what it was compiled from"
        compiled_for, wanted = recorded.get("key") or {}, asdict(key)
        if compiled_for != wanted:
            short = lambda name, value: str(value)[:16] if name == "model_hash" else value  # noqa: E731
            differ = [
                f"{name} {short(name, compiled_for.get(name))!r}, not {short(name, value)!r}"
                for name, value in wanted.items()
                if compiled_for.get(name) != value
            ]
            return None, f"it was compiled for another {'; '.join(differ)}"
        if recorded.get("fingerprint") != fingerprint(cached):
            return None, "it is not the file its sidecar describes (replaced or damaged)"
        try:
            with _c_stdout_to_log():
                session = self.ort.InferenceSession(str(cached), self.session_options())
        except Exception as error:
            return None, f"ONNX Runtime cannot load it ({_first_line(error)})"
        fields = session.get_modelmeta().custom_metadata_map.get(COMPAT_KEY, "").split(":")
        if len(fields) > COMPAT_SOC_FIELD and fields[COMPAT_SOC_FIELD] != key.soc_model:
            return None, f"QNN compiled it for SoC model {fields[COMPAT_SOC_FIELD]}, not {key.soc_model}"
        return session, None

    def _compile(self, graph_file: Path, key: CacheKey, folder: Path | None):
        temporary = None
        if folder is not None:
            temporary = folder / f".{key.file_name()}.tmp-{os.getpid()}_ctx.onnx"
            temporary.unlink(missing_ok=True)  # ONNX Runtime refuses to overwrite a context file
        try:
            with _c_stdout_to_log():
                session = self.ort.InferenceSession(str(graph_file), self.session_options(temporary))
        except Exception as error:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            raise NpuError(
                f"the NPU (QNN HTP, SoC model {key.soc_model}) cannot run {graph_file.name}: {_first_line(error)}",
                "CPU fallback is off on purpose; run this bundle with --backend onnxruntime or native, "
                "or export it again",
            ) from None
        if temporary is not None and temporary.is_file():
            cached = folder / key.file_name()
            record = {
                "key": asdict(key),
                "fingerprint": fingerprint(temporary),
                "bytes": temporary.stat().st_size,
                "source": graph_file.name,
            }
            _sidecar(temporary).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, cached)
            os.replace(_sidecar(temporary), _sidecar(cached))
        return session

    def _report(self, key: CacheKey, cached: Path | None, hit: bool, started: float, session) -> dict:
        from_context = COMPAT_KEY in session.get_modelmeta().custom_metadata_map  # QNN's own mark of a compiled context
        return {
            "graph": key.graph,
            "context_cache": str(cached) if cached else None,
            "cache_hit": hit,
            "loaded_compiled_context": from_context,
            "seconds": round(time.perf_counter() - started, 4),
            "soc_model": key.soc_model,
        }


@contextlib.contextmanager
def _c_stdout_to_log():
    """QNN's HTP library prints a line about its thread-local configuration to the C stdout when it
    loads; edgellm's stdout is the answer (or --json), so that line is caught and logged at debug level."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode(errors="replace").strip()
            if text:
                log.debug("QNN printed: %s", text)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
