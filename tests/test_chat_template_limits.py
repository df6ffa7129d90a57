"""A hostile chat template (it loops for hours, computes a huge power, builds a gigabyte string, recurses
without end) costs its time limit and ends in one clear error, in the Python API, `edgellm run`,
`edgellm chat` and `edgellm serve`; nothing stays spinning, and the server answers normally after."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_harness import start_server

import edgellm
from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.generate.chat_template import RENDER_SECONDS, ChatTemplateError, TemplateRenderer, render_chat

HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "lipsum": "{{ lipsum(1000000) }}",
    "a huge power": "{{ 9**(9**9) }}",
    "a 1 GB string": "{{ 'a' * 10**9 }}",
    "a doubling string": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "a recursion bomb": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}
# From the start of a command to its error: the interpreter, the model's load and the render's limit.
COMMAND_DEADLINE = RENDER_SECONDS + 30
MESSAGES = [{"role": "user", "content": "Hi"}]


def hostile_bundle(tiny_llama_bundle: Path, folder: Path, template: str) -> Path:
    bundle = Path(shutil.copytree(tiny_llama_bundle, folder / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["chat_template"] = template
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_template_is_a_clear_error_within_the_limit_and_the_renderer_recovers(kind):
    renderer = TemplateRenderer()
    try:
        started = time.monotonic()
        with pytest.raises(ChatTemplateError) as failure:
            render_chat(HOSTILE[kind], MESSAGES, renderer=renderer)
        assert time.monotonic() - started < RENDER_SECONDS + 5  # + the child's interpreter start
        assert isinstance(failure.value, InvalidSettingError) and not failure.value.refused
        assert render_chat("{{ messages[0]['content'] }}!", MESSAGES, renderer=renderer) == "Hi!"
    finally:
        renderer.close()


def test_a_template_that_refuses_the_conversation_says_so_without_a_fix_hint():
    with pytest.raises(ChatTemplateError, match="roles must alternate") as failure:
        render_chat("{{ raise_exception('roles must alternate') }}", MESSAGES)
    assert failure.value.refused


def edgellm_cli(*args: str, stdin: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "edgellm", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=COMMAND_DEADLINE + 60,
    )
    return done, time.monotonic() - started


@pytest.mark.parametrize("kind", ["nested loops", "a 1 GB string", "a recursion bomb"])
def test_run_ends_in_one_error_line_within_the_limit(tiny_llama_bundle, tmp_path, kind):
    bundle = hostile_bundle(tiny_llama_bundle, tmp_path, HOSTILE[kind])
    done, seconds = edgellm_cli("run", str(bundle), "Hi", "-n", "4")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr and "chat template" in lines[0]
    assert seconds < COMMAND_DEADLINE
    raw, _ = edgellm_cli("run", str(bundle), "Hi", "-n", "4", "--raw")  # the model itself is fine
    assert raw.returncode == 0, raw.stderr


def test_chat_reports_the_error_for_the_turn_and_goes_on(tiny_llama_bundle, tmp_path):
    bundle = hostile_bundle(tiny_llama_bundle, tmp_path, HOSTILE["nested loops"])
    done, seconds = edgellm_cli("chat", str(bundle), "-n", "4", stdin="Hi\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert f"error: the chat template did not finish within {RENDER_SECONDS:g} s" in done.stderr
    assert "Traceback" not in done.stderr
    assert seconds < COMMAND_DEADLINE


def test_the_python_api_raises_and_keeps_the_session_usable(tiny_llama_bundle, tmp_path):
    bundle = hostile_bundle(tiny_llama_bundle, tmp_path, HOSTILE["a huge power"])
    with edgellm.load(bundle) as model:
        session = model.chat_session(max_tokens=4)
        with pytest.raises(EdgeLLMError, match="integer"):
            list(session.send("Hi"))
        assert session.turns == []
        assert model.generate("Hi", max_tokens=3, temperature=0) is not None


@pytest.mark.system
def test_the_server_answers_400_in_time_stays_healthy_and_exits_0(tiny_llama_bundle, tmp_path):
    bundle = hostile_bundle(tiny_llama_bundle, tmp_path, HOSTILE["nested loops"])
    with start_server(bundle, tmp_path, settings={"context_length": 512}) as server:
        with server.http() as http:
            for _ in range(3):  # more than one: each kills and replaces the renderer
                started = time.monotonic()
                reply = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
                assert reply.status_code == 400, reply.text
                assert "chat template" in reply.json()["error"]["message"]
                assert time.monotonic() - started < RENDER_SECONDS + 5
            assert http.get("/health").status_code == 200
            completion = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"]
        assert server.terminate() == 0
    assert "chat template fails" in server.log()


def test_an_export_refuses_a_template_that_cannot_render_a_plain_conversation(tmp_path):
    from tiny_models import make_tiny_model, save_tiny_model

    from edgellm.export.exporter import export_model

    hf = save_tiny_model(make_tiny_model("llama", tie=True), tmp_path / "hf")
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["chat_template"] = HOSTILE["nested loops"]
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError, match="cannot render a plain conversation"):
        export_model(hf, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_nothing_is_left_spinning_after_sigterm(tiny_llama_bundle, tmp_path):
    """`edgellm run` stopped mid-render: the interpreter and its template child are gone at once."""
    bundle = hostile_bundle(tiny_llama_bundle, tmp_path, HOSTILE["nested loops"])
    process = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "run", str(bundle), "Hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    children = _wait_for_children(process.pid, deadline=time.monotonic() + 30)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    for pid in children:
        _wait_gone(pid, deadline=time.monotonic() + 10)


def _wait_for_children(pid: int, deadline: float) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        children = [int(c) for c in path.read_text().split()] if path.exists() else []
        if children:
            return children
        time.sleep(0.05)
    raise AssertionError("the template child never started")


def _wait_gone(pid: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still running")
