"""Idle and slow connections cannot lock clients out: every connection has `read_timeout` seconds to
deliver a whole request, and past `max_connections` a newcomer evicts the oldest idle connection."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import httpx
import pytest
from server_harness import start_server, tiny_bundle

pytestmark = pytest.mark.system  # starts server processes

READ_TIMEOUT = 3.0  # the server's stated limit in these tests (--read-timeout)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


def open_sockets(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def trickle(sockets: list[socket.socket], stop: threading.Event) -> None:
    """Slowloris: a request's headers, a few bytes at a time, never finished."""
    for sock in sockets:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    alive = list(sockets)
    while alive and not stop.wait(0.2):
        for sock in list(alive):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:  # closed by the server
                alive.remove(sock)


def wait_closed_by_server(sockets: list[socket.socket], deadline: float) -> list[socket.socket]:
    """Wait until the server has closed every socket (EOF or reset) or `deadline` passes; the still-open ones."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    still_open = set(sockets)
    while still_open and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            try:
                data = key.fileobj.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                still_open.discard(key.fileobj)
    selector.close()
    return list(still_open)


def test_idle_and_slowloris_connections_neither_block_health_nor_completions_and_are_closed_in_time(bundle, tmp_path):
    with start_server(bundle, tmp_path, config={"read_timeout": READ_TIMEOUT}) as server:
        idle = open_sockets(server.port, 200)
        slow = open_sockets(server.port, 50)
        stop = threading.Event()
        sender = threading.Thread(target=trickle, args=(slow, stop), daemon=True)
        sender.start()
        opened = time.monotonic()
        try:
            with server.http(timeout=1.0) as http:
                started = time.monotonic()
                assert http.get("/health").status_code == 200
                assert time.monotonic() - started < 1.0
            with server.http(timeout=30) as http:
                reply = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
                assert reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None
            left = wait_closed_by_server(idle + slow, deadline=opened + READ_TIMEOUT + 5)
            assert left == [], f"{len(left)} connections still open {READ_TIMEOUT + 5:.0f} s after they opened"
        finally:
            stop.set()
            sender.join(timeout=5)
            for sock in idle + slow:
                sock.close()
        with server.http(timeout=1.0) as http:  # and the server serves as before
            assert http.get("/health").status_code == 200
        assert server.terminate() == 0


def test_past_max_connections_a_new_client_evicts_the_oldest_idle_one(bundle, tmp_path):
    with start_server(bundle, tmp_path, config={"max_connections": 16, "read_timeout": 60}) as server:
        idle = open_sockets(server.port, 40)  # more than the cap, none of them sending anything
        try:
            with server.http(timeout=1.0) as http:
                assert http.get("/health").status_code == 200
                reply = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
                assert reply.status_code == 200
            evicted = len(idle) - len(wait_closed_by_server(idle, deadline=time.monotonic() + 5))
            assert evicted >= len(idle) - 16  # the oldest idle ones made room, long before their timeout
        finally:
            for sock in idle:
                sock.close()


def test_an_idle_keep_alive_connection_is_closed_but_a_prompt_one_is_served(bundle, tmp_path):
    with start_server(bundle, tmp_path, config={"read_timeout": READ_TIMEOUT}) as server:
        with httpx.Client(base_url=server.url, timeout=5) as http:  # keep-alive: one connection, two requests
            assert http.get("/health").status_code == 200
            assert http.get("/v1/models").status_code == 200
