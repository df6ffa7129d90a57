"""The `edgellm` command line. Every user mistake ends in one `error:` line and exit code 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EdgeLLMError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run small open language models on edge devices.")


def fail(error: EdgeLLMError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def default_bundle_dir() -> Path:
    """Where the default model's bundle lives (exported there on first use)."""
    from .run_command import default_bundle_dir as folder

    return folder()


@app.command()
def export(
    source: str = typer.Argument(..., help="A .gguf file, a Hugging Face model folder, or 'default'."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle folder to write."),
    bits: int = typer.Option(4, help="Bits for float matrices: 4 or 8 (GGUF 4/8-bit blocks are kept as they are)."),
    block: int = typer.Option(32, help="Values per quantization block: 16, 32, 64 or 128."),
    symmetric: bool = typer.Option(False, help="int4 with an implied zero point instead of scale + minimum."),
    keep_8bit: List[str] = typer.Option(["model.embed_tokens.weight", "lm_head.weight"], "--keep-8bit",
                                        help="Tensor names (or fnmatch patterns) kept at 8 bits; repeatable."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check ONNX Runtime against the reference."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    profile: str = typer.Option("cpu", "--profile", help="cpu, or npu: also static-shape QDQ graphs for the Hexagon "
                                                         "NPU (QNN), in the same bundle."),
    npu_chunk: int = typer.Option(64, "--npu-chunk", help="npu profile: tokens per prefill graph call."),
    npu_context: int = typer.Option(512, "--npu-context", help="npu profile: the fixed context window (KV slots)."),
    npu_quant: str = typer.Option("a16w8", "--npu-quant", help="npu profile: a16w8 (16-bit activations, 8-bit "
                                                               "weights) or a16w4."),
) -> None:
    """Lower a model to a verified, quantized-ONNX bundle."""
    try:
        from .export_command import run_export

        if output is None:
            if source != "default":
                raise EdgeLLMError("missing --output/-o", "say where to write the bundle: -o my-bundle")
            output = default_bundle_dir()
            output.parent.mkdir(parents=True, exist_ok=True)
        run_export(source, output, bits=bits, block=block, symmetric=symmetric, keep_8bit=tuple(keep_8bit),
                   verify=verify, force=force, profile=profile, npu_chunk=npu_chunk, npu_context=npu_context,
                   npu_quant=npu_quant)
    except EdgeLLMError as error:
        fail(error)


@app.command()
def info(
    bundle: Path = typer.Argument(..., help="A bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show a bundle: architecture, sizes, quantization, tokenizer, verification."""
    try:
        from .bundle_info import print_info, summarize
        from .manifest import read_manifest
        from .npu_report import npu_summary, print_npu

        manifest = read_manifest(bundle)
        if as_json:
            typer.echo(json.dumps({**summarize(manifest), "npu": npu_summary(manifest)}, indent=2,
                                  ensure_ascii=False))
        else:
            print_info(manifest)
            if npu_summary(manifest):
                from rich.console import Console

                print_npu(manifest, Console())
    except EdgeLLMError as error:
        fail(error)


SETTINGS_HELP = "Runtime settings (flags > EDGELLM_* environment > board profile > defaults)."


def runtime_settings(threads, context, max_memory, backend, verify_weights, board=None) -> dict:
    return {"threads": threads, "context_length": context, "max_memory": max_memory, "backend": backend,
            "verify_weights": verify_weights or None, "board": board}


def sampling_flags(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty,
                   seed) -> dict:
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "repetition_penalty": repeat_penalty, "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty, "seed": seed}


_threads = typer.Option(None, "--threads", help="CPU threads (default: one per core).")
_context = typer.Option(None, "--context", help="Context length in tokens (default: min(trained, 2048)).")
_max_memory = typer.Option(None, "--max-memory", help="Refuse to load beyond this much memory, e.g. 512M, 2G.")
_backend = typer.Option(None, "--backend", help="Engine: auto (native when built, else onnxruntime), native, onnxruntime, "
                                                "or npu (the bundle's NPU graphs on QNN; needs onnxruntime-qnn).")
_verify_weights = typer.Option(False, "--verify-weights", help="Hash weights.bin against the manifest at load.")
_board = typer.Option(None, "--board", help="Board profile for the defaults: a name (see `edgellm doctor`), a .toml "
                                            "file, or 'none' (default: the detected board; env EDGELLM_BOARD).")
_temperature = typer.Option(None, help="0 = greedy. Default 0.8.")
_top_k = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off). Default 40.")
_top_p = typer.Option(None, "--top-p", help="Nucleus sampling (1 = off). Default 0.95.")
_min_p = typer.Option(None, "--min-p", help="Drop tokens below min_p x the top probability. Default 0.05.")
_repeat_penalty = typer.Option(None, "--repeat-penalty", help="Repetition penalty over the last 64 tokens (1 = off).")
_presence_penalty = typer.Option(None, "--presence-penalty", help="OpenAI presence penalty, -2..2.")
_frequency_penalty = typer.Option(None, "--frequency-penalty", help="OpenAI frequency penalty, -2..2.")
_seed = typer.Option(None, "--seed", help="Same seed and settings give the same tokens.")
_max_tokens = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate.")
_stop = typer.Option([], "--stop", help="Stop string (repeatable); never printed.")
_stats = typer.Option(False, "--stats", help="Print timing and memory stats to stderr at the end.")
_system = typer.Option(None, "--system", help="System prompt (chat mode).")


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    args: List[str] = typer.Argument(..., metavar="[BUNDLE] PROMPT", help="Bundle folder (optional) and prompt ('-': stdin)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help="Wrap the prompt in the chat template (default when the bundle has one)."),
    parse_special: bool = typer.Option(False, "--parse-special", help="With --raw: text that spells a control token "
                                                                      "(<|im_start|>) is that token, not plain text."),
    system: Optional[str] = _system, max_tokens: int = _max_tokens, stop: List[str] = _stop,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per chunk."), show_stats: bool = _stats,
    temperature: Optional[float] = _temperature, top_k: Optional[int] = _top_k, top_p: Optional[float] = _top_p,
    min_p: Optional[float] = _min_p, repeat_penalty: Optional[float] = _repeat_penalty,
    presence_penalty: Optional[float] = _presence_penalty, frequency_penalty: Optional[float] = _frequency_penalty,
    seed: Optional[int] = _seed, threads: Optional[int] = _threads, context: Optional[int] = _context,
    max_memory: Optional[str] = _max_memory, backend: Optional[str] = _backend, verify_weights: bool = _verify_weights,
    board: Optional[str] = _board,
) -> None:
    """Stream the answer to a prompt. Without a bundle, uses SmolLM2-135M-Instruct (exported on first use)."""
    try:
        from .run_command import run_prompt

        run_prompt(args, chat=chat, system=system, max_tokens=max_tokens, stop=stop, as_json=as_json,
                   show_stats=show_stats, settings=runtime_settings(threads, context, max_memory, backend, verify_weights, board),
                   sampling=sampling_flags(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                                           frequency_penalty, seed), parse_special=parse_special)
    except EdgeLLMError as error:
        fail(error)


@app.command()
def chat(
    bundle: Optional[str] = typer.Argument(None, help="Bundle folder (default: SmolLM2-135M-Instruct)."),
    system: Optional[str] = _system, max_tokens: int = _max_tokens, stop: List[str] = _stop, show_stats: bool = _stats,
    temperature: Optional[float] = _temperature, top_k: Optional[int] = _top_k, top_p: Optional[float] = _top_p,
    min_p: Optional[float] = _min_p, repeat_penalty: Optional[float] = _repeat_penalty,
    presence_penalty: Optional[float] = _presence_penalty, frequency_penalty: Optional[float] = _frequency_penalty,
    seed: Optional[int] = _seed, threads: Optional[int] = _threads, context: Optional[int] = _context,
    max_memory: Optional[str] = _max_memory, backend: Optional[str] = _backend, verify_weights: bool = _verify_weights,
    board: Optional[str] = _board,
) -> None:
    """Interactive multi-turn chat in the terminal (/reset, /exit)."""
    try:
        from .run_command import chat_loop

        chat_loop(bundle, system=system, max_tokens=max_tokens, stop=stop, show_stats=show_stats,
                  settings=runtime_settings(threads, context, max_memory, backend, verify_weights, board),
                  sampling=sampling_flags(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                                          frequency_penalty, seed))
    except EdgeLLMError as error:
        fail(error)


@app.command()
def bench(
    bundle: Optional[str] = typer.Argument(None, help="Bundle folder (default: SmolLM2-135M-Instruct)."),
    runs: int = typer.Option(5, "--runs", help="Interleaved runs per engine; medians are reported."),
    prompt_lengths: List[int] = typer.Option([128, 512], "--prompt-length", help="Prefill lengths (repeatable)."),
    decode_tokens: int = typer.Option(128, "--decode-tokens", help="Tokens decoded per run."),
    threads: Optional[int] = _threads, backend: str = typer.Option("auto", "--backend", help="edgellm's engine: auto, native, onnxruntime, npu."),
    compare: List[str] = typer.Option([], "--compare", help="Peer engine: llama.cpp, onnxruntime-genai (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema edgellm-bench/1)."),
) -> None:
    """Measure prefill and decode speed, time to first token, load time and peak RSS, against peers."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from .bench import print_bench, run_bench
        from .run_command import ensure_default_bundle

        path = Path(bundle) if bundle else ensure_default_bundle()
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description:<40.40}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("bench", total=1.0)
            report = run_bench(path, runs=runs, prompt_lengths=tuple(prompt_lengths), decode_tokens=decode_tokens,
                               threads=threads, compare=compare, backend=backend,
                               progress=lambda stage, done: bar.update(task, description=stage, completed=done))
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            print_bench(report, Console())
    except EdgeLLMError as error:
        fail(error)


@app.command()
def serve(
    bundle: Optional[str] = typer.Argument(None, help="Bundle folder (default: SmolLM2-135M-Instruct)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file",
                                                help="File with the key clients must send as 'Authorization: Bearer "
                                                     "KEY' (default: $EDGELLM_API_KEY; neither: no key)."),
    max_queue: int = typer.Option(4, "--max-queue", help="Requests that may wait while one generates; more get 429."),
    timeout: float = typer.Option(300, "--timeout", help="Seconds per request, from arrival to the last token."),
    grace: float = typer.Option(20, "--grace", help="Seconds admitted requests get to finish after SIGTERM."),
    max_body: str = typer.Option("1M", "--max-body", help="Largest request body, e.g. 1M."),
    read_timeout: float = typer.Option(10, "--read-timeout", help="Seconds a connection has to send a whole request "
                                                                  "(headers and body); slower ones are closed."),
    max_connections: int = typer.Option(512, "--max-connections", help="Open connections; past it, a new one "
                                                                       "evicts the oldest idle one."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: the bundle folder's name)."),
    threads: Optional[int] = _threads, context: Optional[int] = _context, max_memory: Optional[str] = _max_memory,
    backend: Optional[str] = _backend, verify_weights: bool = _verify_weights,
    board: Optional[str] = _board,
) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API (needs the `serve` extra)."""
    try:
        from .run_command import ensure_default_bundle
        from .server import ServerConfig, resolve_api_key
        from .settings import RuntimeSettings, parse_bytes

        config = ServerConfig(host=host, port=port, max_queue=max_queue, timeout=timeout, grace=grace,
                              read_timeout=read_timeout, max_connections=max_connections,
                              max_body_bytes=parse_bytes(max_body, "max_body"), api_key=resolve_api_key(api_key_file),
                              model_name=model_name)
        settings = RuntimeSettings.resolve(**runtime_settings(threads, context, max_memory, backend, verify_weights, board))
        from .server.serve import run_server

        code = run_server(Path(bundle) if bundle else ensure_default_bundle(), config, settings)
    except EdgeLLMError as error:
        fail(error)
    raise typer.Exit(code)


@app.command()
def doctor(
    bundle: Optional[str] = typer.Argument(None, help="Bundle to size against memory (default: the default model, if exported)."),
    board: Optional[str] = _board,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show the detected board, CPU features, kernel variant, ONNX Runtime providers (and QNN), memory
    and the context that fits, and the service's status."""
    try:
        from .doctor import run_doctor

        run_doctor(board, bundle, as_json)
    except EdgeLLMError as error:
        fail(error)


service_app = typer.Typer(no_args_is_help=True, help="Run edgellm as a systemd service on this board.")
app.add_typer(service_app, name="service")


@service_app.command("install")
def service_install(
    bundle: Path = typer.Argument(..., help="Bundle folder the service serves."),
    board: Optional[str] = typer.Option(None, "--board", help="Board profile name, or a TOML file with a [service] table."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the unit instead of writing it."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (default 8080)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Key file, handed over as a credential."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests that may wait (default 4)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per request (default 300)."),
    grace: Optional[float] = typer.Option(None, "--grace", help="Seconds to drain on stop (default 20)."),
    memory_max: Optional[str] = typer.Option(None, "--memory-max", help="MemoryMax= (default: the estimate + headroom)."),
    cpu_affinity: Optional[str] = typer.Option(None, "--cpu-affinity", help="CPUAffinity=, e.g. 4-7."),
    threads: Optional[int] = _threads, context: Optional[int] = _context, backend: Optional[str] = _backend,
    unit_path: Path = typer.Option(Path("/etc/systemd/system/edgellm.service"), "--unit-path", help="Where to write it."),
) -> None:
    """Render the systemd unit for BUNDLE and write it (or print it with --dry-run)."""
    try:
        from .service_install import install

        result = install(bundle, board=board, dry_run=dry_run, unit_path=unit_path, host=host, port=port,
                         api_key_file=str(api_key_file) if api_key_file else None, max_queue=max_queue,
                         timeout=timeout, grace=grace, memory_max=memory_max, cpu_affinity=cpu_affinity,
                         threads=threads, context=context, backend=backend)
        if dry_run:
            typer.echo(result.unit_text, nl=False)
        typer.echo(result.message, err=True)
    except EdgeLLMError as error:
        fail(error)


@service_app.command("uninstall")
def service_uninstall(
    unit_path: Path = typer.Option(Path("/etc/systemd/system/edgellm.service"), "--unit-path", help="The unit to remove."),
) -> None:
    """Remove the unit written by `edgellm service install`."""
    try:
        from .service_install import uninstall

        typer.echo(uninstall(unit_path))
    except EdgeLLMError as error:
        fail(error)


def main() -> None:  # python -m edgellm
    app(prog_name="edgellm")


if __name__ == "__main__":
    sys.exit(main())
