"""`edgellm service install | uninstall`: the systemd unit for one bundle on one board.

The unit is rendered from boards/systemd/edgellm.service.in. Settings come, in order of
precedence, from explicit arguments (CLI flags), the board's service overrides (a TOML table, see
boards/README.md), and defaults; MemoryMax= defaults to the model's memory estimate plus headroom.
Installing writes /etc/systemd/system/edgellm.service (or prints it: dry run) and says which
systemctl commands start it; nothing here talks to systemd itself.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgellm
from edgellm.backends.memory import MIB, estimate
from edgellm.boards import UNIT_TEMPLATE
from edgellm.boards.profile import load_profile, profile_from_mapping
from edgellm.bundle.manifest import Manifest, read_manifest
from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.service.options import ServiceOptions
from edgellm.settings import BACKENDS, RuntimeSettings
from edgellm.units import TOMLDecodeError, format_bytes, load_toml

UNIT_NAME = "edgellm.service"
UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME
CREDENTIAL = "edgellm-api-key"  # the API key reaches the dynamic user as a systemd credential
# What the server adds to the runtime's own estimate (FastAPI, pydantic, uvicorn), and headroom on
# top: MemoryMax= is a hard limit, so the kernel kills the service rather than the board swapping.
SERVER_OVERHEAD = 48 * MIB
MEMORY_HEADROOM = 1.25
HOME_ROOTS = ("/home", "/root", "/run/user")  # hidden by ProtectHome=


def load_board(board: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """A board's service settings: from a mapping, a board profile (by name or .toml path: its
    runtime defaults that a unit carries, then its [service] table), or a TOML file that holds only
    service settings (a [service] table, or the settings at top level)."""
    if board is None:
        return {}
    if isinstance(board, Mapping):
        return dict(board.get("service", board))
    path = Path(board)
    if not path.is_file():
        profile = load_profile(str(board))
        return {**profile.service_defaults(), "board": profile.name}  # the service's runtime uses it too
    try:
        data = load_toml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, TOMLDecodeError) as error:
        raise InvalidSettingError(
            f"cannot read board profile {path}: {error}", "see boards/README.md for the profile fields"
        ) from None
    if "name" in data or "cpu" in data:  # a whole board profile
        return profile_from_mapping(data, str(path)).service_defaults()
    return dict(data.get("service", data))


def memory_max_for(manifest: Manifest, options: ServiceOptions) -> int:
    """Bytes for MemoryMax=: the board's figure, else the runtime's estimate for these settings,
    plus the server, plus headroom, rounded up to a MiB."""
    # The board's defaults are already in `options`; the installing machine's board must not mix in.
    settings = RuntimeSettings.resolve(
        environ={}, board="none", threads=options.threads, context_length=options.context, backend=options.backend
    )
    context = settings.context_for(manifest.config.max_position_embeddings)
    # A backend picked at load time ("auto") is sized for the hungriest one it could pick.
    backends = [settings.backend] if settings.backend in BACKENDS else list(BACKENDS)
    needed = max(estimate(manifest, backend, context, settings.prefill_chunk).total for backend in backends)
    needed += SERVER_OVERHEAD
    if options.memory_max is None:
        return math.ceil(needed * MEMORY_HEADROOM / MIB) * MIB
    if needed > options.memory_max:  # a cap the service would be killed at while loading
        raise InvalidSettingError(
            f"the service needs about {format_bytes(needed)} with a context of {context} tokens, more than "
            f"memory_max ({format_bytes(options.memory_max)})",
            "pass a smaller --context, or raise memory_max (--memory-max or the board's [service] table)",
        )
    return options.memory_max


def systemd_quote(word: str) -> str:
    """One word for ExecStart= or a path list: specifiers (%) and variables ($) escaped, quoted if needed."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under_home(path: Path) -> bool:
    return any(path == Path(root) or Path(root) in path.parents for root in HOME_ROOTS)


