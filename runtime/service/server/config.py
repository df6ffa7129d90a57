"""Server policy (flags > environment > defaults), validated once; the model's own settings are
RuntimeSettings, passed beside it."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import InvalidSettingError

DEFAULT_HOST = "127.0.0.1"  # loopback: other machines reach the server only if you say so
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 4  # requests waiting for the model while one generates
DEFAULT_TIMEOUT = 300.0  # seconds from arrival to the last token
DEFAULT_MAX_BODY = 1 << 20  # bytes; a long prompt is ~100 kB
DEFAULT_GRACE = 20.0  # seconds in-flight requests get to finish after SIGTERM
DEFAULT_READ_TIMEOUT = 10.0  # seconds a connection has to deliver a whole request (connections.py)
DEFAULT_MAX_CONNECTIONS = 512  # open connections; past it, a newcomer evicts the oldest idle one
API_KEY_VARIABLE = "EDGELLM_API_KEY"


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout: float = DEFAULT_TIMEOUT
    max_body_bytes: int = DEFAULT_MAX_BODY
    grace: float = DEFAULT_GRACE
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    api_key: str | None = field(default=None, repr=False)
    model_name: str | None = None  # the id clients send as "model"; default: the bundle folder's name

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InvalidSettingError(f"host must be an address or a name, got {self.host!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidSettingError(f"port must be in [0, 65535], got {self.port!r}", "e.g. --port 8080")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InvalidSettingError(
                f"max_queue must be a whole number >= 0, got {self.max_queue!r}",
                "it is how many requests may wait while one generates, e.g. --max-queue 4",
            )
        for name in ("timeout", "grace", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise InvalidSettingError(f"{name} must be a positive number of seconds, got {value!r}")
        if (
            not isinstance(self.max_connections, int)
            or isinstance(self.max_connections, bool)
            or self.max_connections < 8
        ):
            raise InvalidSettingError(f"max_connections must be a whole number >= 8, got {self.max_connections!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise InvalidSettingError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes!r}")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise InvalidSettingError(
                "the API key is empty or contains whitespace",
                "put one token (e.g. from `openssl rand -hex 32`) in the key file",
            )

    @property
    def loopback_only(self) -> bool:
        """True when the server is reachable only from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def resolve_api_key(api_key_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key from --api-key-file, else $EDGELLM_API_KEY, else None (no key required)."""
    environ = os.environ if environ is None else environ
    if api_key_file is not None:
        path = Path(api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise InvalidSettingError(
                f"cannot read the API key file {path}: {error.strerror}", "pass a readable file holding one token"
            ) from None
        if not key:
            raise InvalidSettingError(f"the API key file {path} is empty", "put one token in it")
        return key
    key = environ.get(API_KEY_VARIABLE, "").strip()
    return key or None
