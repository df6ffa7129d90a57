"""`edgellm serve`: uvicorn around the app, with systemd's life cycle.

  start     read the manifest (a bad bundle fails here, before binding), bind, load the model in
            the background (GET /health: loading), warm it up, then READY=1
  run       WATCHDOG=1 every WatchdogSec/2 while the generation loop is idle or moving
  SIGTERM   STOPPING=1, refuse new requests (503), give admitted ones the grace period, cancel
            what is left, close the listener, exit 0 (SIGINT, Ctrl-C, does the same); a second
            signal cancels every admitted request at once, a third exits without cleaning up

Exit codes: 0 after a signal, 1 when the model could not be loaded (systemd's Restart=on-failure
tries again; the message says why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

from edgellm.errors import EdgeLLMError
from edgellm.service.server import sd_notify
from edgellm.service.server.app import ServerState, create_app
from edgellm.service.server.config import ServerConfig
from edgellm.service.server.connections import ConnectionGuard
from edgellm.settings import RuntimeSettings

try:
    import fastapi  # noqa: F401  (app.py's; checked here so that the message names the extra)
    import uvicorn
except ImportError as missing:
    raise EdgeLLMError(
        f"the server needs fastapi and uvicorn ({missing.name} is not installed)", "pip install 'edgellm[serve]'"
    ) from None

log = logging.getLogger("edgellm.service.server")

# uvicorn's own backstop after our drain: connections still open then are closed.
UVICORN_SHUTDOWN_TIMEOUT = 5.0
OTHER_FILES = 128  # descriptors besides connections: the bundle, the model's libraries, logs, the template child
JOURNAL_LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) a line is "<priority>message": journald stores the level
    and adds the time itself. Elsewhere: "time level message"."""

    def __init__(self, journal: bool):
        super().__init__("%(message)s" if journal else "%(asctime)s %(levelname)s %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")  # one record, one journal entry
        return f"<{JOURNAL_LEVELS.get(record.levelno, 6)}>{text}" if self.journal else text


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    for name in ("edgellm", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # the app logs one line per request itself


def raise_open_files_limit(wanted: int) -> None:
    """Raise the soft limit on open files towards `wanted` (systemd and shells default to 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` names, or EdgeLLMError (a port in use, an unknown name)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {error.strerror}", "check --host") from None
    listeners = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as error:
        for sock in listeners:
            sock.close()
        raise EdgeLLMError(
            f"cannot listen on {host}:{port}: {error.strerror}",
            "another process uses this port: stop it, or choose another --port",
        ) from None
    return listeners


def run_server(bundle: str | Path, config: ServerConfig, settings: RuntimeSettings | None = None) -> int:
    """Serve `bundle` until SIGTERM/SIGINT; returns the process exit code."""
    configure_logging()

    exit_code = [0]
    server_box: list = []

    def on_fatal(error: BaseException) -> None:
        exit_code[0] = 1
        sd_notify.notify(f"STATUS=failed: {error}", f"ERRNO={getattr(error, 'errno', None) or 22}")
        if server_box:
            server_box[0].should_exit = True  # uvicorn then exits its loop

    state = ServerState(bundle, config, settings, on_fatal=on_fatal)  # reads the manifest: EdgeLLMError here
    listeners = bind_listeners(config.host, config.port)  # a port in use: EdgeLLMError here, before loading
    if not config.loopback_only and not config.api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach this port can use the model "
            "(pass --api-key-file or set EDGELLM_API_KEY)",
            config.host,
        )
    app = create_app(state)
    raise_open_files_limit(config.max_connections + OTHER_FILES)
    guard = ConnectionGuard(config.max_connections, config.read_timeout)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=UVICORN_SHUTDOWN_TIMEOUT,
        lifespan="on",
        http=guard.protocol(),
        server_header=False,
    )
    server = DrainingServer(uv_config, state)
    server_box.append(server)
    sd_notify.notify("STATUS=loading the model")
    asyncio.run(_serve(server, state, config, listeners))
    if not server.started and exit_code[0] == 0:
        exit_code[0] = 1  # could not bind (uvicorn logged why)
    return exit_code[0]


async def _serve(server: DrainingServer, state, config: ServerConfig, listeners: list[socket.socket]) -> None:
    tasks = [asyncio.create_task(_announce_ready(server, state, config), name="edgellm-ready")]
    timeout = sd_notify.watchdog_seconds()
    if timeout:
        # the worker may take up to the whole watchdog timeout for one step (a long prefill)
        tasks.append(
            asyncio.create_task(sd_notify.watchdog(lambda: state.alive(timeout), timeout), name="edgellm-watchdog")
        )
    try:
        await server.serve(listeners)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _announce_ready(server: DrainingServer, state, config: ServerConfig) -> None:
    await state.ready.wait()
    while not server.started:  # the model may be ready before uvicorn has bound the socket
        await asyncio.sleep(0.01)
    if state.status != "ready":
        return
    log.info(
        "ready: serving %s on http://%s:%d (queue %d, timeout %.0f s%s)",
        state.model_name,
        config.host,
        config.port,
        config.max_queue,
        config.timeout,
        ", API key required" if config.api_key else "",
    )
    sd_notify.notify("READY=1", f"STATUS=serving {state.model_name} on {config.host}:{config.port}")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of exiting at once.

    uvicorn installs `handle_exit` as the signal handler (and re-raises caught signals after
    serving, which would turn exit 0 into death by SIGTERM); overriding it keeps both in our hands.
    """

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self.signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self._loop is None or self.signals > 2:  # not serving yet, or a third signal: uvicorn's hard exit
            self.should_exit = self.force_exit = True
        elif self.signals == 2:  # cut the drain short: every admitted request ends after the step in flight
            self._loop.call_soon_threadsafe(self._cancel_all, sig)
        else:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain(sig), name="edgellm-drain"))

    def _cancel_all(self, sig: int) -> None:
        cancelled = self.state.queue.cancel_all("shutdown") if self.state.queue is not None else 0
        log.warning("%s again: exiting now (cancelled %d request(s))", signal.Signals(sig).name, cancelled)

    async def _drain(self, sig: int) -> None:
        grace = self.state.config.grace
        log.info("%s: draining (no new requests; %.0f s for the ones admitted)", signal.Signals(sig).name, grace)
        sd_notify.notify("STOPPING=1", "STATUS=draining")
        try:
            await self.state.drain(grace)
        finally:
            self.should_exit = True
