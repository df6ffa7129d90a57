"""The server's systemd life cycle, seen from a NOTIFY_SOCKET the test owns: READY=1 once the model
is loaded and warmed up, WATCHDOG=1 at WATCHDOG_USEC/2, STOPPING=1 on SIGTERM, then a drain in
which no admitted request is lost, and exit code 0."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
from server_harness import BAN_END_TOKENS, sse_events, start_server, tiny_bundle, wait_until_ready

from edgellm.service.server import sd_notify
from edgellm.service.server.serve import JournalFormatter

pytestmark = pytest.mark.system  # starts server processes


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


class NotifySocket:
    """A datagram socket standing in for systemd: records each message with its arrival time."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="sd-")  # short: sun_path holds 108 bytes
        self.path = os.path.join(self.folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for field in data.decode().split("\n"):
                self.messages.append((time.monotonic(), field))

    def wait_for(self, field: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, seen in self.messages:
                if seen == field:
                    return at
            time.sleep(0.01)
        raise AssertionError(f"no {field} within {timeout} s; got {[m for _, m in self.messages]}")

    def wait_for_count(self, field: str, count: int, after: float, timeout: float = 10) -> list[float]:
        """The times of the first `count` messages `field` after `after`, once they have arrived."""
        deadline = time.monotonic() + timeout
        while len(times := [t for t in self.times(field) if t > after]) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(times)} {field} messages within {timeout} s, expected {count}")
            time.sleep(0.01)
        return times[:count]

    def times(self, field: str) -> list[float]:
        return [at for at, seen in self.messages if seen == field]

    def close(self):
        self._stop = True
        self._reader.join()
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify_socket():
    owned = NotifySocket()
    yield owned
    owned.close()


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(notify_socket):
    assert sd_notify.notify("READY=1", "STATUS=ok", environ={"NOTIFY_SOCKET": notify_socket.path})
    notify_socket.wait_for("STATUS=ok", 2)
    name = f"edgellm-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        assert sd_notify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(100) == b"WATCHDOG=1"
    assert not sd_notify.notify("READY=1", environ={})  # outside systemd: nothing


def test_the_watchdog_timeout_is_read_for_this_process_only():
    assert sd_notify.watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sd_notify.watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert sd_notify.watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sd_notify.watchdog_seconds({}) is None and sd_notify.watchdog_seconds({"WATCHDOG_USEC": "x"}) is None


def test_under_journald_each_line_carries_its_syslog_priority():
    record = logging.LogRecord("edgellm", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert JournalFormatter(journal=True).format(record) == "<4>two | lines"
    assert JournalFormatter(journal=False).format(record).endswith("WARNING two | lines")


def stream_completion(server, max_tokens, results, index):
    with (
        server.http() as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": f"Request {index}",
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": BAN_END_TOKENS,
            },
        ) as response,
    ):
        results[index] = (
            response.status_code,
            sse_events(response) if response.status_code == 200 else response.read(),
        )


def test_ready_watchdog_stopping_and_a_drain_that_loses_no_admitted_request(bundle, tmp_path, notify_socket):
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "300000"}
    with start_server(bundle, tmp_path, env=env, wait_ready=False, config={"grace": 30}) as server:
        ready_at = notify_socket.wait_for("READY=1")
        wait_until_ready(server, 5)  # READY=1 came only once /health says ready
        assert "loaded" in server.log() and server.log().index("loaded") < server.log().index("ready: serving")
        pings = notify_socket.wait_for_count("WATCHDOG=1", 4, after=ready_at)
        assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 0.3  # the contract: within WATCHDOG_USEC

        admitted, results = 4, {}
        threads = [threading.Thread(target=stream_completion, args=(server, 500, results, i)) for i in range(admitted)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            values = server.metrics()
            if values["edgellm_generation_active"] + values["edgellm_queue_depth"] == admitted:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the requests were not admitted")

        server.process.send_signal(15)
        notify_socket.wait_for("STOPPING=1", 5)
        with server.http() as http:
            refused = http.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert server.process.wait(30) == 0
        for thread in threads:
            thread.join()
    assert sorted(results) == list(range(admitted))
    for status, events in results.values():
        assert status == 200
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 500
        assert events[-3]["choices"][0]["finish_reason"] == "length"


def start_long_stream(server, results) -> threading.Thread:
    """A 1,900-token stream in a thread (its status and events land in results[0]), once it generates."""
    thread = threading.Thread(target=stream_completion, args=(server, 1900, results, 0))
    thread.start()
    deadline = time.monotonic() + 5
    while server.metrics()["edgellm_generation_active"] != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    return thread


def test_when_the_grace_period_ends_streams_are_cut_with_an_error_event_and_the_exit_is_0(
    bundle, tmp_path, notify_socket
):
    env = {"NOTIFY_SOCKET": notify_socket.path}
    with start_server(bundle, tmp_path, env=env, config={"grace": 0.3}) as server:
        results = {}
        thread = start_long_stream(server, results)
        started = time.monotonic()
        server.process.send_signal(15)
        assert server.process.wait(10) == 0
        took = time.monotonic() - started
        thread.join()
    status, events = results[0]
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "shutting_down"
    assert took < 3, f"exit took {took:.1f} s with a 0.3 s grace period"
    assert notify_socket.times("STOPPING=1")


def test_a_second_signal_cuts_the_drain_short_and_still_exits_0(bundle, tmp_path):
    with start_server(bundle, tmp_path, config={"grace": 60}) as server:
        results = {}
        thread = start_long_stream(server, results)
        started = time.monotonic()
        server.process.send_signal(15)
        time.sleep(0.05)
        server.process.send_signal(2)
        assert server.process.wait(10) == 0
        took = time.monotonic() - started
        thread.join()
    assert took < 3
    status, events = results[0]
    assert status == 200 and events[-2]["error"]["code"] == "shutting_down" and events[-1] == "[DONE]"
    assert "Traceback" not in server.log()


def test_a_model_that_fails_to_load_exits_1_and_says_why_without_ready(bundle, tmp_path, notify_socket):
    env = {"NOTIFY_SOCKET": notify_socket.path}
    with start_server(bundle, tmp_path, env=env, settings={"max_memory": "1M"}, wait_ready=False) as server:
        assert server.process.wait(60) == 1
        assert "loading" in server.log() and "failed" in server.log() and "MiB" in server.log()
    assert not notify_socket.times("READY=1")
    assert any(m.startswith("STATUS=failed") for _, m in notify_socket.messages)


def test_a_damaged_bundle_fails_before_the_server_binds(bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    weights = broken / "weights.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with start_server(broken, tmp_path, wait_ready=False) as server:
        assert server.process.wait(60) == 1
        assert "truncated" in server.log() and "Uvicorn running" not in server.log()
