"""The queue under load and under misbehaving clients: 8 concurrent clients and 200 requests get
answers or 429s and nothing else, with flat memory; a full queue answers 429 at once; a client that
goes away mid-answer (or while waiting) frees its place at once; timeouts end a request."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import openai
import pytest
from server_harness import BAN_END_TOKENS, MODEL_NAME, serve_for_module, start_server, tiny_bundle

pytestmark = pytest.mark.system  # starts server processes

CLIENTS = 8
REQUESTS = 200
MAX_QUEUE = 6  # 1 generating + 6 waiting < 8 clients: some requests must be refused
LONG = 1900  # tokens: a second or two on the tiny model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    yield from serve_for_module(bundle, tmp_path_factory, max_queue=MAX_QUEUE)


def wait_for(condition, timeout=5.0, step=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def raw_request(server, path, body) -> socket.socket:
    """Send a request and return the socket without reading: a client that will walk away."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def long_stream_body(**extra):
    return {
        "prompt": "Tell me a long story.",
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        "logit_bias": BAN_END_TOKENS,
        **extra,
    }


def test_eight_clients_and_two_hundred_requests_get_answers_or_429_and_memory_stays_flat(server):
    lock = threading.Lock()
    issued, results, latencies = [0], [], []
    rss = {}
    deadline = time.monotonic() + 150

    def client_loop(index):
        client = server.client(timeout=60)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= REQUESTS:
                    return
                n = issued[0] = issued[0] + 1
            started = time.perf_counter()
            kind = ("chat", "completion")[n % 2]
            stream = n % 3 == 0
            try:
                if kind == "chat":
                    reply = client.chat.completions.create(
                        model=MODEL_NAME,
                        messages=[{"role": "user", "content": f"Question {n}: why?"}],
                        max_tokens=8 + n % 40,
                        temperature=0.8,
                        seed=n,
                        stream=stream,
                    )
                else:
                    reply = client.completions.create(
                        model=MODEL_NAME,
                        prompt=f"Story {n}:",
                        max_tokens=8 + n % 40,
                        temperature=0.8,
                        seed=n,
                        stream=stream,
                    )
                if stream:
                    events = list(reply)
                    assert events[-1].choices[0].finish_reason in ("stop", "length")
                outcome = "ok"
            except openai.RateLimitError as error:
                assert error.code == "queue_full"
                outcome = "429"
                time.sleep(0.05)  # what a polite client does with Retry-After
            except Exception as error:  # anything else fails the test below
                outcome = f"{type(error).__name__}: {error}"
            with lock:
                results.append(outcome)
                latencies.append(time.perf_counter() - started)
                if len(results) == 20:
                    rss["after_20"] = server.rss_bytes()

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    rss["after_all"] = server.rss_bytes()

    errors = [r for r in results if r not in ("ok", "429")]
    ok, refused = results.count("ok"), results.count("429")
    values = server.metrics()
    print(
        f"\nload: {len(results)} requests from {CLIENTS} clients in {elapsed:.1f} s: {ok} answered, {refused} x 429, "
        f"{len(errors)} other errors; latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p95 {sorted(latencies)[int(len(latencies) * 0.95)] * 1000:.0f} ms; "
        f"tokens generated {values['edgellm_generated_tokens_total']:.0f}; "
        f"RSS after 20 requests {rss['after_20'] / 2**20:.1f} MiB, after {len(results)} "
        f"{rss['after_all'] / 2**20:.1f} MiB ({(rss['after_all'] / rss['after_20'] - 1) * 100:+.1f}%)"
    )
    assert len(results) == REQUESTS
    assert not errors, errors[:5]
    assert ok > REQUESTS // 2
    assert abs(rss["after_all"] - rss["after_20"]) <= 0.10 * rss["after_20"]
    assert values["edgellm_generation_active"] == 0 and values["edgellm_queue_depth"] == 0
    assert values.get('edgellm_rejected_total{reason="queue_full"}', 0) == refused


