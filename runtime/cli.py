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
    from os import environ

    cache = Path(environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgellm" / "bundles"
    return cache / "smollm2-135m-instruct"


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
                   verify=verify, force=force)
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

        manifest = read_manifest(bundle)
        if as_json:
            typer.echo(json.dumps(summarize(manifest, bundle), indent=2, ensure_ascii=False))
        else:
            print_info(manifest, bundle)
    except EdgeLLMError as error:
        fail(error)


def main() -> None:  # python -m edgellm
    app(prog_name="edgellm")


if __name__ == "__main__":
    sys.exit(main())
