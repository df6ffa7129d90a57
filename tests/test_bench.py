"""`edgellm bench`: the report's schema, the worker protocol and the peers' failure modes.

No assertion here is about speed: performance is measured by running the benchmark, never by timed
tests (STYLE.md, habit 13). These tests only prove that the numbers are there, positive, and come
from the processes they claim to come from.
"""

import io
import sys

import pytest
from rich.console import Console
from tiny_models import make_tiny_model, save_tiny_model

from edgellm.bundle.manifest import read_manifest
from edgellm.cli import bench
from edgellm.cli.bench import PEERS, SCHEMA, peer_model, print_bench, run_bench, run_worker
from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.export.exporter import export_model

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    hf = save_tiny_model(make_tiny_model("llama", tie=True), folder / "hf")
    export_model(hf, folder / "bundle")
    return folder / "bundle"


def positive_stats(stats):
    return set(stats) == {"median", "min", "max"} and 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_a_one_run_bench_of_a_tiny_bundle_reports_every_field_of_the_schema(tiny_bundle):
    seen = []
    report = run_bench(
        tiny_bundle,
        runs=1,
        prompt_lengths=(16,),
        decode_tokens=8,
        threads=1,
        progress=lambda description, fraction: seen.append((description, fraction)),
    )

    assert report["schema"] == SCHEMA
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["board"] and machine["arch"]
    from edgellm.backends.native import ffi as native

    # The default backend: the native engine (reporting its dispatched kernel) when it is built.
    expected_variant = native.kernel_variant() if native.available() else "onnxruntime-mlas"
    assert machine["kernel_variant"] == expected_variant
    assert report["settings"] == {
        "runs": 1,
        "threads": 1,
        "prompt_lengths": [16],
        "decode_tokens": 8,
        "decode_after_prompt_tokens": 16,
        "ttft_prompt_tokens": 16,
        "context": 32,
        "interleaved": True,
    }
    [result] = report["results"]
    assert result["engine"] == "edgellm" and result["threads"] == 1
    assert result["version"] and result["backend"].startswith("native" if native.available() else "onnxruntime")
    assert set(result["prefill_tok_s"]) == {"16"} and positive_stats(result["prefill_tok_s"]["16"])
    for metric in ("decode_tok_s", "ttft_cold_s", "ttft_in_process_s", "import_s", "load_s", "peak_rss_mb"):
        assert positive_stats(result[metric]), metric
    # A cold first token includes starting Python and loading the model; the in-process one does not.
    assert result["ttft_cold_s"]["median"] > result["load_s"]["median"]
    assert result["greedy_tokens_equal_to_edgellm"] == "9/9"  # the first token and 8 decoded
    assert result["background_cpu_cores"]["min"] >= 0  # the noise gauge: other processes' CPU, in cores
    assert report["ratios"] == {} and isinstance(report["warnings"], list)
    assert seen[-1] == ("done", 1.0)

    console = Console(file=io.StringIO(), width=160)
    print_bench(report, console)
    shown = console.file.getvalue()
    assert "prefill 16" in shown and "decode" in shown and "peak RSS" in shown


def test_an_unknown_peer_fails_with_the_list_of_known_ones(tmp_path):
    with pytest.raises(EdgeLLMError, match="unknown engine to compare with: 'vllm'") as failure:
        run_bench(tmp_path, compare=["vllm"])
    assert "llama.cpp" in str(failure.value) and "onnxruntime-genai" in str(failure.value)


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_a_peer_whose_package_is_missing_fails_with_how_to_install_it(tmp_path, monkeypatch, peer):
    monkeypatch.setitem(sys.modules, PEERS[peer].module, None)  # find_spec and import both see it as absent
    with pytest.raises(EdgeLLMError, match="not installed") as failure:
        run_bench(tmp_path, compare=[peer])
    assert "pip install" in str(failure.value)


def test_llama_cpp_needs_the_gguf_the_bundle_was_exported_from(tiny_bundle):
    manifest = read_manifest(tiny_bundle)  # exported from a Hugging Face folder
    with pytest.raises(EdgeLLMError, match="llama.cpp runs GGUF files"):
        peer_model("llama.cpp", manifest, lambda description, fraction: None)
    manifest.raw["provenance"]["source"]["path"] = str(tiny_bundle / "gone.gguf")
    with pytest.raises(EdgeLLMError, match="which is missing"):
        peer_model("llama.cpp", manifest, lambda description, fraction: None)