def test_a_full_queue_answers_429_at_once_with_retry_after(server):
    walkers = [raw_request(server, "/v1/completions", long_stream_body())]
    assert wait_for(lambda: server.metrics()["edgellm_generation_active"] == 1)
    walkers += [raw_request(server, "/v1/completions", long_stream_body()) for _ in range(MAX_QUEUE)]
    try:
        assert wait_for(lambda: server.metrics()["edgellm_queue_depth"] == MAX_QUEUE)
        with server.http() as http:
            started = time.perf_counter()
            response = http.post("/v1/completions", json={"prompt": "one more", "max_tokens": 4})
            waited = time.perf_counter() - started
        assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        assert response.headers["retry-after"] == "1"
        assert waited < 0.5
    finally:
        for sock in walkers:
            sock.close()
    # every walker's place is freed: the queue empties and the model stops without finishing 7 x LONG tokens
    assert wait_for(lambda: server.metrics()["edgellm_queue_depth"] == 0, 2)
    assert wait_for(lambda: server.metrics()["edgellm_generation_active"] == 0, 2)


def test_a_client_that_disconnects_mid_stream_frees_its_slot_and_stops_the_generation(server):
    before = server.metrics()
    with server.http() as http, http.stream("POST", "/v1/completions", json=long_stream_body()) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]  # a few events, then hang up mid-answer
        assert any(line.startswith("data: ") for line in received)
    hung_up = time.perf_counter()
    assert wait_for(lambda: server.metrics()["edgellm_generation_active"] == 0, 2), "generation did not stop"
    stopped_after = time.perf_counter() - hung_up
    after = server.metrics()
    cancelled = 'edgellm_cancelled_total{reason="client_disconnected"}'
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    generated = after["edgellm_generated_tokens_total"] - before["edgellm_generated_tokens_total"]
    assert generated < LONG / 2, f"{generated} tokens were generated for a client that left"
    started = time.perf_counter()
    reply = server.client().completions.create(
        model=MODEL_NAME, prompt="Next!", max_tokens=4, temperature=0, logit_bias=BAN_END_TOKENS
    )
    served_in = time.perf_counter() - started
    print(
        f"\ndisconnect: generation stopped {stopped_after * 1000:.0f} ms after the client left, having made "
        f"{generated:.0f} of {LONG} tokens; the next request was answered in {served_in * 1000:.0f} ms"
    )
    assert reply.usage.completion_tokens == 4
    assert served_in < 1.0
    assert "finish=client_disconnected" in server.log()


def test_a_client_that_disconnects_while_waiting_leaves_the_queue_at_once(server):
    running = raw_request(server, "/v1/completions", long_stream_body())
    assert wait_for(lambda: server.metrics()["edgellm_generation_active"] == 1)
    waiting = raw_request(server, "/v1/completions", long_stream_body())
    try:
        assert wait_for(lambda: server.metrics()["edgellm_queue_depth"] == 1)
        waiting.close()
        assert wait_for(lambda: server.metrics()["edgellm_queue_depth"] == 0, 1)
        assert server.metrics()["edgellm_generation_active"] == 1  # the first one goes on
    finally:
        running.close()
    assert wait_for(lambda: server.metrics()["edgellm_generation_active"] == 0, 2)


def test_the_request_timeout_ends_a_running_request_with_504_or_an_error_event(bundle, tmp_path):
    with start_server(bundle, tmp_path, config={"timeout": 0.5}) as running:
        with pytest.raises(openai.APIStatusError) as timed_out:
            running.client().completions.create(model=MODEL_NAME, **long_stream_body(stream=False))
        assert timed_out.value.status_code == 504 and timed_out.value.code == "timeout"
        with running.http() as http, http.stream("POST", "/v1/completions", json=long_stream_body()) as response:
            events = [
                json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                for line in response.iter_lines()
                if line.startswith("data: ")
            ]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        assert len(events) > 3  # the tokens before the deadline were sent
        assert wait_for(lambda: running.metrics().get('edgellm_cancelled_total{reason="timeout"}') == 2)
        assert running.terminate() == 0
