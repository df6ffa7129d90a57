"""`edgellm run` and `edgellm chat` driven as a user would, in a subprocess."""

import json
import os
import signal
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def bundle(tiny_llama_bundle):
    return tiny_llama_bundle


def edgellm(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def test_json_output_is_one_object_per_chunk_ending_with_stats(bundle):
    done = edgellm("run", str(bundle), "Hello", "--temperature", "0", "-n", "12", "--json")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(r["finish_reason"] is None for r in records[:-1])
    assert records[-1]["finish_reason"] in ("stop", "length")
    assert records[-1]["stats"]["generated_tokens"] == sum(1 for r in records if r["token"] is not None)


def test_plain_output_equals_the_json_text_and_the_python_api(bundle):
    import edgellm as api

    plain = edgellm("run", str(bundle), "Hello", "--temperature", "0", "-n", "12")
    as_json = edgellm("run", str(bundle), "Hello", "--temperature", "0", "-n", "12", "--json")
    joined = "".join(json.loads(line)["text"] for line in as_json.stdout.splitlines())
    assert plain.stdout == joined + "\n"
    with api.load(bundle) as model:
        ids = model.encode_chat([{"role": "user", "content": "Hello"}])
        assert model.generate(ids, temperature=0, max_tokens=12) == joined


def test_the_prompt_is_read_from_stdin_with_a_dash(bundle):
    a = edgellm("run", str(bundle), "-", "--raw", "--temperature", "0", "-n", "6", stdin="Once upon")
    b = edgellm("run", str(bundle), "Once upon", "--raw", "--temperature", "0", "-n", "6")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_stats_go_to_stderr(bundle):
    done = edgellm("run", str(bundle), "Hi", "--temperature", "0", "-n", "4", "--stats")
    assert "decode" in done.stderr and "tok/s" in done.stderr and "peak RSS" in done.stderr


def test_a_stop_string_is_not_printed(bundle):
    full = edgellm("run", str(bundle), "Hello", "--raw", "--temperature", "0", "-n", "20").stdout.rstrip("\n")
    assert len(full) > 6
    stop = full[3:6]
    cut = edgellm("run", str(bundle), "Hello", "--raw", "--temperature", "0", "-n", "20", "--stop", stop).stdout
    assert cut == full[: full.index(stop)] + "\n"


def test_ctrl_c_stops_cleanly_and_keeps_the_partial_output(smollm2_bundle):
    # The real model, so that 2000 tokens take long enough for the signal to land mid-generation.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgellm",
            "run",
            str(smollm2_bundle),
            "Hello",
            "--raw",
            "--temperature",
            "0",
            "-n",
            "2000",
            "--json",
            "--stats",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    streamed = [proc.stdout.readline() for _ in range(8)]  # eight chunks out: it is mid-generation
    assert all(streamed)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    records = [json.loads(line) for line in streamed + out.splitlines()]
    assert proc.returncode == 0, err
    assert records[-1]["finish_reason"] == "cancelled"
    assert records[-1]["stats"]["generated_tokens"] >= 1
    assert "Traceback" not in err


def test_chat_keeps_history_and_obeys_reset_and_exit(bundle):
    script = "Hi, I am Anna.\nWhat is my name?\n/reset\nHello again\n/exit\n"
    done = edgellm("chat", str(bundle), "--temperature", "0", "-n", "8", "--stats", stdin=script)
    assert done.returncode == 0, done.stderr
    assert "conversation cleared" in done.stderr
    cached = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(cached) == 3
    assert "(0 cached)" in cached[0] and "(0 cached)" not in cached[1]  # turn 2 reused turn 1's cache


@pytest.mark.slow  # exports the real SmolLM2
def test_run_without_a_bundle_uses_the_default_model(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "edgellm", "run", "What is 2+2?", "--temperature", "0", "-n", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "first use" in done.stderr
    assert (tmp_path / "edgellm" / "bundles" / "smollm2-135m-instruct" / "manifest.json").is_file()
    assert done.stdout.strip()


def one_error_line(done: subprocess.CompletedProcess, *phrases: str) -> str:
    stderr = done.stderr if isinstance(done.stderr, str) else done.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["stdin", "argv"])
def test_a_prompt_of_invalid_utf8_is_one_error_line(bundle, where):
    command = [sys.executable, "-m", "edgellm", "run", str(bundle), "-n", "4"]
    if where == "stdin":
        done = subprocess.run(command + ["-"], input=b"Hello \xff", capture_output=True, timeout=300)
        one_error_line(done, "standard input is not valid UTF-8", "0xff")
    else:
        done = subprocess.run(command + [b"Hello \xff"], capture_output=True, timeout=300)
        one_error_line(done, "the prompt is not valid UTF-8")


def test_serve_on_a_port_in_use_is_one_error_line_and_exit_1(bundle):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "edgellm", "serve", str(bundle), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    one_error_line(done, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_a_tiny_memory_budget_is_reported_in_a_unit_that_shows_it(bundle):
    done = edgellm("run", str(bundle), "Hi", "--max-memory", "1K")
    one_error_line(done, "(1 KiB)")