def test_settings_out_of_range_fail_before_anything_runs(tiny_bundle):
    for bad in ({"runs": 0}, {"prompt_lengths": ()}, {"prompt_lengths": (0,)}, {"decode_tokens": -1}, {"threads": 0}):
        with pytest.raises(InvalidSettingError):
            run_bench(tiny_bundle, **bad)
    with pytest.raises(InvalidSettingError, match="trained for 512"):
        run_bench(tiny_bundle, prompt_lengths=(600,))


def test_a_worker_that_fails_reports_the_reason_as_an_edgellm_error(tmp_path):
    job = {
        "engine": "edgellm",
        "model": str(tmp_path / "no-bundle"),
        "threads": 1,
        "context": 32,
        "first_token_prompt": [5] * 16,
        "prompts": {"16": [5] * 16},
        "decode_after": 16,
        "decode_tokens": 2,
    }
    with pytest.raises(EdgeLLMError, match="edgellm benchmark worker failed: BundleError.*not a bundle folder"):
        run_worker(job)


@pytest.mark.parametrize("reads_its_job", [True, False])
def test_a_worker_killed_by_a_signal_names_the_signal_and_what_to_do(tmp_path, monkeypatch, reads_its_job):
    # a crash in a peer's C code kills its worker before it can report anything, perhaps before it
    # has read its job (then writing the job breaks the pipe)
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\n" + ("cat > /dev/null\n" if reads_its_job else "") + "kill -SEGV $$\n")
    crashing.chmod(0o755)
    monkeypatch.setattr(bench.sys, "executable", str(crashing))
    job = {"engine": "edgellm", "model": str(tmp_path), "threads": 1, "padding": "x" * (1 << 20)}
    with pytest.raises(EdgeLLMError, match=r"edgellm benchmark worker died \(SIGSEGV\)") as raised:
        run_worker(job)
    assert "--backend onnxruntime" in raised.value.hint


def test_a_crashed_llama_cpp_on_a_cpu_with_amx_is_told_to_rebuild_it_without_amx():
    with_amx = bench._crash_hint("llama.cpp", -11, cpu_features=("avx512f", "amx_tile", "amx_int8"))
    assert "-mno-amx-int8" in with_amx and "pip install --force-reinstall" in with_amx
    assert "amx" not in bench._crash_hint("llama.cpp", -11, cpu_features=("avx512f", "avx512_vnni"))
    assert bench._exit_status(-11) == "SIGSEGV" and bench._exit_status(3) == "exit 3"


@pytest.mark.skipif(
    not HAVE_LLAMA_CPP,
    reason="llama-cpp-python is not installed (CI does not install it: "
    "it compiles llama.cpp; pip install llama-cpp-python to run this)",
)
def test_the_llama_cpp_worker_runs_the_real_gguf_for_one_run():
    from edgellm.default_model import default_gguf_path

    ids = list(range(1000, 1064))
    job = {
        "engine": "llama.cpp",
        "model": str(default_gguf_path()),
        "threads": 2,
        "context": 88,
        "first_token_prompt": ids[:16],
        "prompts": {"32": ids[:32], "64": ids},
        "decode_after": 32,
        "decode_tokens": 8,
    }
    result = run_worker(job)
    assert result["event"] == "result" and result["version"] and result["backend"].startswith("ggml CPU")
    assert result["config"]["n_batch"] >= 64  # the longest prompt is one batch (llama.cpp caps it at n_ctx)
    assert set(result["prefill_s"]) == {"32", "64"} and all(s > 0 for s in result["prefill_s"].values())
    assert result["decode_s"] > 0 and result["load_s"] > 0 and result["peak_rss_mb"] > 50
    assert result["ttft_cold_s"] > result["load_s"]
    assert len(result["greedy_tokens"]) == 9
    assert all(0 <= token < 49152 for token in result["greedy_tokens"])
