"""`edgellm export` on the command line: check the extras are there, drive the exporter, show progress."""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeLLMError


def require_export_extras() -> None:
    missing = []
    for module in ("onnx", "gguf", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise EdgeLLMError(f"exporting needs {', '.join(missing)}", "install the extra: pip install 'edgellm[export]'")


def run_export(source: str, output: Path, *, bits: int, block: int, symmetric: bool, keep_8bit: tuple[str, ...],
               verify: bool, force: bool, profile: str = "cpu", npu_chunk: int = 64, npu_context: int = 512,
               npu_quant: str = "a16w8") -> None:
    require_export_extras()
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .bundle_info import print_quantization, print_verification
    from .manifest import read_manifest
    from .npu_report import print_npu
    from .export.exporter import ExportOptions, export_model
    from .export.npu_export import NpuOptions
    from .export.quantize import QuantOptions

    options = ExportOptions(QuantOptions(bits=bits, block=block, symmetric=symmetric, keep_8bit=keep_8bit),
                            verify=verify, force=force, profile=profile,
                            npu=NpuOptions(chunk=npu_chunk, context=npu_context, quant=npu_quant))
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<60.60}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("export", total=1.0)
        export_model(source, output, options,
                     progress=lambda stage, done: bar.update(task, description=stage, completed=done))
    manifest = read_manifest(output)
    out = Console()
    for warning in manifest.raw["provenance"]["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    print_quantization(manifest, out)
    print_verification(manifest, out)
    if manifest.npu is not None:
        print_npu(manifest, out)
    out.print(f"bundle written to [bold]{output}[/bold] in {manifest.raw['provenance']['export_seconds']:.1f} s")
