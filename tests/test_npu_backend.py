"""The NPU backend on the Hexagon NPU simulator (onnxruntime-qnn's HTP backend on x86-64), CPU
fallback disabled: greedy tokens against the CPU backend's, the compiled-context cache, and bad
input that must fail loudly (never run on the CPU instead)."""

import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.system  # runs the HTP simulator (onnxruntime-qnn)

pytest.importorskip("onnxruntime_qnn", reason="the NPU backend needs onnxruntime-qnn (pip install 'edgellm[npu]')")

from npu_support import NPU_CONTEXT, copy_bundle, cpu_provider_decoder, npu_bundle  # noqa: E402
from tiny_models import TRAINING_TEXT  # noqa: E402

import edgellm  # noqa: E402
from edgellm.backends.npu.session import QnnSessions, qnn_version  # noqa: E402
from edgellm.bundle.manifest import read_manifest  # noqa: E402
from edgellm.errors import ContextOverflowError, NpuError  # noqa: E402
from edgellm.export.verify.npu import teacher_forced_logits  # noqa: E402
from edgellm.export.verify.numerics import kl_divergence  # noqa: E402

PROMPTS = [TRAINING_TEXT[i][:14] for i in (0, 2, 12)]  # beginnings of text the trained model learned


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return copy_bundle(npu_bundle("trained"), tmp_path_factory.mktemp("npu") / "bundle")


def learned_prompts(cpu) -> list[list[int]]:
    """The first 8 tokens of each TRAINING_TEXT whose next 12 tokens the trained model reproduces on the
    CPU backend: where it learned the text, its logits are decisive (after 100 steps, most of it)."""
    prompts = []
    for text in TRAINING_TEXT:
        ids = cpu.encode(text)
        if greedy(cpu, ids[:8], 12) == ids[8:20]:
            prompts.append(ids[:8])
    return prompts


def greedy(model, prompt, n=32):
    return [
        c.token_id
        for c in model.stream(prompt, max_tokens=n, temperature=0, stop_token_ids=())
        if c.token_id is not None
    ]


def test_npu_greedy_tokens_agree_with_the_cpu_backend(trained):
    """Done when #1: 32 greedy tokens on the simulator, >= 90% equal to the CPU backend's, the first 8 identical."""
    npu = edgellm.load(trained, backend="npu")
    cpu = edgellm.load(trained, backend="onnxruntime")
    assert npu.backend.describe()["execution_provider"].startswith("QNNExecutionProvider")
    prompts = learned_prompts(cpu)
    assert len(prompts) >= 6
    for prompt in prompts:
        on_npu, on_cpu = greedy(npu, prompt), greedy(cpu, prompt)
        agreement = np.mean(np.array(on_npu) == np.array(on_cpu))
        print(f"{npu.tokenizer.decode(prompt)!r}: {agreement:.3f} agreement over 32 greedy tokens")
        assert len(on_npu) == 32 and on_npu[:8] == on_cpu[:8], prompt
        assert agreement >= 0.9, prompt


@pytest.mark.parametrize("kind, quant", [("trained", "a16w8"), ("random", "a16w4")])
def test_the_simulator_runs_the_graphs_like_the_cpu_provider(tmp_path, kind, quant):
    """The same QDQ graphs (int8 channels, int4 blocks) on the HTP simulator and on ONNX Runtime's CPU
    provider, teacher-forced through prefill chunks (the last one padded) and decode steps."""
    bundle = copy_bundle(npu_bundle(kind, quant), tmp_path / "bundle")
    npu = edgellm.load(bundle, backend="npu")
    ids = npu.encode(TRAINING_TEXT[3])[:40]
    on_htp = teacher_forced_logits(npu.backend.decoder, ids, decode_steps=6)
    on_cpu = teacher_forced_logits(cpu_provider_decoder(read_manifest(bundle)), ids, decode_steps=6)
    kl = kl_divergence(on_cpu, on_htp)
    print(
        f"{kind} {quant}: HTP vs CPU provider, KL mean {kl.mean():.2e} max {kl.max():.2e}, top-1 "
        f"{np.mean(on_htp.argmax(-1) == on_cpu.argmax(-1)):.3f}"
    )
    assert np.isfinite(on_htp).all()
    assert kl.mean() < 1e-3
    assert np.mean(on_htp.argmax(-1) == on_cpu.argmax(-1)) >= 0.9


