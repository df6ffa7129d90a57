"""`edgellm bench`: how fast a bundle runs here, and how that compares with other engines on the same model.

One JSON schema (SCHEMA), comparable across machines and commits:

  machine    cpu, cores, cpu features, board, kernel variant, load average before and after
  settings   runs, threads, prompt lengths, decode tokens, the context every engine gets
  results    per engine: version, backend, and medians (with min and max) over the runs of
               prefill_tok_s[L]  L prompt tokens / (prompt in -> first token out), fresh KV cache
               decode_tok_s      decode_tokens one-token forwards (greedy, EOS ignored) after an L-token prompt
               ttft_cold_s       spawning a fresh Python process -> its first token for a 16-token prompt
                                 (imports and load included; the model file is in the page cache)
               load_s            the model's load call, in process (imports not included)
               peak_rss_mb       the worker process's maximum resident set (ru_maxrss)
               background_cpu_cores  what other processes used while it was timed (from /proc/stat):
                                 the noise gauge of a shared machine; `warnings` names disturbed engines
  ratios     per peer and metric: the median over runs of edgellm / peer, each pair from the same run

How it measures: every engine runs in its own worker process (edgellm.cli.bench_worker), a fresh one per
run, so imports, thread pools and resident memory never mix. Runs are interleaved (for each run, each
engine once), so a burst of background load on a shared machine hits every engine alike; quote the
medians and the ratios, not a single number. All engines get the same token ids, the same thread
count and the same context. Every worker warms up on the longest prompt before it is timed.

edgellm runs the bundle on its default backend (`backend="auto"`: the native C engine when it is
built, else ONNX Runtime); machine.kernel_variant is the kernel variant that engine ran.

Peers: llama.cpp (llama-cpp-python) runs the GGUF the bundle was exported from; onnxruntime-genai
runs an int4 model its own builder makes from the same weights (cached under
~/.cache/edgellm/peers/). Note that the peers' weights are their own formats: the GGUF blocks as
they are for llama.cpp, re-quantized symmetric int4 (lm_head included, int8 activations) for genai.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgellm import __version__
from edgellm.backends.native import ffi as native
from edgellm.boards.detect import CPU_FEATURES, detected
from edgellm.bundle.format import cache_root, file_sha256
from edgellm.bundle.manifest import Manifest, read_manifest
from edgellm.errors import EdgeLLMError, InvalidSettingError
from edgellm.generate.tokenizer import BundleTokenizer
from edgellm.settings import RuntimeSettings

SCHEMA = "edgellm-bench/1"
ENGINE = "edgellm"
# The kernels edgellm's backend runs: the variant the native engine picked at load (ref, avx2,
# avx512vnni, neon, dotprod, i8mm), as its worker reports it; this when it runs ONNX Runtime.
KERNEL_VARIANT_ONNXRUNTIME = "onnxruntime-mlas"
TTFT_PROMPT_TOKENS = 16
CONTEXT_MARGIN = 8  # tokens of room past the longest prompt and the decoded tokens
WORKER_TIMEOUT_S = 900.0
# Other processes using more than this many cores during a measurement make its numbers suspect
# (llama.cpp's OpenMP threads, which spin at barriers, slow down tenfold when a core is taken).
BACKGROUND_WARNING_CORES = 0.2
# A fixed text, repeated: every engine sees the same ids and every run the same work.
BENCH_TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his father had "
    "taught him. From the lamp room he could see the fishing boats returning, the gulls circling the "
    "harbor, and the long shadow of the cliffs stretching across the water. He wrote the weather in a "
    "small notebook: wind from the west, a thin fog after sunset, the sea calm but restless. "
)


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # the import that proves it is installed
    install_hint: str


PEERS = {
    peer.name: peer
    for peer in (
        Peer(
            "llama.cpp",
            "llama_cpp",
            "install it with: pip install llama-cpp-python (it compiles llama.cpp: needs a C compiler and cmake)",
        ),
        Peer(
            "onnxruntime-genai",
            "onnxruntime_genai",
            "install it with: pip install onnxruntime-genai onnx-ir "
            "(its model builder also needs torch and transformers)",
        ),
    )
}
GENAI_BUILD_MODULES = {
    "onnx_ir": "onnx-ir",
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "gguf": "gguf",
}

Progress = Callable[[str, float], None]


# -- the public API -----------------------------------------------------------------------------------
def run_bench(
    bundle: Path,
    *,
    runs: int = 5,
    prompt_lengths: tuple[int, ...] = (128, 512),
    decode_tokens: int = 128,
    threads: int | None = None,
    compare: Sequence[str] = (),
    progress: Progress | None = None,
    backend: str = "auto",
) -> dict:
    """Benchmark `bundle` (and the peers in `compare`) and return the report (see the module docstring).
    `backend` is edgellm's: "auto" (the native engine when it is built), "native" or "onnxruntime"."""
    RuntimeSettings(backend=backend)  # an unknown backend fails here, before any worker runs

    report_progress = progress or (lambda description, fraction: None)
    peers = check_peers(compare)
    runs, prompt_lengths, decode_tokens, threads = _check_settings(runs, prompt_lengths, decode_tokens, threads)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    context = max(max(prompt_lengths), TTFT_PROMPT_TOKENS) + decode_tokens + CONTEXT_MARGIN
    trained = manifest.config.max_position_embeddings
    if context > trained:
        raise InvalidSettingError(
            f"the longest prompt and the decoded tokens need a context of {context} tokens; "
            f"the model was trained for {trained}",
            "use shorter prompts or fewer decode tokens",
        )

    models = {ENGINE: str(bundle)}
    for peer in peers:  # before any timing: a missing model or a first genai build fails or happens here
        models[peer] = str(peer_model(peer, manifest, report_progress))

    ids = _bench_ids(BundleTokenizer.of(manifest), max(max(prompt_lengths), TTFT_PROMPT_TOKENS))
    job = {
        "threads": threads,
        "context": context,
        "first_token_prompt": ids[:TTFT_PROMPT_TOKENS],
        "prompts": {str(length): ids[:length] for length in prompt_lengths},
        "decode_after": min(prompt_lengths),
        "decode_tokens": decode_tokens,
        "backend": backend,
    }
    loadavg_before = _loadavg()
    engines = [ENGINE, *peers]
    measured: dict[str, list[dict]] = {engine: [] for engine in engines}
    for run in range(runs):
        for index, engine in enumerate(engines):
            report_progress(f"run {run + 1}/{runs}: {engine}", (run * len(engines) + index) / (runs * len(engines)))
            measured[engine].append(run_worker({**job, "engine": engine, "model": models[engine]}))
    report_progress("done", 1.0)

    settings = {
        "runs": runs,
        "threads": threads,
        "prompt_lengths": list(prompt_lengths),
        "decode_tokens": decode_tokens,
        "decode_after_prompt_tokens": min(prompt_lengths),
        "ttft_prompt_tokens": TTFT_PROMPT_TOKENS,
        "context": context,
        "interleaved": True,
    }
    results = [
        _engine_result(engine, models[engine], measured[engine], measured[ENGINE], settings) for engine in engines
    ]
    machine = {
        **machine_facts(measured[ENGINE][0].get("kernel_variant", KERNEL_VARIANT_ONNXRUNTIME)),
        "activation_bits": measured[ENGINE][0].get("activation_bits"),  # the native engine's: 8 or 16
        "loadavg_before": loadavg_before,
        "loadavg_after": _loadavg(),
    }
    warnings = [
        f"{result['engine']}: other processes used up to {result['background_cpu_cores']['max']:.2f} cores "
        "while it was measured; rerun on a quiet machine before quoting these numbers"
        for result in results
        if result["background_cpu_cores"]["max"] > BACKGROUND_WARNING_CORES
    ]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgellm": {"version": _edgellm_version(), "commit": _git_commit()},
        "bundle": str(bundle),
        "machine": machine,
        "settings": settings,
        "results": results,
        "ratios": {peer: _ratios(measured[ENGINE], measured[peer], prompt_lengths, decode_tokens) for peer in peers},
        "warnings": warnings,
    }


