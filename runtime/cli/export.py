"""`edgellm export` on the command line: check the extras are there, drive the exporter, show progress."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from edgellm.bundle.manifest import read_manifest
from edgellm.cli.info import print_npu, print_quantization, print_verification
from edgellm.cli.options import EXPORT_OPTIONS, NPU_OPTIONS, QUANT_OPTIONS, with_options
from edgellm.cli.progress import stage_progress
from edgellm.default_model import default_bundle_dir
from edgellm.errors import EdgeLLMError
from edgellm.export.options import ExportOptions, NpuOptions, QuantOptions


def require_export_extras() -> None:
    missing = []
    for module in ("onnx", "gguf", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise EdgeLLMError(f"exporting needs {', '.join(missing)}", "install the extra: pip install 'edgellm[export]'")


@with_options(quant=QUANT_OPTIONS, export=EXPORT_OPTIONS, npu=NPU_OPTIONS)
def run_export(
    source: str = typer.Argument(..., help="A .gguf file, a Hugging Face model folder, or 'default'."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Bundle folder to write."),
    quant: dict | None = None,
    export: dict | None = None,
    npu: dict | None = None,
) -> None:
    """Lower a model to a verified, quantized-ONNX bundle."""
    if output is None:
        if source != "default":
            raise EdgeLLMError("missing --output/-o", "say where to write the bundle: -o my-bundle")
        output = default_bundle_dir()
        output.parent.mkdir(parents=True, exist_ok=True)
    require_export_extras()
    from edgellm.export.exporter import export_model  # lazy: optional (the export extra)

    if "keep_8bit" in quant:
        quant["keep_8bit"] = tuple(quant["keep_8bit"])
    options = ExportOptions(QuantOptions(**quant), npu=NpuOptions(**npu), **export)
    with stage_progress("export", width=60) as progress:
        export_model(source, output, options, progress=progress)
    manifest = read_manifest(output)
    out = Console()
    for warning in manifest.raw["provenance"]["warnings"]:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}")
    print_quantization(manifest, out)
    print_verification(manifest, out)
    if manifest.npu is not None:
        print_npu(manifest, out)
    out.print(f"bundle written to [bold]{output}[/bold] in {manifest.raw['provenance']['export_seconds']:.1f} s")
