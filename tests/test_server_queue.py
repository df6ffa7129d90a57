"""The admission queue and the app's life cycle in-process, over a scripted model whose steps take
as long as a test needs (a long prefill, a stuck step, a slow load)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from edgellm.generate.generation import Chunk, GenerationStats
from edgellm.service.server.app import ServerState, create_app
from edgellm.service.server.config import ServerConfig
from edgellm.service.server.metrics import Histogram, Registry
from edgellm.service.server.queue import AdmissionQueue, Draining, QueueFull


class ScriptedModel:
    """Model's serving surface: `astream` yields max_tokens chunks of "a", each after `step` seconds
    (the first after `first_step`: the prefill)."""

    manifest = SimpleNamespace(name="scripted")
    chat_template = "{{ messages }}"
    context_length = 64
    config = SimpleNamespace(vocab_size=100)

    def __init__(self, step=0.001, first_step=0.001, loaded: threading.Event | None = None):
        self.step, self.first_step = step, first_step
        self.loaded = loaded or threading.Event()
        if loaded is None:
            self.loaded.set()
        self.running = 0
        self.most_running = 0

    def encode(self, text, parse_special=False):
        return [1] * max(1, len(text.split()))

    def encode_chat(self, messages, add_generation_prompt=True, seconds=None):
        return self.encode(" ".join(m["content"] for m in messages))

    def stream(self, prompt, max_tokens=1, **kwargs):  # the warm-up
        self.loaded.wait()
        yield Chunk("", None, "length", GenerationStats(prompt_tokens=len(prompt)))

    async def astream(self, prompt, max_tokens=4, stop=(), sampling=None):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            for i in range(max_tokens):
                await asyncio.sleep(self.first_step if i == 0 else self.step)
                yield Chunk("a", i)
            yield Chunk("", None, "length", GenerationStats(prompt_tokens=len(prompt), generated_tokens=max_tokens))
        finally:
            self.running -= 1

    def close(self):
        pass


async def collect(generation):
    chunks = []
    while (chunk := await generation.next_chunk()) is not None:
        chunks.append(chunk)
    return chunks


def run(coroutine):
    return asyncio.run(coroutine)


def test_one_generation_runs_max_waiting_wait_and_the_next_is_refused_at_once():
    async def scenario():
        model = ScriptedModel(step=0.01)
        queue = AdmissionQueue(model, max_waiting=2)
        queue.start()
        admitted = [queue.submit([1], max_tokens=3) for _ in range(3)]
        with pytest.raises(QueueFull):
            queue.submit([1], max_tokens=3)
        results = [await collect(g) for g in admitted]
        queue.submit([1], max_tokens=1)  # room again
        await queue.drain(1)
        await queue.close()
        return model, results

    model, results = run(scenario())
    assert [len(r) for r in results] == [4, 4, 4]  # 3 tokens and the final chunk each
    assert model.most_running == 1  # one generation at a time, whatever the queue holds


def test_a_waiting_generation_that_is_cancelled_leaves_the_queue_at_once():
    async def scenario():
        queue = AdmissionQueue(ScriptedModel(step=0.05), max_waiting=1)
        queue.start()
        running = queue.submit([1], max_tokens=5)
        waiting = queue.submit([1], max_tokens=5)
        await asyncio.sleep(0.01)
        assert queue.full
        waiting.cancel("client_disconnected")
        assert not queue.full and len(queue.waiting) == 0  # no need to wait for the running one
        assert await collect(waiting) == [] and waiting.cancel_reason == "client_disconnected"
        queue.submit([1], max_tokens=1)
        assert len(await collect(running)) == 6
        await queue.drain(2)
        await queue.close()

    run(scenario())


def test_a_running_generation_that_is_cancelled_stops_after_the_step_in_flight():
    async def scenario():
        queue = AdmissionQueue(ScriptedModel(step=0.01), max_waiting=1)
        queue.start()
        generation = queue.submit([1], max_tokens=1000)
        await generation.next_chunk()
        generation.cancel("timeout")
        started = time.monotonic()
        await queue.drain(1)
        return generation, time.monotonic() - started

    generation, stopped_in = run(scenario())
    assert generation.state == "done" and generation.tokens < 5 and stopped_in < 0.1


def test_a_generation_that_delivered_its_last_chunk_keeps_its_finish_reason_when_cancelled_after():
    """A shutdown that lands after the last chunk went out (before the worker closed the stream) must not
    turn the logged "stop" into "shutdown": the client received a finished answer."""

    async def scenario():
        queue = AdmissionQueue(ScriptedModel(step=0.001), max_waiting=1)
        queue.start()
        generation = queue.submit([1], max_tokens=2)
        while (chunk := await generation.next_chunk()) is not None and chunk.finish_reason is None:
            pass
        generation.cancel("shutdown")
        await queue.drain(1)
        return generation

    generation = run(scenario())
    assert generation.finish_reason == "length" and generation.cancel_reason is None


def test_draining_refuses_new_work_and_lets_admitted_work_finish_within_the_grace_period():
    async def scenario():
        queue = AdmissionQueue(ScriptedModel(step=0.01), max_waiting=3)
        queue.start()
        admitted = [queue.submit([1], max_tokens=5) for _ in range(3)]
        drained = asyncio.ensure_future(queue.drain(5))
        await asyncio.sleep(0)
        with pytest.raises(Draining):
            queue.submit([1])
        cancelled = await drained
        return cancelled, admitted

    cancelled, admitted = run(scenario())
    assert cancelled == 0
    assert all(g.finish_reason == "length" and g.cancel_reason is None for g in admitted)


def test_draining_cancels_what_is_left_when_the_grace_period_ends():
    async def scenario():
        queue = AdmissionQueue(ScriptedModel(step=0.01), max_waiting=3)
        queue.start()
        admitted = [queue.submit([1], max_tokens=1000) for _ in range(3)]
        started = time.monotonic()
        cancelled = await queue.drain(0.1)
        return cancelled, admitted, time.monotonic() - started

    cancelled, admitted, took = run(scenario())
    assert cancelled == 3 and took < 0.5
    assert all(g.cancel_reason == "shutdown" and g.state == "done" for g in admitted)


def test_the_worker_is_alive_when_idle_or_stepping_and_not_when_a_step_hangs():
    async def scenario():
        queue = AdmissionQueue(ScriptedModel(first_step=0.5), max_waiting=1)
        assert not queue.alive(1.0)  # not started
        queue.start()
        await asyncio.sleep(0)
        idle = queue.alive(0.1)
        generation = queue.submit([1], max_tokens=1)
        await asyncio.sleep(0.2)
        hanging = queue.alive(0.1)  # the prefill has taken 0.2 s of a 0.1 s limit
        patient = queue.alive(1.0)
        await collect(generation)
        return idle, hanging, patient, queue.alive(0.1)

    assert run(scenario()) == (True, False, True, True)


@pytest.fixture
def client_for():
    from fastapi.testclient import TestClient

    clients = []

    def make(model, **config):
        state = ServerState("scripted", ServerConfig(**config), model=model)
        client = TestClient(create_app(state))
        client.__enter__()
        clients.append(client)
        return client, state

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_a_request_whose_deadline_passes_in_the_queue_gets_504_and_leaves_the_queue(client_for):
    # A prefill of 1.5 s cannot be interrupted; a request waiting behind it with a 0.5 s timeout gives up.
    client, state = client_for(ScriptedModel(first_step=1.5), timeout=0.5)
    assert client.get("/health").json()["status"] == "ready"
    blocker = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": {"prompt": "x"}})
    blocker.start()
    deadline = time.monotonic() + 2
    while state.queue.current is None and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    response = client.post("/v1/completions", json={"prompt": "y", "max_tokens": 1})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 1.0
    assert len(state.queue.waiting) == 0
    blocker.join()


def test_while_the_model_loads_health_says_loading_and_requests_get_503(client_for):
    loaded = threading.Event()
    client, state = client_for(ScriptedModel(loaded=loaded))
    try:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        response = client.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "loading"
        assert response.headers["retry-after"] == "2"
    finally:
        loaded.set()
    deadline = time.monotonic() + 2
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()["choices"][0]["text"] == "aa"


def test_histograms_render_cumulative_buckets_in_prometheus_text():
    registry = Registry()
    histogram = registry.add(Histogram("x_seconds", "help text", (0.1, 1.0)))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    lines = registry.render().splitlines()
    assert lines == [
        "# HELP x_seconds help text",
        "# TYPE x_seconds histogram",
        'x_seconds_bucket{le="0.1"} 2',
        'x_seconds_bucket{le="1"} 3',
        'x_seconds_bucket{le="+Inf"} 4',
        "x_seconds_sum 3.65",
        "x_seconds_count 4",
    ]