def print_bench(report: dict, console) -> None:
    """The report as a rich table: metric x engine (median, and min-max below it), then edgellm / peer."""
    from rich.markup import escape
    from rich.table import Table

    machine, settings = report["machine"], report["settings"]
    results = report["results"]
    peers = list(report.get("ratios", {}))
    table = Table(
        title=f"edgellm bench: {machine['board']}, {machine['cpu']}, {settings['threads']} threads, "
        f"{settings['runs']} interleaved runs",
        title_justify="left",
        caption="median, and min-max over the runs below it; ratio = edgellm / peer (median of the "
        "per-run ratios); ↑ higher is better, ↓ lower is better",
        caption_justify="left",
    )
    table.add_column("metric")
    for result in results:
        table.add_column(f"{result['engine']}\n{result['version']}", justify="right")
    for peer in peers:
        table.add_column(f"edgellm /\n{peer}", justify="right")

    rows = [
        (f"prefill {length} tok/s ↑", ("prefill_tok_s", str(length)), f"prefill_{length}", True, 1)
        for length in settings["prompt_lengths"]
    ]
    rows += [
        ("decode tok/s ↑", ("decode_tok_s",), "decode", True, 1),
        ("first token, cold s ↓", ("ttft_cold_s",), "ttft_cold", False, 2),
        ("load s ↓", ("load_s",), "load", False, 2),
        ("peak RSS MB ↓", ("peak_rss_mb",), "peak_rss", False, 0),
        ("other processes, cores", ("background_cpu_cores",), None, None, 2),
    ]
    for label, path, ratio_key, higher_is_better, digits in rows:
        cells = []
        for result in results:
            stats = result
            for key in path:
                stats = stats[key]
            cells.append(f"{stats['median']:.{digits}f}\n[dim]{stats['min']:.{digits}f}-{stats['max']:.{digits}f}[/]")
        for peer in peers:
            if ratio_key is None:
                cells.append("")
                continue
            ratio = report["ratios"][peer][ratio_key]
            better = ratio >= 1 if higher_is_better else ratio <= 1
            cells.append(f"[{'green' if better else 'red'}]{ratio:.2f}x[/]")
        table.add_row(label, *cells)
    console.print(table)
    loadavg = lambda values: " ".join(f"{v:.2f}" for v in values) if values else "unknown"  # noqa: E731
    console.print(
        f"kernel variant {machine['kernel_variant']}"
        + (f" ({machine['activation_bits']}-bit activations)" if machine.get("activation_bits") else "")
        + f"; decode after a {settings['decode_after_prompt_tokens']}"
        f"-token prompt; load average {loadavg(machine['loadavg_before'])} before, "
        f"{loadavg(machine['loadavg_after'])} after"
    )
    for result in results:
        console.print(
            f"[bold]{result['engine']}[/]: {escape(result['backend'])}; {escape(result['model'])}; "
            f"greedy tokens equal to edgellm's: {result['greedy_tokens_equal_to_edgellm']}"
        )
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