def python_paths() -> list[Path]:
    """What the service's Python reads: its installation, its venv, its site-packages and edgellm
    itself (an editable install's source folder)."""
    import site

    candidates = [
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        Path(os.path.realpath(sys.executable)).parent.parent,
        Path(edgellm.__file__).resolve().parent,
    ]
    candidates += [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        candidates.append(Path(site.getusersitepackages()))
    return _outermost([p.resolve() for p in candidates if p.exists()])


def _outermost(paths: Sequence[Path]) -> list[Path]:
    """Paths without those inside another one of them, in order."""
    unique = sorted({Path(os.path.abspath(p)) for p in paths}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in unique:
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return kept


def unreadable_by_service(paths: Sequence[Path]) -> list[str]:
    """Why a DynamicUser= service (no group, not the owner) could not read `paths`: each directory on
    the way must be searchable by others, and the files readable by others."""
    problems = []
    for path in paths:
        # Under ProtectHome=tmpfs a path in a home directory is bound into an empty home whose
        # directories systemd creates searchable: only the path itself counts there.
        ancestors = [] if _under_home(path) else list(reversed(path.parents))
        for directory in [*ancestors, path] if path.is_dir() else ancestors:
            try:
                mode = directory.stat().st_mode
            except OSError:
                continue
            if not mode & stat.S_IXOTH:
                problems.append(f"{directory} is not searchable by other users (chmod o+x {directory})")
                break
        files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
        for file in files:
            if file.exists() and not file.stat().st_mode & stat.S_IROTH:
                problems.append(f"{file} is not readable by other users (chmod o+r {file})")
    return list(dict.fromkeys(problems))


def exec_start(bundle: Path, options: ServiceOptions, python: str | None = None) -> str:
    argv = [
        python or sys.executable,
        "-m",
        "edgellm",
        "serve",
        str(bundle),
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--max-queue",
        str(options.max_queue),
        "--timeout",
        f"{options.timeout:g}",
        "--grace",
        f"{options.grace:g}",
    ]
    for flag, value in (
        ("--threads", options.threads),
        ("--context", options.context),
        ("--backend", options.backend),
        ("--board", options.board),
    ):
        if value is not None:
            argv += [flag, str(value)]
    words = [systemd_quote(a) for a in argv]
    if options.api_key_file:
        words += ["--api-key-file", f"%d/{CREDENTIAL}"]  # %d: the service's credentials directory
    return " ".join(words)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def render_unit(
    bundle: str | Path,
    *,
    board: str | Path | Mapping[str, Any] | None = None,
    python: str | None = None,
    template: Path | None = None,
    **overrides: Any,
) -> str:
    """The unit file's text for `bundle`. `overrides` (ServiceOptions fields) beat the board's."""
    bundle = Path(bundle).resolve()
    manifest = read_manifest(bundle)
    options = ServiceOptions().with_overrides(load_board(board)).with_overrides(overrides)
    read_only = [bundle] + (python_paths() if python is None else [])
    hidden = [p for p in _outermost(read_only) if _under_home(p)]
    loopback = _loopback(options.host)
    values: dict[str, Any] = {
        "MODEL": manifest.name or bundle.name,
        "EXEC_START": exec_start(bundle, options, python),
        "ENVIRONMENT": " ".join(systemd_quote(f"{k}={v}") for k, v in sorted(options.environment.items())),
        "CREDENTIAL": f"{CREDENTIAL}:{Path(options.api_key_file).resolve()}" if options.api_key_file else "",
        "TIMEOUT_START": str(options.timeout_start_sec),
        "TIMEOUT_STOP": str(math.ceil(options.grace) + 15),
        "WATCHDOG_SEC": str(options.watchdog_sec),
        "MEMORY_MAX": f"{memory_max_for(manifest, options) // MIB}M",
        "CPU_AFFINITY": options.cpu_affinity or "",
        "NICE": "" if options.nice is None else str(options.nice),
        "PROTECT_HOME": "tmpfs" if hidden else "yes",
        "BIND_READ_ONLY": " ".join(systemd_quote(str(p)) for p in hidden),
        "BUNDLE": systemd_quote(str(bundle)),
        "PRIVATE_DEVICES": "no" if options.device_allow else "yes",
        # device nodes are owned by host groups, which a private user namespace would map away
        "PRIVATE_USERS": "no" if options.device_allow else "yes",
        "SUPPLEMENTARY_GROUPS": " ".join(options.supplementary_groups),
        "DEVICE_ALLOW": list(options.device_allow),
        "IP_ADDRESS_DENY": "any" if loopback or options.ip_address_allow else "",
        "IP_ADDRESS_ALLOW": "localhost" if loopback else " ".join(options.ip_address_allow),
    }
    template = template or UNIT_TEMPLATE  # package data: found in a wheel as in the source tree
    return fill_template(template.read_text(encoding="utf-8"), values)


def fill_template(text: str, values: Mapping[str, Any]) -> str:
    """Replace @NAME@ placeholders. A line whose value is empty is dropped; a list gives one line per item."""
    out = []
    for line in text.splitlines():
        names = re.findall(r"@([A-Z_]+)@", line)
        if not names:
            out.append(line)
            continue
        missing = [n for n in names if n not in values]
        if missing:
            raise EdgeLLMError(f"the unit template names unknown placeholder(s): {', '.join(missing)}")
        lists = [values[n] for n in names if isinstance(values[n], (list, tuple))]
        items = lists[0] if lists else [None]
        for item in items:
            rendered = line
            empty = False
            for name in names:
                value = item if isinstance(values[name], (list, tuple)) else values[name]
                if value is None or value == "":
                    empty = True
                rendered = rendered.replace(f"@{name}@", "" if value is None else str(value))
            if not empty:
                out.append(rendered)
    return "\n".join(out) + "\n"


@dataclass
class InstallResult:
    unit_text: str
    path: Path
    written: bool
    message: str  # what to run next, and warnings


def install(
    bundle: str | Path,
    *,
    board: str | Path | Mapping[str, Any] | None = None,
    dry_run: bool = False,
    unit_path: Path = UNIT_PATH,
    **overrides: Any,
) -> InstallResult:
    """Render the unit and write it to `unit_path` (or only return it: dry run)."""
    bundle = Path(bundle).resolve()
    text = render_unit(bundle, board=board, **overrides)
    warnings = unreadable_by_service([bundle] + python_paths())
    steps = [
        "sudo systemctl daemon-reload",
        f"sudo systemctl enable --now {UNIT_NAME}",
        f"systemctl status {UNIT_NAME}",
        f"journalctl -u {UNIT_NAME} -f",
    ]
    options = ServiceOptions().with_overrides(load_board(board)).with_overrides(overrides)
    steps.append(
        f"curl http://{options.host if options.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{options.port}/health"
    )
    lines = []
    if not dry_run:
        unit_path = Path(unit_path)
        try:
            unit_path.parent.mkdir(parents=True, exist_ok=True)
            partial = unit_path.with_name(unit_path.name + ".tmp")
            partial.write_text(text, encoding="utf-8")
            partial.chmod(0o644)
            partial.replace(unit_path)
        except PermissionError:
            raise EdgeLLMError(
                f"cannot write {unit_path}: permission denied",
                "run it as root (sudo), or pass --dry-run to print the unit",
            ) from None
        lines.append(f"wrote {unit_path}; now run:")
    else:
        lines.append(f"(dry run: nothing written; `edgellm service install` writes {unit_path}) then run:")
    lines += [f"  {step}" for step in steps]
    if warnings:
        lines.append("warning: the service runs as a dynamic user that cannot read everything it needs:")
        lines += [f"  {w}" for w in warnings]
        lines.append("  (or copy the bundle and a virtual environment under /opt or /srv)")
    return InstallResult(text, Path(unit_path), not dry_run, "\n".join(lines))


def uninstall(unit_path: Path = UNIT_PATH) -> str:
    """Remove the unit file and its enablement links; say how to stop a running service."""
    unit_path = Path(unit_path)
    links = [link for link in unit_path.parent.glob(f"*.wants/{unit_path.name}") if link.is_symlink()]
    if not unit_path.exists() and not links:
        raise EdgeLLMError(f"{unit_path} does not exist: nothing to uninstall")
    try:
        for link in links:
            link.unlink()
        if unit_path.exists():
            unit_path.unlink()
    except PermissionError:
        raise EdgeLLMError(f"cannot remove {unit_path}: permission denied", "run it as root (sudo)") from None
    return (
        f"removed {unit_path}"
        + (f" and {len(links)} enablement link(s)" if links else "")
        + f"; now run:\n  sudo systemctl stop {unit_path.name}\n  sudo systemctl daemon-reload"
    )
