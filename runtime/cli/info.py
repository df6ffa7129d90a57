"""What `edgellm info` and `edgellm export` print about a bundle (its NPU graphs included)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.manifest import Manifest


def summarize(manifest: Manifest) -> dict[str, Any]:
    c, raw = manifest.config, manifest.raw
    params = sum(m.rows * m.cols for m in manifest.matrices.values())
    for name, entry in manifest.tensors.items():
        if name.split(".")[-1] not in ("qweight", "scales", "mins") and name != INV_FREQ:
            params += math.prod(entry.shape)
    quant, verification = raw["quantization"], raw["verification"]
    tokenizer = manifest.tokenizer
    return {
        "bundle": str(manifest.bundle),
        "name": manifest.name,
        "architecture": c.architecture,
        "parameters": params,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "heads": f"{c.num_attention_heads} query / {c.num_key_value_heads} key-value",
        "context_length": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings,
        "files": {name: entry.bytes for name, entry in manifest.files.items()},
        "quant_formats": dict(Counter(m.format for m in manifest.matrices.values())),
        "carried_over_from_source": len(quant["carried_over"]),
        "quantized_by_exporter": len(quant["quantized"]),
        "quantization_nmse": quant["overall_nmse"],
        "tokenizer": {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_ids": list(tokenizer.eos_token_ids),
            "add_bos_token": tokenizer.add_bos_token,
        },
        "chat_template": manifest.chat_template is not None,
        "source": dict(raw["provenance"]["source"]),
        "exporter": raw["provenance"].get("exporter"),
        "verification": {k: verification.get(k) for k in ("passed", "worst_nmse", "mean_top1")}
        if not verification.get("skipped")
        else "skipped",
    }


def print_quantization(manifest: Manifest, console: Console) -> None:
    quant = manifest.raw["quantization"]
    rows = quant["quantized"]
    if quant["carried_over"]:
        console.print(f"{len(quant['carried_over'])} matrices carried over bit-exactly from the source blocks")
    if not rows:
        return
    table = Table(title="quantization error (what the exporter quantized)")
    for column in ("tensor", "format", "NMSE", "max abs"):
        table.add_column(column, justify="left" if column in ("tensor", "format") else "right")
    for row in rows:
        table.add_row(row["name"], row["format"], f"{row['nmse']:.3e}", f"{row['max_abs']:.3e}")
    if quant["overall_nmse"] is not None:
        table.add_row("overall (by elements)", "", f"{quant['overall_nmse']:.3e}", "", style="bold")
    console.print(table)


def print_verification_report(
    report: dict[str, Any], console: Console, what: str, cells: dict[str, str], summary: str
) -> None:
    """A verification report (the CPU graph's or the NPU graphs') as a table: prompt, tokens, then `cells`
    (column -> format string over a prompt row's fields); the caption is the verdict and `summary`, a format
    string over the report's fields and its thresholds."""
    if report.get("skipped"):
        console.print(f"[yellow]{what} skipped (--no-verify)[/yellow]")
        return
    table = Table(title=f"{what}: {report['engine']} vs {report['against']}")
    for column in ("prompt", "tokens", *cells):
        table.add_column(column, justify="left" if column == "prompt" else "right", no_wrap=True)
    for row in report["prompts"]:
        prompt = row["prompt"].replace("\n", "\\n")
        table.add_row(
            prompt[:30] + ("…" if len(prompt) > 30 else ""),
            str(row["tokens"]),
            *(cell.format(**row) for cell in cells.values()),
        )
    verdict = "[green]passed[/green]" if report["passed"] else "[red]failed[/red]"
    table.caption = f"{verdict}: " + summary.format(**report, **report["thresholds"])
    console.print(table)


def print_verification(manifest: Manifest, console: Console) -> None:
    print_verification_report(
        manifest.raw["verification"],
        console,
        "verification",
        {"NMSE": "{nmse:.2e}", "top-1": "{top1:.3f}", "max |Δ|": "{max_abs:.3f}"},
        "worst NMSE {worst_nmse:.2e} (max {max_nmse}), mean top-1 {mean_top1:.3f} (min {min_top1})",
    )


def print_info(manifest: Manifest, console: Console | None = None) -> None:
    console = console or Console()
    summary = summarize(manifest)
    table = Table(title=f"{summary['name']} ({manifest.bundle})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in (
        "architecture",
        "parameters",
        "layers",
        "hidden_size",
        "heads",
        "context_length",
        "vocab_size",
        "tied_embeddings",
        "quant_formats",
        "carried_over_from_source",
        "quantized_by_exporter",
        "tokenizer",
        "chat_template",
        "exporter",
    ):
        table.add_row(
            key,
            f"{summary[key]:,}"
            if isinstance(summary[key], int) and not isinstance(summary[key], bool)
            else str(summary[key]),
        )
    for name, size in summary["files"].items():
        table.add_row(name, f"{size / 1e6:.1f} MB")
    source = summary["source"]
    table.add_row("source", f"{source.get('format')}: {source.get('path')} (sha256 {str(source.get('sha256'))[:12]}…)")
    console.print(table)
    print_quantization(manifest, console)
    print_verification(manifest, console)


def npu_summary(manifest: Manifest) -> dict[str, Any] | None:
    """The NPU variant in a few fields (None when the bundle has none)."""
    if manifest.npu is None:
        return None
    npu = manifest.npu
    verification = npu.raw["verification"]
    return {
        "chunk": npu.chunk,
        "context": npu.context,
        "quantization": npu.scheme,
        "files": npu.files,
        "verification": "skipped"
        if verification.get("skipped")
        else {k: verification.get(k) for k in ("passed", "mean_top1", "mean_kl")},
    }


def print_npu(manifest: Manifest, console: Console) -> None:
    entry = manifest.npu.raw
    quant = entry["quantization"]
    calibration = quant["calibration"]
    console.print(
        f"NPU graphs: prefill {entry['chunk']} tokens and decode 1 token over a fixed context of "
        f"{entry['context']}; {quant['scheme']}: activations {quant['activations']}, weights "
        f"{quant['weights']}; calibrated on {calibration['prefill_samples']} prefill and "
        f"{calibration['decode_samples']} decode samples of {calibration['file']}"
    )
    print_verification_report(
        entry["verification"],
        console,
        "NPU verification",
        {"top-1": "{top1:.3f}", "KL": "{kl:.4f}"},
        "mean top-1 {mean_top1:.3f} (min {min_top1}), mean KL {mean_kl:.4f} (max {max_kl})",
    )