# -- peers ---------------------------------------------------------------------------------------------
def check_peers(compare: Sequence[str]) -> list[str]:
    """The requested peers, in order, without duplicates; unknown or not installed -> EdgeLLMError."""
    if isinstance(compare, str):
        compare = [compare]
    peers: list[str] = []
    for name in compare:
        if name == ENGINE or name in peers:
            continue
        if name not in PEERS:
            raise EdgeLLMError(f"unknown engine to compare with: {name!r}", f"known peers: {', '.join(PEERS)}")
        if importlib.util.find_spec(PEERS[name].module) is None:
            raise EdgeLLMError(
                f"comparing with {name} needs the Python package {PEERS[name].module}, which is not installed",
                PEERS[name].install_hint,
            )
        peers.append(name)
    return peers


def peer_model(peer: str, manifest: Manifest, progress: Progress) -> Path:
    """The model file or folder `peer` runs: the bundle's own source, or (genai) a model built from it."""
    source = manifest.raw["provenance"]["source"]
    where = source.get("path")
    if not where:
        raise EdgeLLMError(
            f"{peer} needs the model the bundle was exported from, but the manifest names none",
            "export the bundle again from its GGUF or Hugging Face folder",
        )
    path = Path(where)
    if not path.exists():
        raise EdgeLLMError(
            f"{peer} needs the model the bundle was exported from, {path}, which is missing",
            "put the source back there or export the bundle again from where it is now",
        )
    if peer == "llama.cpp":
        if source.get("format") != "gguf":
            raise EdgeLLMError(
                f"llama.cpp runs GGUF files; this bundle was exported from a {source.get('format')} source ({path})",
                "export the bundle from the GGUF to compare with llama.cpp",
            )
        _check_source_hash(path, source.get("sha256"))
        return path
    return genai_model(path, source, progress)


