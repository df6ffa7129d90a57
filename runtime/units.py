"""Leaf parsers that settings, board profiles and the service share: sizes, CPU lists, architecture
names and TOML. They depend on nothing of edgellm's but its errors."""

from __future__ import annotations

import re

from edgellm.errors import InvalidSettingError

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6's Ubuntu 22.04): the tomli backport, a dependency there
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def parse_bytes(value: str | int | None, field_name: str = "max_memory") -> int | None:
    """'512M', '2G', '1.5GiB', '300000000' -> bytes."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise InvalidSettingError(f"{field_name} must be a size like 512M or 2G, got {value!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB', 300 MiB -> '300 MiB', 1024 -> '1 KiB' (never '0 MiB' for a small budget)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def parse_cpu_list(text: str, what: str = "cpu list") -> frozenset[int]:
    """'4-7' or '0 2 4' or '0,1,4-5' -> {4, 5, 6, 7} (the syntax of CPUAffinity= and taskset -c)."""
    text = str(text).strip()
    if not re.fullmatch(r"[0-9]+(-[0-9]+)?([ ,]+[0-9]+(-[0-9]+)?)*", text):
        raise InvalidSettingError(f"{what} must list CPUs like '4-7' or '0 2 4', got {text!r}")
    cpus: set[int] = set()
    for part in re.split(r"[ ,]+", text):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            raise InvalidSettingError(f"{what}: range {part!r} runs backwards")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def normalise_arch(arch: str) -> str:
    """uname's, Debian's or Docker's name of an architecture -> uname's (x86_64, aarch64)."""
    return ARCH_ALIASES.get(arch.lower(), arch.lower())


def load_toml(text: str) -> dict:
    """Parsed TOML; raises TOMLDecodeError."""
    return tomllib.loads(text)
