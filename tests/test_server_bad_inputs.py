"""Bad requests get the right 4xx with an OpenAI-shaped error body, and the server keeps serving;
a schemathesis run against the server's own OpenAPI document finds no 5xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig

import openai
import pytest
from server_harness import MODEL_NAME, TINY_CONTEXT, serve_for_module, start_server, tiny_bundle

pytestmark = pytest.mark.system  # starts server processes

API_KEY = "sk-test-0123456789abcdef"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    yield from serve_for_module(bundle, tmp_path_factory, api_key=API_KEY)


def assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def still_serving(server):
    with server.http() as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"messages": [', None),  # malformed JSON
        (b'"just a string"', None),
        (b"[]", None),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(server, body, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    still_serving(server)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, None),
        ({"stop": 7}, None),
        ({"logit_bias": {"12": "a lot"}}, None),
        ({"messages": [{"role": "user", "content": "\ud800 half a surrogate pair"}]}, None),
        ({"stop": ["\udfff"]}, None),
    ],
)
def test_wrong_types_are_a_400_naming_the_field(server, change, param):
    body = json.dumps({**CHAT, **change}).encode()  # ASCII JSON: surrogates travel as \\uXXXX escapes
    with server.http() as http:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400)
    if param:
        assert error["param"] == param
    still_serving(server)


@pytest.mark.parametrize(
    "change, param, code",
    [
        ({"max_tokens": -1}, "max_tokens", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_tokens": 10**12}, "max_tokens", "context_length_exceeded"),
        ({"max_tokens": TINY_CONTEXT}, "max_tokens", "context_length_exceeded"),
        ({"temperature": -1}, "temperature", None),
        ({"top_p": 0}, "top_p", None),
        ({"presence_penalty": 3}, "presence_penalty", None),
        ({"seed": -5}, "seed", None),
        ({"logit_bias": {"999999": 1}}, "logit_bias", None),
        ({"logit_bias": {"the": 1}}, "logit_bias", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"n": 2}, None, None),
        ({"logprobs": True}, None, None),
    ],
)
def test_values_out_of_range_are_a_400_with_a_message(server, change, param, code):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={**CHAT, **change})
    assert_openai_error(response, 400, param, code)
    still_serving(server)


def test_a_prompt_longer_than_the_context_is_a_400(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": [5] * TINY_CONTEXT, "max_tokens": 1})
        assert_openai_error(response, 400, "prompt", "context_length_exceeded")
        response = http.post("/v1/completions", json={"prompt": [5, 10**9]})
        assert_openai_error(response, 400, "prompt")
        response = http.post("/v1/completions", json={"prompt": ["one", "two"]})
        assert_openai_error(response, 400, "prompt")
    still_serving(server)


def test_an_unknown_model_is_a_404_model_not_found(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"})
        assert_openai_error(response, 404, "model", "model_not_found")
        assert_openai_error(http.get("/v1/models/gpt-17"), 404, code="model_not_found")
    still_serving(server)


def test_a_10_mb_body_is_a_413_and_the_server_keeps_serving(server):
    body = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    with server.http() as http:
        response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(response, 413, code="body_too_large")

        def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b"a" * (1 << 20)

        response = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert_openai_error(response, 413)
    still_serving(server)


def test_unknown_paths_and_methods_are_openai_shaped(server):
    with server.http() as http:
        assert_openai_error(http.get("/v1/nothing"), 404)
        assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_a_missing_or_wrong_api_key_is_a_401(server):
    client = server.client(api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT["messages"], max_tokens=2)
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    import httpx

    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic " + API_KEY},
        {"Authorization": "Bearer " + API_KEY + "x"},
    ):
        response = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert_openai_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    reply = server.client().chat.completions.create(model=MODEL_NAME, messages=CHAT["messages"], max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def test_bad_requests_left_no_generation_running_and_nothing_was_a_500(server):
    values = server.metrics()
    server_errors = [k for k in values if k.startswith("edgellm_requests_total") and 'status="5' in k]
    assert server_errors in ([], ['edgellm_requests_total{path="/health",status="503"}'])  # 503: while loading
    assert values["edgellm_generation_active"] == 0 and values["edgellm_queue_depth"] == 0


def schemathesis_cli() -> str:
    """The schemathesis command of the interpreter running the tests: it is a dev dependency, so a
    missing one fails this test rather than skipping it. `.venv/bin/python -m pytest` does not put the
    venv's bin folder on PATH, so that folder is looked in first."""
    for name in ("schemathesis", "st"):
        found = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
        if found:
            return found
    pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")


def test_schemathesis_finds_no_server_error_in_the_openapi_document(bundle, tmp_path):
    cli = schemathesis_cli()  # before the server starts: a missing tool fails without starting one
    # A short context keeps every generated answer short, so the run stays bounded.
    with start_server(bundle, tmp_path, settings={"context_length": 64}, config={"timeout": 30}) as running:
        command = [
            cli,
            "run",
            running.url + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
            "--no-color",
            "--suppress-health-check",
            "all",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        print(done.stdout[-3000:])
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert running.terminate() == 0
        assert " 500 " not in running.log()
