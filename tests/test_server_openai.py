"""The real server, driven by the official `openai` client on a loopback port: chat and completions,
streaming and not, give what the Python API gives for the same settings; usage counts are right;
stop strings work over server-sent events."""

from __future__ import annotations

import threading
import time

import pytest
from server_harness import (
    BAN_END_TOKENS,
    MODEL_NAME,
    TINY_CONTEXT,
    serve_for_module,
    sse_events,
    tiny_bundle,
    wait_for_metric,
)

import edgellm
from edgellm.generate.sampling import SamplingParams

pytestmark = pytest.mark.system  # starts server processes

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    yield from serve_for_module(bundle, tmp_path_factory)


@pytest.fixture(scope="module")
def model(bundle):
    """The same bundle in this process: what the server's answers must equal."""
    with edgellm.load(bundle, context_length=TINY_CONTEXT, threads=1) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def expected(model, prompt_ids, max_tokens, stop=(), **sampling):
    chunks = list(model.stream(prompt_ids, max_tokens=max_tokens, stop=stop, sampling=SamplingParams(**sampling)))
    return "".join(c.text for c in chunks), chunks[-1]


def chat_prompt(model, messages=MESSAGES):
    return model.encode_chat(messages)


def test_models_lists_the_one_served_model_by_its_folder_name_and_its_own_name_works_too(client, model):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_NAME]
    assert client.models.retrieve(ids[0]).id == ids[0]
    checkpoint_name = model.manifest.name
    assert checkpoint_name != MODEL_NAME
    reply = client.completions.create(model=checkpoint_name, prompt="Hi", max_tokens=2)
    assert reply.model == MODEL_NAME


def test_a_chat_completion_equals_the_python_api_for_the_same_seed(client, model):
    settings = dict(temperature=0.9, top_k=20, top_p=0.9, seed=11)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=40, **_openai(settings))
    text, final = expected(model, chat_prompt(model), 40, **settings)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == final.finish_reason
    assert reply.usage.prompt_tokens == len(chat_prompt(model))
    assert reply.usage.completion_tokens == final.stats.generated_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def _openai(settings):
    """top_k is not an OpenAI field: the client sends it through extra_body."""
    settings = dict(settings)
    extra = {k: settings.pop(k) for k in ("top_k", "min_p") if k in settings}
    return {**settings, "extra_body": extra} if extra else settings


@pytest.mark.parametrize("seed", [0, 5])
def test_streamed_chat_text_equals_the_non_streamed_text_for_the_same_seed(client, seed):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not_equal_the_python_api_and_count_usage(client, model):
    prompt = "Once upon a time"
    settings = dict(temperature=0.0)
    text, final = expected(model, model.encode(prompt), 50, **settings)
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=50, **settings)
    streamed = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
            **settings,
        )
    )
    assert whole.choices[0].text == text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert whole.choices[0].finish_reason == final.finish_reason
    assert whole.usage.prompt_tokens == len(model.encode(prompt)) == streamed[-1].usage.prompt_tokens
    assert whole.usage.completion_tokens == final.stats.generated_tokens == streamed[-1].usage.completion_tokens


def test_max_tokens_is_honoured_and_reported_as_length(client):
    reply = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=25, temperature=0, logit_bias=BAN_END_TOKENS
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 25


def test_token_id_prompts_are_accepted(client, model):
    ids = model.encode("The quick brown fox")
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_a_stop_string_ends_the_stream_and_never_appears(client, model):
    prompt_ids = chat_prompt(model)
    free, _ = expected(model, prompt_ids, 80, temperature=0, logit_bias={0: -100, 1: -100, 2: -100})
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # a piece from the middle of the greedy answer
    assert len(stop.strip()) > 0
    text, final = expected(model, prompt_ids, 80, stop=[stop], temperature=0, logit_bias={0: -100, 1: -100, 2: -100})
    assert final.finish_reason == "stop" and stop not in text
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=80,
            temperature=0,
            stop=[stop],
            stream=True,
            logit_bias=BAN_END_TOKENS,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text
    assert stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_event_stream_is_well_formed_sse_ending_in_done(server):
    with (
        server.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 8, "stream": True, "temperature": 0},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert len({e["id"] for e in events[:-1]}) == 1


def test_the_event_loop_stays_free_while_a_long_answer_generates(server):
    def long_answer():
        with server.http() as http:
            http.post(
                "/v1/completions",
                json={"prompt": "Hello", "max_tokens": 1500, "temperature": 0, "logit_bias": BAN_END_TOKENS},
            )

    worker = threading.Thread(target=long_answer)
    worker.start()
    try:
        wait_for_metric(server, "edgellm_generation_active", 1)
        with server.http(timeout=5) as http:
            for _ in range(10):
                assert http.get("/health").status_code == 200
        # answered while the long generation still ran: the event loop did not wait for it
        assert server.metrics()["edgellm_generation_active"] == 1
    finally:
        worker.join()


def test_health_and_metrics_report_the_server(server):
    with server.http() as http:
        health = http.get("/health").json()
        metrics_text = http.get("/metrics").text
    assert health["status"] == "ready" and health["model"] == MODEL_NAME
    for name in (
        "edgellm_requests_total",
        "edgellm_generated_tokens_total",
        "edgellm_time_to_first_token_seconds_bucket",
        "edgellm_decode_tokens_per_second_bucket",
        "edgellm_queue_depth",
        "edgellm_resident_memory_bytes",
    ):
        assert name in metrics_text
    values = server.metrics()
    assert values["edgellm_generated_tokens_total"] > 0
    assert (
        values['edgellm_time_to_first_token_seconds_bucket{le="+Inf"}']
        == values["edgellm_time_to_first_token_seconds_count"]
    )
    assert values["edgellm_resident_memory_bytes"] > 10 << 20


def test_each_request_is_one_log_line_with_latency_and_tokens(server):
    server.client().completions.create(
        model=MODEL_NAME, prompt="Log me", max_tokens=3, temperature=0, logit_bias=BAN_END_TOKENS
    )
    deadline = time.monotonic() + 10  # the line is written as the response ends: wait for it, not for a while
    while "completion_tokens=3" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = [line for line in server.log().splitlines() if "POST /v1/completions 200" in line]
    assert lines and "completion_tokens=3" in lines[-1] and "prompt_tokens=" in lines[-1] and "ttft=" in lines[-1]
