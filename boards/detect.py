"""Which board is this? Read the device tree, /proc/cpuinfo and the memory, pick a board profile.

The rule: a profile applies when the device tree (`compatible` or `model`; the `Model` line
Raspberry Pi kernels add to /proc/cpuinfo when there is no device tree to read) names the board and
the CPU cores /proc/cpuinfo lists are ones that board has. If the device tree names a board but the
cores contradict it, or nothing names a board, the generic profile for the architecture applies:
detection never picks a board on a guess. Every file is read as untrusted bytes (a missing,
unreadable or garbled file counts as absent).

`root` lets the tests point at recorded files (ROOT/proc/cpuinfo, ROOT/proc/device-tree/model, ...).
"""

from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.boards.profile import BoardProfile, all_profiles, generic_profile
from edgellm.units import normalise_arch

# The CPU features that decide kernel variants, as /proc/cpuinfo spells them (x86 flags, Arm Features).
CPU_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "neon",
    "asimd",
    "asimdhp",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)
MAX_FILE_BYTES = 1 << 20  # device-tree strings and cpuinfo are small; never read a huge file whole


@dataclass(frozen=True)
class CpuFacts:
    arch: str
    model_name: str  # x86 "model name", or "implementer 0x41 part 0xd0b (Cortex-A76)"
    cores: int
    parts: tuple[str, ...]  # per core, "0x41:0xd0b"; () on x86
    features: tuple[str, ...]  # x86 "flags" / Arm "Features" of the first core
    cpuinfo_model: str = ""  # the "Model" line some Arm kernels add (Raspberry Pi)

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "model_name": self.model_name,
            "cores": self.cores,
            "parts": list(self.parts),
            "features": list(self.features),
        }


@dataclass(frozen=True)
class Detection:
    profile: BoardProfile
    reason: str  # why this profile: what matched, or why none did
    model: str  # device-tree model ("" when absent)
    compatible: tuple[str, ...]
    cpu: CpuFacts
    memory_total: int | None  # bytes
    memory_available: int | None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "board": self.profile.name,
            "title": self.profile.title,
            "reason": self.reason,
            "device_tree_model": self.model or None,
            "device_tree_compatible": list(self.compatible),
            "cpu": self.cpu.to_json(),
            "memory_total_bytes": self.memory_total,
            "memory_available_bytes": self.memory_available,
            "notes": list(self.notes),
        }


ARM_PARTS = {  # implementer:part -> core name, for people reading `doctor`
    "0x41:0xd03": "Cortex-A53",
    "0x41:0xd05": "Cortex-A55",
    "0x41:0xd08": "Cortex-A72",
    "0x41:0xd0b": "Cortex-A76",
    "0x41:0xd0c": "Neoverse-N1",
    "0x41:0xd41": "Cortex-A78",
    "0x41:0xd42": "Cortex-A78AE",
    "0x41:0xd44": "Cortex-X1",
    "0x41:0xd46": "Cortex-A510",
    "0x41:0xd47": "Cortex-A710",
    "0x41:0xd4b": "Cortex-A78C",
    "0x41:0xd40": "Neoverse-V1",
    "0x41:0xd4f": "Neoverse-V2",
    "0x41:0xd80": "Cortex-A520",
    "0x41:0xd81": "Cortex-A720",
    "0x51:0xd05": "Kryo (Cortex-A55)",
    "0x51:0xd41": "Kryo (Cortex-A78)",
}


