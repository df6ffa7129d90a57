"""Runtime policy, layered: explicit arguments (CLI flags) > environment > the board's profile > defaults.

Facts about the model come from the manifest; this holds only choices about how to run it. The
board profile (boards/profiles/*.toml) is the detected one unless `board=` / EDGELLM_BOARD names
one (or "none").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgellm.backends.native import ffi as native
from edgellm.boards.detect import detected
from edgellm.boards.profile import load_profile
from edgellm.errors import InvalidSettingError
from edgellm.units import parse_bytes, parse_cpu_list

CPU_BACKENDS = ("native", "onnxruntime")  # what "auto" chooses from
BACKENDS = CPU_BACKENDS + ("npu",)  # npu: the bundle's NPU graphs on ONNX Runtime's QNN EP, when asked for
AUTO_BACKEND = "auto"  # native when the C extension loads here, else onnxruntime
DEFAULT_CONTEXT = 2048
DEFAULT_PREFILL_CHUNK = 128

ENVIRONMENT = {  # variable -> field
    "EDGELLM_BOARD": "board",
    "EDGELLM_BACKEND": "backend",
    "EDGELLM_THREADS": "threads",
    "EDGELLM_CONTEXT": "context_length",
    "EDGELLM_PREFILL_CHUNK": "prefill_chunk",
    "EDGELLM_MAX_MEMORY": "max_memory",
}


def resolve_auto_backend() -> str:
    """ "auto": the native engine when its C extension loads here, else ONNX Runtime."""
    return "native" if native.available() else "onnxruntime"


@dataclass(frozen=True)
class RuntimeSettings:
    backend: str = AUTO_BACKEND  # resolved at construction: native when its C extension loads, else onnxruntime
    threads: int = 0  # 0 = one per core
    context_length: int = 0  # 0 = min(model's trained context, DEFAULT_CONTEXT)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # tokens per prefill call
    max_memory: int | None = None  # bytes; None = what the machine has available
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime execution providers, in order
    provider_options: tuple[Mapping[str, Any], ...] = field(default=())
    verify_weights: bool = False  # hash weights.bin against the manifest at load (slow on big models)
    optional_providers: bool = False  # providers missing from this ONNX Runtime are skipped (a board's wish list)
    default_context: int = DEFAULT_CONTEXT  # the context when context_length is 0, capped by the model's
    cpu_affinity: str | None = None  # e.g. "4-7": the runtime's threads stay on these CPUs (big cores)
    kernel_ceiling: str | None = None  # the best native kernel variant allowed (a board's cap)
    board: str | None = None  # the board profile these defaults came from
    npu_provider_options: Mapping[str, Any] = field(
        default_factory=dict
    )  # the board's [npu] provider_options (soc_model)

    def __post_init__(self) -> None:
        if self.backend == AUTO_BACKEND:
            object.__setattr__(self, "backend", resolve_auto_backend())
        if self.backend not in BACKENDS:
            raise InvalidSettingError(
                f"unknown backend {self.backend!r}",
                f"available: {', '.join(CPU_BACKENDS + (AUTO_BACKEND,))}, or npu for a bundle "
                "exported with --profile npu, with onnxruntime-qnn installed",
            )
        for name in ("threads", "context_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidSettingError(f"{name} must be a whole number >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise InvalidSettingError(f"prefill_chunk must be >= 1, got {self.prefill_chunk!r}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise InvalidSettingError(f"max_memory must be positive, got {self.max_memory!r}")
        if self.cpu_affinity == "":  # explicitly no pinning (over a board's default)
            object.__setattr__(self, "cpu_affinity", None)
        if self.cpu_affinity is not None:
            parse_cpu_list(self.cpu_affinity, "cpu_affinity")

    @property
    def thread_count(self) -> int:
        """The threads asked for; else one per CPU of the affinity; else one per core."""
        if self.threads:
            return self.threads
        if self.cpu_affinity:
            return len(parse_cpu_list(self.cpu_affinity))
        return os.cpu_count() or 1

    def context_for(self, trained_context: int) -> int:
        return self.context_length or min(trained_context, self.default_context)

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **explicit: Any) -> RuntimeSettings:
        """Defaults, overridden by the board profile (`board`: "auto" = detected, a name, a .toml
        path, or "none"), overridden by EDGELLM_* environment variables, overridden by `explicit`
        (not None)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for variable, name in ENVIRONMENT.items():
            if variable in environ:
                values[name] = environ[variable]
        values.update({k: v for k, v in explicit.items() if v is not None})
        values = {**board_defaults(values.pop("board", "auto")), **values}
        for name in ("threads", "context_length", "prefill_chunk"):
            if name in values and isinstance(values[name], str):
                try:
                    values[name] = int(values[name])
                except ValueError:
                    raise InvalidSettingError(f"{name} must be a whole number, got {values[name]!r}") from None
        if "max_memory" in values:
            values["max_memory"] = parse_bytes(values["max_memory"])
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidSettingError(f"unknown runtime settings: {', '.join(sorted(unknown))}")
        return cls(**values)


def board_defaults(board: str | None) -> dict[str, Any]:
    """The RuntimeSettings fields a board profile sets: "auto" detects the board, "none" sets nothing."""
    if board in (None, "", "none"):
        return {}
    if board == "auto":
        profile = detected().profile
    else:
        profile = load_profile(board)
    values = profile.runtime_defaults()
    values["default_context"] = values.pop("context_length") or DEFAULT_CONTEXT
    values["optional_providers"] = True
    values["npu_provider_options"] = dict(profile.npu.get("provider_options", {}))
    if values["backend"] == "native":  # the board's preference; ONNX Runtime where the engine is not built
        values["backend"] = AUTO_BACKEND
    return values
