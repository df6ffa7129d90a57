"""Connections that cannot crowd the server out: a deadline for each request to arrive, and a cap.

uvicorn's own guard, `limit_concurrency`, counts every open connection and answers 503 to everyone
once the count is reached, /health included, while nothing closes a connection that never finishes
its headers: 70 silent sockets locked every client out. Instead, every connection here must deliver
a whole request (headers and body) within `read_timeout` seconds of opening, or of its previous
response, or it is closed; and when `max_connections` are open, a new connection evicts the oldest
one that is not in the middle of a request (an idle or slow sender) rather than being refused. Only
when every connection is busy with a request is the newcomer closed. A client that sends its
request promptly therefore always gets through, however many idle sockets an attacker holds.
"""

from __future__ import annotations

import collections
import functools
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("edgellm.service.server")


class ConnectionGuard:
    """What the connections of one server share: the limits, and who is waiting for a request."""

    def __init__(self, max_connections: int, read_timeout: float):
        self.max_connections, self.read_timeout = max_connections, read_timeout
        self.waiting: collections.OrderedDict[GuardedH11Protocol, None] = collections.OrderedDict()  # oldest first
        self.evicted = 0
        self.timed_out = 0

    def protocol(self):
        """The protocol factory for uvicorn.Config(http=...)."""
        return functools.partial(GuardedH11Protocol, guard=self)

    def admit(self, newcomer: GuardedH11Protocol) -> bool:
        """Make room for `newcomer`; False when it must be closed instead (every other one is busy)."""
        if len(newcomer.connections) <= self.max_connections:
            return True
        for protocol in self.waiting:
            if protocol is not newcomer:
                self.evicted += 1
                protocol.close("evicted for a new connection")
                return True
        return False


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a read deadline per request (see the module docstring)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.close("refused: every connection is busy with a request")
            return
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._request_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._request_arrived()  # the whole request is in (or the connection is ending)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_request()  # keep-alive: the next request has its own deadline

    def _await_request(self) -> None:
        self._request_arrived()
        self.guard.waiting[self] = None
        self._deadline = self.loop.call_later(self.guard.read_timeout, self._expire)

    def _request_arrived(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        self.guard.timed_out += 1
        self.close(f"no whole request within {self.guard.read_timeout:g} s")

    def close(self, why: str) -> None:
        self._request_arrived()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.debug("closing the connection from %s: %s", client, why)
        if not self.transport.is_closing():
            self.transport.close()
