"""What a systemd unit is rendered from (`ServiceOptions`): the one definition of the service's
settings, which a board profile's [service] table is checked against and `edgellm service install`
renders. Its defaults are the server's own (server/config.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from edgellm.errors import InvalidSettingError
from edgellm.service.server.config import DEFAULT_GRACE, DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PORT, DEFAULT_TIMEOUT
from edgellm.units import parse_bytes, parse_cpu_list


@dataclass(frozen=True)
class ServiceOptions:
    """What a unit is rendered from. Every field can come from a board's [service] table."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout: float = DEFAULT_TIMEOUT
    grace: float = DEFAULT_GRACE
    threads: int | None = None
    context: int | None = None
    backend: str | None = None
    memory_max: int | None = None  # bytes; None = the estimate plus headroom
    cpu_affinity: str | None = None  # e.g. "4-7": the big cores of an RK3588
    nice: int | None = None
    watchdog_sec: int = 60
    timeout_start_sec: int = 300
    api_key_file: str | None = None  # on the host; handed to the service with LoadCredential=
    environment: Mapping[str, str] = field(default_factory=dict)  # e.g. {"EDGELLM_KERNELS": "ref"}
    device_allow: tuple[str, ...] = ()  # e.g. ("/dev/fastrpc-cdsp rw",) for an NPU; turns PrivateDevices off
    supplementary_groups: tuple[str, ...] = ()  # e.g. ("render",): the groups that own those device nodes
    ip_address_allow: tuple[str, ...] = ()  # who may connect when host is not loopback; () = anyone
    board: str | None = None  # a board profile's name, passed on to `edgellm serve --board`

    def __post_init__(self) -> None:
        if self.memory_max is not None and not isinstance(self.memory_max, int):
            object.__setattr__(self, "memory_max", parse_bytes(self.memory_max, "memory_max"))
        for name in ("device_allow", "supplementary_groups", "ip_address_allow"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidSettingError(f"port must be in [1, 65535], got {self.port!r}")
        if not isinstance(self.watchdog_sec, int) or self.watchdog_sec < 2:
            raise InvalidSettingError(f"watchdog_sec must be a whole number >= 2, got {self.watchdog_sec!r}")
        if self.cpu_affinity is not None:
            parse_cpu_list(self.cpu_affinity, "cpu_affinity")
        for key in self.environment:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise InvalidSettingError(f"environment variable name {key!r} is invalid")

    def with_overrides(self, overrides: Mapping[str, Any]) -> ServiceOptions:
        known = [f.name for f in fields(self)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise InvalidSettingError(f"unknown service setting(s): {', '.join(unknown)}", f"known: {', '.join(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
