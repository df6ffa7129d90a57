"""What `edgellm export --profile npu` prints about the NPU graphs it added to a bundle."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def npu_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The NPU variant in a few fields (None when the bundle has none)."""
    entry = manifest.get("graphs", {}).get("npu")
    if not entry:
        return None
    verification = entry.get("verification", {})
    return {"chunk": entry["chunk"], "context": entry["context"], "quantization": entry["quantization"]["scheme"],
            "files": entry["files"],
            "verification": "skipped" if verification.get("skipped") else
            {k: verification.get(k) for k in ("passed", "mean_top1", "mean_kl")}}


def print_npu(manifest: dict[str, Any], console: Console) -> None:
    entry = manifest["graphs"]["npu"]
    quant = entry["quantization"]
    calibration = quant["calibration"]
    console.print(f"NPU graphs: prefill {entry['chunk']} tokens and decode 1 token over a fixed context of "
                  f"{entry['context']}; {quant['scheme']}: activations {quant['activations']}, weights "
                  f"{quant['weights']}; calibrated on {calibration['prefill_samples']} prefill and "
                  f"{calibration['decode_samples']} decode samples of {calibration['file']}")
    report = entry.get("verification", {})
    if report.get("skipped"):
        console.print("[yellow]NPU verification skipped (--no-verify)[/yellow]")
        return
    table = Table(title=f"NPU verification: {report['engine']} vs {report['against']}")
    for column in ("prompt", "tokens", "top-1", "KL"):
        table.add_column(column, justify="left" if column == "prompt" else "right", no_wrap=True)
    for row in report["prompts"]:
        prompt = row["prompt"].replace("\n", "\\n")
        table.add_row(prompt[:30] + ("…" if len(prompt) > 30 else ""), str(row["tokens"]), f"{row['top1']:.3f}",
                      f"{row['kl']:.4f}")
    verdict = "[green]passed[/green]" if report["passed"] else "[red]failed[/red]"
    limits = report["thresholds"]
    table.caption = (f"{verdict}: mean top-1 {report['mean_top1']:.3f} (min {limits['min_top1']}), "
                     f"mean KL {report['mean_kl']:.4f} (max {limits['max_kl']})")
    console.print(table)
