"""The `edgellm` command line. Every user mistake ends in one `error:` line and exit code 1."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from edgellm.bundle.manifest import read_manifest
from edgellm.cli.bench import print_bench, run_bench
from edgellm.cli.doctor import run_doctor
from edgellm.cli.export import run_export
from edgellm.cli.info import npu_summary, print_info, print_npu, summarize
from edgellm.cli.options import MAX_BODY, RUNTIME_OPTIONS, SERVER_OPTIONS, SERVICE_OPTIONS, with_options
from edgellm.cli.progress import stage_progress
from edgellm.cli.run import chat_loop, ensure_default_bundle, run_prompt
from edgellm.errors import EdgeLLMError
from edgellm.service.server.config import ServerConfig, resolve_api_key
from edgellm.service.unit import UNIT_PATH, install, uninstall
from edgellm.settings import RuntimeSettings
from edgellm.units import parse_bytes

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run small open language models on edge devices.",
)
service_app = typer.Typer(no_args_is_help=True, help="Run edgellm as a systemd service on this board.")
app.add_typer(service_app, name="service")


def fail(error: EdgeLLMError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


def command(group: typer.Typer, name: str, **settings):
    """Register a function as the command `name` of `group`; an EdgeLLMError it raises (a user's
    mistake) ends in one `error:` line and exit code 1, never a traceback."""

    def register(function):
        @functools.wraps(function)
        def reporting(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except EdgeLLMError as error:
                fail(error)

        group.command(name, **settings)(reporting)
        return function

    return register


command(app, "export")(run_export)
command(app, "run", context_settings={"allow_interspersed_args": True})(run_prompt)
command(app, "chat")(chat_loop)


@command(app, "info")
def info(
    bundle: Path = typer.Argument(..., help="A bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show a bundle: architecture, sizes, quantization, tokenizer, verification."""
    manifest = read_manifest(bundle)
    if as_json:
        typer.echo(json.dumps({**summarize(manifest), "npu": npu_summary(manifest)}, indent=2, ensure_ascii=False))
    else:
        print_info(manifest)
        if npu_summary(manifest):
            print_npu(manifest, Console())


@command(app, "bench")
def bench(
    bundle: str | None = typer.Argument(None, help="Bundle folder (default: SmolLM2-135M-Instruct)."),
    runs: int = typer.Option(5, "--runs", help="Interleaved runs per engine; medians are reported."),
    prompt_lengths: list[int] = typer.Option([128, 512], "--prompt-length", help="Prefill lengths (repeatable)."),
    decode_tokens: int = typer.Option(128, "--decode-tokens", help="Tokens decoded per run."),
    threads: int | None = RUNTIME_OPTIONS["threads"].option,
    backend: str = typer.Option("auto", "--backend", help="edgellm's engine: auto, native, onnxruntime, npu."),
    compare: list[str] = typer.Option([], "--compare", help="Peer engine: llama.cpp, onnxruntime-genai (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema edgellm-bench/1)."),
) -> None:
    """Measure prefill and decode speed, time to first token, load time and peak RSS, against peers."""
    path = Path(bundle) if bundle else ensure_default_bundle()
    with stage_progress("bench", width=40) as progress:
        report = run_bench(
            path,
            runs=runs,
            prompt_lengths=tuple(prompt_lengths),
            decode_tokens=decode_tokens,
            threads=threads,
            compare=compare,
            backend=backend,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_bench(report, Console())


@command(app, "serve")
@with_options(server=SERVER_OPTIONS, settings=RUNTIME_OPTIONS)
def serve(
    bundle: str | None = typer.Argument(None, help="Bundle folder (default: SmolLM2-135M-Instruct)."),
    api_key_file: Path | None = typer.Option(
        None,
        "--api-key-file",
        help="File with the key clients must send as 'Authorization: Bearer "
        "KEY' (default: $EDGELLM_API_KEY; neither: no key).",
    ),
    max_body: str = MAX_BODY,
    server: dict | None = None,
    settings: dict | None = None,
) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API (needs the `serve` extra)."""
    config = ServerConfig(
        **server, max_body_bytes=parse_bytes(max_body, "max_body"), api_key=resolve_api_key(api_key_file)
    )
    runtime = RuntimeSettings.resolve(**settings)
    from edgellm.service.server.serve import run_server  # lazy: optional (the serve extra: fastapi, uvicorn)

    raise typer.Exit(run_server(Path(bundle) if bundle else ensure_default_bundle(), config, runtime))


@command(app, "doctor")
def doctor(
    bundle: str | None = typer.Argument(
        None, help="Bundle to size against memory (default: the default model, if exported)."
    ),
    board: str | None = RUNTIME_OPTIONS["board"].option,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show the detected board, CPU features, kernel variant, ONNX Runtime providers (and QNN), memory
    and the context that fits, and the service's status."""
    run_doctor(board, bundle, as_json)


@command(service_app, "install")
@with_options(overrides=SERVICE_OPTIONS)
def service_install(
    bundle: Path = typer.Argument(..., help="Bundle folder the service serves."),
    board: str | None = typer.Option(
        None, "--board", help="Board profile name, or a TOML file with a \\[service] table."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the unit instead of writing it."),
    unit_path: Path = typer.Option(UNIT_PATH, "--unit-path", help="Where to write it."),
    overrides: dict | None = None,
) -> None:
    """Render the systemd unit for BUNDLE and write it (or print it with --dry-run). Settings not given
    come from the board profile's service table, else are `edgellm serve`'s defaults."""
    result = install(bundle, board=board, dry_run=dry_run, unit_path=unit_path, **overrides)
    if dry_run:
        typer.echo(result.unit_text, nl=False)
    typer.echo(result.message, err=True)


@command(service_app, "uninstall")
def service_uninstall(
    unit_path: Path = typer.Option(UNIT_PATH, "--unit-path", help="The unit to remove."),
) -> None:
    """Remove the unit written by `edgellm service install`."""
    typer.echo(uninstall(unit_path))


def main() -> None:  # python -m edgellm
    app(prog_name="edgellm")


if __name__ == "__main__":
    sys.exit(main())