def test_the_second_load_uses_the_cached_context_binary(tmp_path):
    """Done when #3: the first load compiles and writes the context cache; the second loads the
    compiled context (QNN's own mark on the session) much faster, and answers identically."""
    bundle = copy_bundle(npu_bundle("trained"), tmp_path / "bundle")
    started = time.perf_counter()
    first = edgellm.load(bundle, backend="npu")
    first_seconds = time.perf_counter() - started
    cached = sorted((bundle / "npu_cache").glob("*_ctx.onnx"))
    assert [p.name.split("-")[0] for p in cached] == ["decode", "prefill"]
    assert all(f"soc57-qnn{qnn_version()}" in p.name for p in cached)
    assert not any(load["cache_hit"] or load["loaded_compiled_context"] for load in first.backend.loads)
    first_tokens = greedy(first, PROMPTS[0])
    first.close()

    started = time.perf_counter()
    second = edgellm.load(bundle, backend="npu")
    second_seconds = time.perf_counter() - started
    assert all(load["cache_hit"] and load["loaded_compiled_context"] for load in second.backend.loads)
    compiled = sum(load["seconds"] for load in first.backend.loads)
    from_cache = sum(load["seconds"] for load in second.backend.loads)
    print(
        f"graph loads: {compiled:.3f} s compiling, {from_cache:.3f} s from the cache "
        f"(whole load {first_seconds:.2f} s vs {second_seconds:.2f} s)"
    )  # the simulator's times: not asserted
    assert greedy(second, PROMPTS[0]) == first_tokens


def test_a_read_only_bundle_caches_the_context_under_the_home_cache(tmp_path, monkeypatch):
    bundle = copy_bundle(npu_bundle("trained"), tmp_path / "bundle")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    import edgellm.backends.npu.session as npu_session

    real_access = npu_session.os.access
    monkeypatch.setattr(
        npu_session.os,
        "access",
        lambda path, mode: False if str(path).startswith(str(bundle)) else real_access(path, mode),
    )  # as for a read-only folder (root ignores chmod)
    model = edgellm.load(bundle, backend="npu")
    assert not (bundle / "npu_cache").exists()
    assert len(list((tmp_path / "home-cache" / "edgellm" / "npu").glob("*_ctx.onnx"))) == 2
    assert all(load["context_cache"].startswith(str(tmp_path / "home-cache")) for load in model.backend.loads)


# -- bad input: a clear error or a rebuild, never the CPU ---------------------------------------------
def cli(*args, stdin=None):
    done = subprocess.run(
        [sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, input=stdin, timeout=300
    )
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and "onnxruntime" not in line and "LIBNATIVE" not in line
    ]  # the QNN EP logs its own warnings to stderr
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def test_a_prompt_longer_than_the_fixed_context_is_refused(trained):
    model = edgellm.load(trained, backend="npu")
    assert model.context_length == NPU_CONTEXT
    long_prompt = " ".join(TRAINING_TEXT)  # ~600 tokens of the tiny vocabulary
    with pytest.raises(ContextOverflowError, match=f"context holds {NPU_CONTEXT}"):
        list(model.stream(long_prompt, max_tokens=4))
    line = cli("run", str(trained), long_prompt, "--raw", "--backend", "npu", "-n", "4")
    assert f"the context holds {NPU_CONTEXT}" in line
    with pytest.raises(ContextOverflowError, match="fixed window of 128"):
        edgellm.load(trained, backend="npu", context_length=1024)
    assert "--npu-context 1024" in cli("run", str(trained), "Hi", "--backend", "npu", "--context", "1024")


def test_a_bundle_without_npu_graphs_is_an_npu_error(tiny_llama_bundle):
    with pytest.raises(NpuError, match="no NPU graphs"):
        edgellm.load(tiny_llama_bundle, backend="npu")
    assert "--profile npu" in cli("run", str(tiny_llama_bundle), "Hi", "--backend", "npu")


def test_a_context_cache_from_another_model_is_rebuilt(tmp_path, caplog):
    """The cache file this bundle would load is replaced by another model's compiled context (with
    its sidecar): the key does not match, so it is compiled again, and the answers are this model's."""
    bundle = copy_bundle(npu_bundle("trained"), tmp_path / "bundle")
    other = copy_bundle(npu_bundle("random"), tmp_path / "other")
    edgellm.load(other, backend="npu").close()
    expected = greedy(edgellm.load(bundle, backend="npu"), PROMPTS[1])
    for mine in (bundle / "npu_cache").glob("*_ctx.onnx"):
        theirs = next((other / "npu_cache").glob(mine.name.split("-")[0] + "-*_ctx.onnx"))
        shutil.copy(theirs, mine)
        shutil.copy(theirs.with_name(theirs.name + ".json"), mine.with_name(mine.name + ".json"))
    with caplog.at_level(logging.WARNING, logger="edgellm.npu"):
        model = edgellm.load(bundle, backend="npu")
    assert "compiling the prefill graph again" in caplog.text and "compiled for another model_hash" in caplog.text
    assert not any(load["cache_hit"] for load in model.backend.loads)
    assert greedy(model, PROMPTS[1]) == expected
    assert all(load["cache_hit"] for load in edgellm.load(bundle, backend="npu").backend.loads)  # rebuilt for good


