"""Board profiles: the defaults that follow from a board's hardware, read from boards/profiles/*.toml.

A profile names the board, how to recognise it (device-tree `compatible` strings, `model`
substrings, the CPU parts /proc/cpuinfo reports), its CPU (cores, the big cores, the best kernel
variant to use), and defaults for the runtime (threads, CPU affinity, backend, ONNX Runtime
providers, context length), the NPU (execution provider and its options) and the service (any
ServiceOptions field). boards/README.md documents every field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.boards import PROFILES
from edgellm.errors import InvalidSettingError
from edgellm.service.options import ServiceOptions
from edgellm.units import TOMLDecodeError, load_toml, normalise_arch, parse_cpu_list

# Kernel variants per architecture, weakest first: a profile's ceiling caps the runtime's choice.
VARIANT_ORDER = {"x86_64": ("ref", "avx2", "avx512vnni"), "aarch64": ("ref", "neon", "dotprod", "i8mm")}
BACKEND_CHOICES = ("native", "onnxruntime", "auto")

# table -> {key: expected type}; the [service] table is checked by ServiceOptions itself.
SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": str, "title": str},
    "match": {"compatible": list, "model": list, "cpu_parts": list},
    "cpu": {"arch": str, "cores": int, "big_cores": str, "kernel_ceiling": str},
    "accelerators": {"gpu": str, "npu": str},
    "runtime": {"threads": int, "cpu_affinity": str, "backend": str, "providers": list, "context_length": int},
    "npu": {"execution_provider": str, "backend_library": str, "provider_options": dict},
    "service": None,
}


@dataclass(frozen=True)
class BoardProfile:
    name: str
    title: str
    arch: str
    source: str  # the file it came from
    compatible: tuple[str, ...] = ()
    model: tuple[str, ...] = ()
    cpu_parts: tuple[str, ...] = ()  # "0x41:0xd0b": CPU implementer:CPU part
    cores: int | None = None
    big_cores: str | None = None
    kernel_ceiling: str | None = None
    accelerators: Mapping[str, str] = field(default_factory=dict)
    threads: int = 0
    cpu_affinity: str | None = None
    backend: str = "auto"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    context_length: int = 0
    npu: Mapping[str, Any] = field(default_factory=dict)
    service: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_generic(self) -> bool:
        return not (self.compatible or self.model)

    def runtime_defaults(self) -> dict[str, Any]:
        """RuntimeSettings fields this board sets (the layer under environment and flags)."""
        values: dict[str, Any] = {
            "threads": self.threads,
            "backend": self.backend,
            "providers": self.providers,
            "context_length": self.context_length,
            "board": self.name,
        }
        if self.cpu_affinity:
            values["cpu_affinity"] = self.cpu_affinity
        if self.kernel_ceiling:
            values["kernel_ceiling"] = self.kernel_ceiling
        return values

    def service_defaults(self) -> dict[str, Any]:
        """ServiceOptions fields: the runtime's defaults that a unit carries, then the [service] table."""
        values: dict[str, Any] = {}
        if self.threads:
            values["threads"] = self.threads
        if self.cpu_affinity:
            values["cpu_affinity"] = self.cpu_affinity
        if self.context_length:
            values["context"] = self.context_length
        if self.backend in ("native", "onnxruntime"):
            values["backend"] = self.backend
        values.update(self.service)
        return values

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "arch": self.arch,
            "source": self.source,
            "cores": self.cores,
            "big_cores": self.big_cores,
            "kernel_ceiling": self.kernel_ceiling,
            "accelerators": dict(self.accelerators),
            "runtime": self.runtime_defaults(),
            "npu": dict(self.npu),
            "service": dict(self.service),
        }


def _problem(source: str, where: str, message: str) -> InvalidSettingError:
    return InvalidSettingError(
        f"board profile {source}: {where}: {message}", "see boards/README.md for the profile fields"
    )


def _check_types(source: str, data: Mapping[str, Any]) -> None:
    for table, keys in SCHEMA.items():
        section = data if table == "" else data.get(table, {})
        if not isinstance(section, dict):
            raise _problem(source, f"[{table}]", f"must be a table, got {type(section).__name__}")
        if keys is None:
            continue
        for key, value in section.items():
            if table == "" and key in SCHEMA:
                continue
            if key not in keys:
                raise _problem(
                    source, f"[{table}]" if table else "top level", f"unknown field {key!r} (known: {', '.join(keys)})"
                )
            expected = keys[key]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise _problem(
                    source,
                    f"{table + '.' if table else ''}{key}",
                    f"expected {expected.__name__}, got {type(value).__name__} {value!r}",
                )
            if expected is list and not all(isinstance(item, str) for item in value):
                raise _problem(source, f"{table}.{key}", "expected a list of strings")


