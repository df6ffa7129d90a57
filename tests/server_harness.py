"""Helpers for the server tests (not a test module): a tiny exported bundle, and the real server
started in a child process on a free loopback port, optionally inside the unit's syscall sandbox."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

TINY_CONTEXT = 2048  # long enough that a 1500-token answer takes a second or more
MODEL_NAME = "tiny-llama"  # the bundle folder's name: the id the server serves it as
BAN_END_TOKENS = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>: answers run to max_tokens


def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny random llama exported to an int4 bundle, once per test session."""
    bundle = tmp_path_factory.getbasetemp() / "server-tiny" / MODEL_NAME
    if (bundle / "manifest.json").is_file():
        return bundle
    from tiny_models import make_tiny_model, save_tiny_model

    from edgellm.export.exporter import export_model

    hf = save_tiny_model(make_tiny_model("llama", tie=True, max_position_embeddings=TINY_CONTEXT), bundle.parent / "hf")
    export_model(hf, bundle)
    return bundle


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Run in the child before anything else: optionally the unit's seccomp policy, then the server.
LAUNCHER = textwrap.dedent("""
    import json, sys
    args = json.loads(sys.argv[1])
    if args.get("sandbox"):
        sys.path.insert(0, args["tests"])
        from server_harness import apply_unit_sandbox
        apply_unit_sandbox(args["sandbox"])
    from edgellm.service.server.config import ServerConfig
    from edgellm.service.server.serve import run_server
    from edgellm.settings import RuntimeSettings
    sys.exit(run_server(args["bundle"], ServerConfig(**args["config"]), RuntimeSettings.resolve(**args["settings"])))
""")


class RunningServer:
    def __init__(self, process: subprocess.Popen, port: int, log_path: Path, api_key: str | None):
        self.process, self.port, self.log_path, self.api_key = process, port, log_path, api_key
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kwargs):
        from openai import OpenAI

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("api_key", self.api_key or "unused")
        return OpenAI(base_url=self.url + "/v1", **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metrics(self) -> dict[str, float]:
        with self.http() as http:
            text = http.get("/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the server did not exit within {timeout} s of SIGTERM:\n{self.log()[-3000:]}"
            ) from None

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_server(
    bundle: Path,
    log_dir: Path,
    *,
    config: dict | None = None,
    settings: dict | None = None,
    env: dict | None = None,
    sandbox: dict | None = None,
    wait_ready: bool = True,
    ready_timeout: float = 90,
) -> RunningServer:
    port = free_port()
    config = {"port": port, **(config or {})}
    settings = {"context_length": TINY_CONTEXT, "threads": 1, **(settings or {})}
    args = {
        "bundle": str(bundle),
        "config": config,
        "settings": settings,
        "sandbox": sandbox,
        "tests": str(Path(__file__).parent),
    }
    log_path = Path(log_dir) / f"server-{port}.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
    child_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, json.dumps(args)], stdout=log, stderr=subprocess.STDOUT, env=child_env
        )
    server = RunningServer(process, port, log_path, config.get("api_key"))
    if wait_ready:
        wait_until_ready(server, ready_timeout)
    return server


def serve_for_module(bundle: Path, tmp_path_factory, **config) -> Iterator[RunningServer]:
    """The body of a module-scoped `server` fixture: one server for the module's tests, which must
    still shut down cleanly (exit 0) after them."""
    with start_server(bundle, tmp_path_factory.mktemp("logs"), config=config) as running:
        yield running
        assert running.terminate() == 0


def wait_until_ready(server: RunningServer, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.process.kill()
    raise AssertionError(f"the server was not ready within {timeout} s:\n{server.log()[-3000:]}")


def wait_for_metric(server: RunningServer, name: str, value: float, timeout: float = 10) -> None:
    """Until the server's metric `name` reads `value` (AssertionError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while server.metrics().get(name) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never became {value} within {timeout} s")
        time.sleep(0.005)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of a server-sent event stream: dicts, and the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# -- the unit's syscall sandbox, applied to a process without systemd ---------------------------
# systemd 252 builds these with libseccomp; here the same policy is written as a classic BPF
# program: SystemCallArchitectures=native, SystemCallFilter=@system-service ~@privileged @resources
# (SystemCallErrorNumber=EPERM), MemoryDenyWriteExecute=yes (mmap W+X, mprotect/pkey_mprotect +X,
# shmat SHM_EXEC refused) and RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX. x86-64 only.
AUDIT_ARCH_X86_64 = 0xC000003E
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def unit_syscall_policy(unit_text: str) -> dict:
    """The allowed syscall names of a rendered unit, expanded with `systemd-analyze syscall-filter`."""
    groups: dict[str, list[str]] = {}
    current = None
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    allowed: set[str] = set()
    for line in unit_text.splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1].split()
            if value[0].startswith("~"):
                allowed -= expand([value[0][1:], *value[1:]])
            else:
                allowed |= expand(value)
    return {"allowed": sorted(allowed), "mdwe": "MemoryDenyWriteExecute=yes" in unit_text}


def apply_unit_sandbox(policy: dict) -> None:
    import ctypes
    import errno
    import struct

    numbers = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()))
    allowed = sorted({int(numbers[name]) for name in policy["allowed"] if name in numbers})
    LD_ABS, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000

    def errno_(code: int) -> int:
        return 0x00050000 | code

    def arg(i: int) -> int:
        return 16 + 8 * i  # the low 32 bits of args[i] on a little-endian machine

    prog = [
        (LD_ABS, 0, 0, 4),
        (JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (RET, 0, 0, KILL),
        (LD_ABS, 0, 0, 0),
        (JSET, 0, 1, 0x40000000),
        (RET, 0, 0, errno_(errno.EPERM)),
    ]  # no x32 calls
    if policy["mdwe"]:
        PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
        prog += [
            (JEQ, 0, 5, 9),
            (LD_ABS, 0, 0, arg(2)),
            (JSET, 0, 2, PROT_EXEC),  # mmap with W and X
            (JSET, 0, 1, PROT_WRITE),
            (RET, 0, 0, errno_(errno.EPERM)),
            (RET, 0, 0, ALLOW),
        ]
        for nr, flag in ((10, PROT_EXEC), (329, PROT_EXEC), (30, SHM_EXEC)):  # mprotect, pkey_mprotect, shmat
            prog += [
                (JEQ, 0, 4, nr),
                (LD_ABS, 0, 0, arg(2)),
                (JSET, 0, 1, flag),
                (RET, 0, 0, errno_(errno.EPERM)),
                (RET, 0, 0, ALLOW),
            ]
    families = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
    prog += [
        (JEQ, 0, 6, 41),
        (LD_ABS, 0, 0, arg(0)),
        (JEQ, 3, 0, families[0]),
        (JEQ, 2, 0, families[1]),
        (JEQ, 1, 0, families[2]),
        (RET, 0, 0, errno_(errno.EAFNOSUPPORT)),
        (RET, 0, 0, ALLOW),
    ]
    for nr in allowed:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ALLOW)]
    prog.append((RET, 0, 0, errno_(errno.EPERM)))

    raw = b"".join(struct.pack("HBBI", *insn) for insn in prog)
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if (
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0
    ):
        raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")
