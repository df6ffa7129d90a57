"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET, and the watchdog's clock.

systemd (Type=notify) sets NOTIFY_SOCKET to a unix datagram socket ("@name" for an abstract one)
and, with WatchdogSec=, WATCHDOG_USEC (and WATCHDOG_PID, the process that must ping). Outside
systemd neither is set and every call here does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("edgellm.service.server")


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send "READY=1", "STATUS=...", ... in one datagram. False when not under systemd or it failed."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False  # vsock and other families: not for a service on a board
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
        return True
    except OSError as error:
        log.warning("sd_notify to %s failed: %s", environ.get("NOTIFY_SOCKET"), error)
        return False


def watchdog_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd enforces on this process (WatchdogSec=), or None."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6


async def watchdog(alive: Callable[[], bool], timeout: float) -> None:
    """Ping WATCHDOG=1 every timeout/2 while `alive()` says so.

    That the loop runs at all shows the event loop is free; `alive` shows the generation worker
    is idle or stepping. When it is stuck the pings stop, and systemd kills and restarts us.
    """
    stalled = False
    while True:
        await asyncio.sleep(timeout / 2)
        if alive():
            if stalled:
                log.warning("the generation loop is moving again; watchdog pings resume")
            stalled = False
            notify("WATCHDOG=1")
        elif not stalled:
            stalled = True
            log.error("the generation loop made no progress for %.0f s; watchdog pings stop", timeout)