def test_a_context_compiled_for_another_soc_is_rebuilt(tmp_path, caplog):
    """A context compiled for SoC 57 presented as SoC 69's (file and sidecar renamed and edited):
    QNN's own mark in the compiled model names 57, so it is compiled again for 69."""
    bundle = copy_bundle(npu_bundle("trained"), tmp_path / "bundle")
    edgellm.load(bundle, backend="npu").close()
    for compiled in list((bundle / "npu_cache").glob("*-soc57-*_ctx.onnx")):
        sidecar = json.loads(compiled.with_name(compiled.name + ".json").read_text())
        sidecar["key"]["soc_model"] = "69"
        renamed = compiled.with_name(compiled.name.replace("-soc57-", "-soc69-"))
        compiled.rename(renamed)
        renamed.with_name(renamed.name + ".json").write_text(json.dumps(sidecar))
    with caplog.at_level(logging.WARNING, logger="edgellm.npu"):
        model = edgellm.load(bundle, backend="npu", npu_provider_options={"soc_model": "69"})
    assert "compiled it for SoC model 57, not 69" in caplog.text
    assert all(load["soc_model"] == "69" and not load["cache_hit"] for load in model.backend.loads)
    assert len(greedy(model, PROMPTS[2], 4)) == 4


def test_a_context_compiled_with_other_board_options_is_rebuilt(tmp_path, caplog):
    bundle = copy_bundle(npu_bundle("trained"), tmp_path / "bundle")
    edgellm.load(bundle, backend="npu").close()
    with caplog.at_level(logging.WARNING, logger="edgellm.npu"):
        model = edgellm.load(bundle, backend="npu", npu_provider_options={"soc_model": "57", "htp_arch": "75"})
    assert "htp_arch" in caplog.text and not any(load["cache_hit"] for load in model.backend.loads)


def test_a_damaged_context_cache_is_rebuilt(tmp_path, caplog):
    bundle = copy_bundle(npu_bundle("trained"), tmp_path / "bundle")
    edgellm.load(bundle, backend="npu").close()
    for compiled in (bundle / "npu_cache").glob("*_ctx.onnx"):
        compiled.write_bytes(b"not a model" * 100)
    with caplog.at_level(logging.WARNING, logger="edgellm.npu"):
        model = edgellm.load(bundle, backend="npu")
    assert "replaced or damaged" in caplog.text
    assert len(greedy(model, PROMPTS[0], 4)) == 4


def test_a_graph_the_npu_refuses_fails_loudly_instead_of_running_on_the_cpu(tmp_path):
    """MatMulNBits over int4 blocks with 8-bit... any node the HTP refuses: here the CPU graph itself."""
    manifest = read_manifest(npu_bundle("trained"))
    sessions = QnnSessions({})
    key = sessions.key("prefill", "0" * 64)
    with pytest.raises(NpuError, match="cannot run model.onnx") as error:
        sessions.open(npu_bundle("trained") / "model.onnx", key, tmp_path)
    assert "CPU fallback is off" in str(error.value)
    assert not list(tmp_path.iterdir())  # no half-written context
    assert manifest.cpu_graph == "model.onnx"


def test_a_token_id_outside_the_vocabulary_is_a_setting_error(trained):
    model = edgellm.load(trained, backend="npu")
    with pytest.raises(edgellm.InvalidSettingError, match="the vocabulary"):
        list(model.stream([5, 10**6], max_tokens=2))


def test_an_unknown_soc_model_is_a_setting_error(trained):
    with pytest.raises(edgellm.InvalidSettingError, match="soc_model"):
        edgellm.load(trained, backend="npu", npu_provider_options={"soc_model": "sm8650"})


# -- the same front ends as every backend -------------------------------------------------------------
def test_edgellm_run_streams_on_the_npu(trained):
    args = [sys.executable, "-m", "edgellm", "run", str(trained), PROMPTS[0], "--raw", "--temperature", "0", "-n", "12"]
    on_npu = subprocess.run(args + ["--backend", "npu", "--json"], capture_output=True, text=True, timeout=300)
    on_cpu = subprocess.run(args + ["--backend", "onnxruntime", "--json"], capture_output=True, text=True, timeout=300)
    assert on_npu.returncode == 0, on_npu.stderr
    chunks = [json.loads(line) for line in on_npu.stdout.splitlines()]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["stats"]["generated_tokens"] == 12
    assert [c["token"] for c in chunks] == [json.loads(line)["token"] for line in on_cpu.stdout.splitlines()]


def test_the_server_answers_from_the_npu(trained, tmp_path):
    pytest.importorskip("openai")
    from server_harness import start_server

    with start_server(trained, tmp_path, settings={"backend": "npu", "context_length": 0}) as server:
        client = server.client()
        reply = client.completions.create(model="bundle", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens == 8
        assert server.terminate() == 0
    assert "backend npu" in server.log()