def profile_from_mapping(data: Mapping[str, Any], source: str) -> BoardProfile:
    """Validate a parsed profile; every problem names the file, the field and what was expected."""
    _check_types(source, data)
    for key in ("name", "title"):
        if key not in data:
            raise _problem(source, key, "missing")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", data["name"]):
        raise _problem(source, "name", f"use lower-case letters, digits, '-', '_' or '.', got {data['name']!r}")
    match, cpu, runtime = data.get("match", {}), data.get("cpu", {}), data.get("runtime", {})
    if "arch" not in cpu:
        raise _problem(source, "cpu.arch", "missing (x86_64 or aarch64)")
    arch = normalise_arch(cpu["arch"])
    if arch not in VARIANT_ORDER:
        raise _problem(source, "cpu.arch", f"expected one of {', '.join(VARIANT_ORDER)}, got {cpu['arch']!r}")
    ceiling = cpu.get("kernel_ceiling")
    if ceiling is not None and ceiling not in VARIANT_ORDER[arch]:
        raise _problem(
            source, "cpu.kernel_ceiling", f"expected one of {', '.join(VARIANT_ORDER[arch])} on {arch}, got {ceiling!r}"
        )
    for part in match.get("cpu_parts", []):
        if not re.fullmatch(r"0x[0-9a-f]{2}:0x[0-9a-f]{3}", part):
            raise _problem(source, "match.cpu_parts", f"expected 'implementer:part' like '0x41:0xd0b', got {part!r}")
    if "big_cores" in cpu:
        _cpu_list(source, "cpu.big_cores", cpu["big_cores"])
    if "cpu_affinity" in runtime:
        _cpu_list(source, "runtime.cpu_affinity", runtime["cpu_affinity"])
    if cpu.get("cores", 1) < 1:
        raise _problem(source, "cpu.cores", f"expected a whole number >= 1, got {cpu['cores']}")
    for key in ("threads", "context_length"):
        if runtime.get(key, 0) < 0:
            raise _problem(source, f"runtime.{key}", f"expected a whole number >= 0, got {runtime[key]}")
    backend = runtime.get("backend", "auto")
    if backend not in BACKEND_CHOICES:
        raise _problem(source, "runtime.backend", f"expected one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    service = dict(data.get("service", {}))
    _check_service(source, service)
    return BoardProfile(
        name=data["name"],
        title=data["title"],
        arch=arch,
        source=source,
        compatible=tuple(match.get("compatible", ())),
        model=tuple(match.get("model", ())),
        cpu_parts=tuple(match.get("cpu_parts", ())),
        cores=cpu.get("cores"),
        big_cores=cpu.get("big_cores"),
        kernel_ceiling=ceiling,
        accelerators=dict(data.get("accelerators", {})),
        threads=runtime.get("threads", 0),
        cpu_affinity=runtime.get("cpu_affinity"),
        backend=backend,
        providers=tuple(runtime.get("providers", ("CPUExecutionProvider",))),
        context_length=runtime.get("context_length", 0),
        npu=dict(data.get("npu", {})),
        service=service,
    )


def _cpu_list(source: str, where: str, text: str) -> frozenset[int]:
    try:
        return parse_cpu_list(text, where)
    except InvalidSettingError as error:
        raise _problem(source, where, error.args[0]) from None


def _check_service(source: str, service: dict[str, Any]) -> None:
    try:
        ServiceOptions().with_overrides(service)
    except InvalidSettingError as error:
        raise _problem(source, "[service]", error.args[0]) from None


def read_profile(path: str | Path) -> BoardProfile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidSettingError(f"cannot read board profile {path}: {error}") from None
    try:
        data = load_toml(text)
    except TOMLDecodeError as error:
        raise InvalidSettingError(
            f"board profile {path} is not valid TOML: {error}", "see boards/README.md for the profile fields"
        ) from None
    return profile_from_mapping(data, str(path))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.toml"))


def all_profiles() -> list[BoardProfile]:
    return [read_profile(PROFILES / f"{name}.toml") for name in profile_names()]


def load_profile(board: str | os.PathLike) -> BoardProfile:
    """A profile by name (boards/profiles/NAME.toml) or by the path of a TOML file."""
    text = os.fspath(board)
    path = PROFILES / f"{text}.toml"
    if re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", text) and path.is_file():
        return read_profile(path)
    if text.endswith(".toml") or os.sep in text:
        if not Path(text).is_file():
            raise InvalidSettingError(f"board profile file {text} does not exist")
        return read_profile(text)
    raise InvalidSettingError(
        f"unknown board {text!r}", f"known boards: {', '.join(profile_names())}; or pass a profile's .toml file"
    )


def generic_profile(arch: str) -> BoardProfile:
    """The fallback for an architecture; other architectures get a profile that only says 'all cores'."""
    arch = normalise_arch(arch)
    path = PROFILES / f"generic-{arch}.toml"
    if path.is_file():
        return read_profile(path)
    return BoardProfile(name=f"generic-{arch}", title=f"Generic {arch}", arch=arch, source="built-in")


def capped_variant(available: list[str], ceiling: str | None, arch: str) -> str | None:
    """The best of `available` (best last) at or under `ceiling`; None when no cap applies."""
    order = VARIANT_ORDER.get(normalise_arch(arch))
    if not ceiling or not order or ceiling not in order:
        return None
    allowed = [v for v in available if v in order and order.index(v) <= order.index(ceiling)]
    return allowed[-1] if allowed else None