def genai_model(source_path: Path, source: dict, progress: Progress) -> Path:
    """An onnxruntime-genai model folder for the bundle's source, built once and cached."""
    from importlib.metadata import version

    key = (source.get("sha256") or "unknown")[:16]
    folder = peer_cache_dir() / "onnxruntime-genai" / f"{key}-int4-cpu-genai{version('onnxruntime-genai')}"
    if (folder / "genai_config.json").is_file():
        return folder
    missing = [package for module, package in GENAI_BUILD_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise EdgeLLMError(
            f"building the onnxruntime-genai model needs {', '.join(missing)}",
            f"install them with: pip install {' '.join(missing)}",
        )
    if source_path.is_file():
        _check_source_hash(source_path, source.get("sha256"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + ".partial")
    log = folder.with_name(folder.name + ".build.log")
    progress(f"building the onnxruntime-genai model (once; log: {log})", 0.0)
    shutil.rmtree(staging, ignore_errors=True)
    with open(log, "w") as log_file:
        done = subprocess.run(
            [sys.executable, "-m", "edgellm.cli.bench_worker", "build-genai", str(source_path), str(staging)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    if done.returncode != 0 or not (staging / "genai_config.json").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise EdgeLLMError(
            f"building the onnxruntime-genai model failed: {_tail(log.read_text(errors='replace'))}",
            f"the whole log is in {log}",
        )
    staging.rename(folder)
    return folder


def peer_cache_dir() -> Path:
    return cache_root() / "peers"


def _check_source_hash(path: Path, expected: str | None) -> None:
    if expected and file_sha256(path) != expected:
        raise EdgeLLMError(
            f"{path} is not the file the bundle was exported from (its sha256 differs)",
            "a comparison needs the same model: export the bundle again from this file",
        )


# -- workers -------------------------------------------------------------------------------------------
def run_worker(job: dict, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Spawn a fresh worker for `job` and return its result, with ttft_cold_s measured from the spawn."""
    with tempfile.TemporaryFile() as stderr:
        spawned = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli.bench_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=0,
        )
        try:
            process.stdin.write(json.dumps(job).encode())
            process.stdin.close()
        except BrokenPipeError:  # it died before reading its job: its exit status says how, below
            pass
        messages, first_token_at = [], None
        try:
            for message, arrived in _messages(process, spawned + timeout):
                if message["event"] == "first_token":
                    first_token_at = arrived
                messages.append(message)
            process.wait(timeout=max(1.0, spawned + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise EdgeLLMError(f"the {job['engine']} benchmark worker did not finish in {timeout:.0f} s") from None
        finally:
            process.stdout.close()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    final = messages[-1] if messages else {}
    if final.get("event") == "error":
        raise EdgeLLMError(
            f"the {job['engine']} benchmark worker failed: {final['message']}",
            final.get("hint") or "run it with fewer tokens, or look at the message above",
        )
    if final.get("event") != "result" or first_token_at is None or process.returncode != 0:
        raise EdgeLLMError(
            f"the {job['engine']} benchmark worker died ({_exit_status(process.returncode)}): {_tail(errors)}",
            _crash_hint(job["engine"], process.returncode),
        )
    return {**final, "ttft_cold_s": first_token_at - spawned}


def _exit_status(returncode: int) -> str:
    """ "exit 3", or the signal that killed the process ("SIGSEGV")."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


# llama-cpp-python compiles llama.cpp for the CPU it is built on; on a CPU with AMX that build runs its
# AMX matrix kernels for batches, and 0.3.36's crashed (SIGSEGV in ggml_backend_amx_mul_mat) in a
# 2-vCPU KVM guest of an AMX Xeon, on the first prompt of more than a few tokens. The same build
# without AMX runs (its AVX-512 VNNI kernels), and is what this project compared against there.
LLAMA_CPP_WITHOUT_AMX = (
    "CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
    "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python"
)


def _crash_hint(engine: str, returncode: int, cpu_features: Sequence[str] | None = None) -> str:
    """What to do about a worker that died without reporting an error (a crash in native code prints
    nothing the worker could catch)."""
    if returncode >= 0:
        return "run the same command again; if it dies again, report it with the output above"
    if engine == "llama.cpp":
        if cpu_features is None:
            cpu_features = detected().cpu.features
        if "amx_int8" in cpu_features:
            return (
                "this CPU has AMX, and llama.cpp's AMX kernels crash on some machines: rebuild it without "
                f"them: {LLAMA_CPP_WITHOUT_AMX}"
            )
        return "llama.cpp crashed: try another llama-cpp-python version"
    if engine == "onnxruntime-genai":
        return "onnxruntime-genai crashed: try another onnxruntime-genai version"
    return "edgellm crashed: try --backend onnxruntime, and report the crash with the command that caused it"


def _messages(process: subprocess.Popen, deadline: float):
    """(message, perf_counter when it arrived) for each JSON line the worker writes, until it closes."""
    fd, pending = process.stdout.fileno(), b""
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(process.args, 0)
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        arrived = time.perf_counter()
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line), arrived


# -- the report ----------------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def _per_run(run: dict, prompt_lengths: Sequence[int], decode_tokens: int) -> dict[str, float]:
    """The metrics of one run, keyed as in `ratios`."""
    metrics = {f"prefill_{length}": length / run["prefill_s"][str(length)] for length in prompt_lengths}
    metrics.update(
        decode=decode_tokens / run["decode_s"],
        ttft_cold=run["ttft_cold_s"],
        load=run["load_s"],
        peak_rss=run["peak_rss_mb"],
    )
    return metrics


def _engine_result(engine: str, model: str, runs: list[dict], edgellm_runs: list[dict], settings: dict) -> dict:
    lengths, decode_tokens = settings["prompt_lengths"], settings["decode_tokens"]
    per_run = [_per_run(run, lengths, decode_tokens) for run in runs]
    column = lambda key: [metrics[key] for metrics in per_run]  # noqa: E731
    reference, greedy = edgellm_runs[0]["greedy_tokens"], runs[0]["greedy_tokens"]
    same = next(
        (i for i, (a, b) in enumerate(zip(reference, greedy, strict=False)) if a != b), min(len(reference), len(greedy))
    )
    first = runs[0]
    return {
        "engine": engine,
        "version": first["version"],
        "backend": first["backend"],
        "threads": settings["threads"],
        "model": f"{model} ({_size_mb(Path(model)):.1f} MB)",
        "config": first["config"],
        "prefill_tok_s": {str(length): _stats(column(f"prefill_{length}")) for length in lengths},
        "decode_tok_s": _stats(column("decode")),
        "ttft_cold_s": _stats(column("ttft_cold")),
        "ttft_in_process_s": _stats([run["ttft_in_process_s"] for run in runs]),
        "import_s": _stats([run["import_s"] for run in runs]),
        "load_s": _stats(column("load")),
        "peak_rss_mb": _stats(column("peak_rss")),
        "background_cpu_cores": _stats([run["background_cpu_cores"] for run in runs]),
        "greedy_tokens_equal_to_edgellm": f"{same}/{len(greedy)}",
    }


def _ratios(
    edgellm_runs: list[dict], peer_runs: list[dict], prompt_lengths: Sequence[int], decode_tokens: int
) -> dict[str, float]:
    """edgellm / peer for each metric: the median of the ratios of runs measured side by side."""
    ours = [_per_run(run, prompt_lengths, decode_tokens) for run in edgellm_runs]
    theirs = [_per_run(run, prompt_lengths, decode_tokens) for run in peer_runs]
    return {
        key: round(statistics.median(a[key] / b[key] for a, b in zip(ours, theirs, strict=True)), 3) for key in ours[0]
    }


def _check_settings(
    runs: int, prompt_lengths: Sequence[int], decode_tokens: int, threads: int | None
) -> tuple[int, tuple[int, ...], int, int]:
    def whole(name: str, value: object, hint: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidSettingError(f"{name} must be a whole number >= 1, got {value!r}", hint)
        return value

    whole("runs", runs, "use 5 or more runs for medians worth quoting")
    if isinstance(prompt_lengths, int):
        prompt_lengths = (prompt_lengths,)
    if not prompt_lengths:
        raise InvalidSettingError("prompt_lengths is empty", "give at least one prompt length, e.g. 128")
    lengths = tuple(sorted({whole("a prompt length", length, "e.g. 128 or 512") for length in prompt_lengths}))
    whole("decode_tokens", decode_tokens, "e.g. 128")
    threads = (os.cpu_count() or 1) if threads is None else whole("threads", threads, "e.g. the number of cores")
    return runs, lengths, decode_tokens, threads


def _bench_ids(tokenizer, count: int) -> list[int]:
    ids = tokenizer.encode(BENCH_TEXT, add_bos=False)
    return (ids * (count // len(ids) + 1))[:count]


# -- the machine ---------------------------------------------------------------------------------------
def machine_facts(kernel_variant: str | None = None) -> dict[str, Any]:
    """What the numbers depend on: cpu, cores, features, board, the kernel variant edgellm ran."""
    found = detected()
    features = set(found.cpu.features)
    return {
        "cpu": found.cpu.model_name,
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "cpu_features": [feature for feature in CPU_FEATURES if feature in features],
        "memory_mb": found.memory_total // (1 << 20) if found.memory_total else None,
        "board": found.profile.name + (f" ({found.model})" if found.model else ""),
        "kernel_variant": kernel_variant or _native_variant(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _native_variant() -> str:
    """The variant the native kernels would run here, or ONNX Runtime's when they are not built."""
    return native.kernel_variant() if native.available() else KERNEL_VARIANT_ONNXRUNTIME


def _loadavg() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def _edgellm_version() -> str:
    return __version__


def _git_commit() -> str | None:
    """The commit of the code being measured, when it runs from a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(no output)"