def read_text(path: Path) -> str | None:
    """A small text file as printable text, or None when missing, unreadable, too big or garbage."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_FILE_BYTES:
        return None
    return data.decode("utf-8", errors="replace")


def read_dt_strings(path: Path) -> tuple[str, ...]:
    """A device-tree property: NUL-separated strings. Entries that are not plain printable ASCII
    are dropped (garbage in the file must not match, nor crash)."""
    text = read_text(path)
    if text is None:
        return ()
    return tuple(
        s.strip() for s in text.split("\0") if s.strip() and len(s) <= 256 and all(" " <= ch <= "~" for ch in s.strip())
    )


def parse_cpuinfo(text: str, arch: str) -> CpuFacts:
    """Per-core blocks ('processor : N' then fields) and the trailing board lines of Arm kernels."""
    blocks: list[dict[str, str]] = []
    trailer: dict[str, str] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor" and value.isdigit():
            current = {}
            blocks.append(current)
        elif key in ("Hardware", "Revision", "Serial", "Model"):
            trailer[key] = value
        elif current is not None:
            current.setdefault(key, value)
    first = blocks[0] if blocks else {}
    features = tuple((first.get("flags") or first.get("Features") or "").split())
    parts = []
    for block in blocks:
        implementer, part = block.get("CPU implementer", ""), block.get("CPU part", "")
        if re.fullmatch(r"0x[0-9a-fA-F]+", implementer) and re.fullmatch(r"0x[0-9a-fA-F]+", part):
            parts.append(f"0x{int(implementer, 16):02x}:0x{int(part, 16):03x}")
    if first.get("model name"):
        model_name = first["model name"]
    elif parts:
        names = sorted({ARM_PARTS.get(p, p) for p in parts})
        model_name = " + ".join(f"{sum(ARM_PARTS.get(p, p) == n for p in parts)}x {n}" for n in names)
    else:
        model_name = trailer.get("Hardware", "unknown")
    return CpuFacts(
        arch=arch,
        model_name=model_name,
        cores=len(blocks) or (os.cpu_count() or 1),
        parts=tuple(parts),
        features=features,
        cpuinfo_model=trailer.get("Model", ""),
    )


def read_meminfo(root: Path) -> tuple[int | None, int | None]:
    text = read_text(root / "proc" / "meminfo") or ""
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(MemTotal|MemAvailable):\s+([0-9]+) kB", line.strip())
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def _names_board(profile: BoardProfile, model: str, compatible: tuple[str, ...]) -> str | None:
    for entry in profile.compatible:
        if entry in compatible:
            return f"device-tree compatible {entry!r}"
    for entry in profile.model:
        if entry.lower() in model.lower():
            return f"model {model!r}"
    return None


def detect(root: str | Path = "/", arch: str | None = None) -> Detection:
    root = Path(root)
    arch = normalise_arch(arch or platform.machine())
    cpu = parse_cpuinfo(read_text(root / "proc" / "cpuinfo") or "", arch)
    dt = root / "proc" / "device-tree"
    dt_model = " ".join(read_dt_strings(dt / "model"))
    compatible = read_dt_strings(dt / "compatible")
    model = dt_model or cpu.cpuinfo_model
    total, available = read_meminfo(root)
    notes: list[str] = []
    if not dt_model and (dt / "model").exists():
        notes.append(f"{dt / 'model'} is unreadable or not text; ignored")

    for profile in all_profiles():
        if profile.is_generic or profile.arch != arch:
            continue
        named_by = _names_board(profile, model, compatible)
        if not named_by:
            continue
        foreign = sorted(set(cpu.parts) - set(profile.cpu_parts)) if profile.cpu_parts else []
        if foreign:
            notes.append(
                f"{named_by} names {profile.title}, but /proc/cpuinfo lists cores it does not have "
                f"({', '.join(ARM_PARTS.get(p, p) for p in foreign)}); not using its profile"
            )
            continue
        if profile.cores and cpu.parts and len(cpu.parts) > profile.cores:
            notes.append(
                f"{named_by} names {profile.title} ({profile.cores} cores), but /proc/cpuinfo lists "
                f"{len(cpu.parts)}; not using its profile"
            )
            continue
        return Detection(
            profile, f"{named_by} matches {profile.source}", model, compatible, cpu, total, available, tuple(notes)
        )
    fallback = generic_profile(arch)
    reason = "no board profile names this machine" + (f" (model {model!r})" if model else "")
    return Detection(fallback, reason, model, compatible, cpu, total, available, tuple(notes))


@functools.lru_cache(maxsize=1)
def detected() -> Detection:
    """This machine's detection, made once per process (the files do not change under a running process)."""
    return detect()
