"""What `edgellm export --profile npu` prints about the NPU graphs it added to a bundle."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from .bundle_info import print_verification_report


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
    print_verification_report(entry.get("verification", {}), console, "NPU verification",
                              {"top-1": "{top1:.3f}", "KL": "{kl:.4f}"},
                              "mean top-1 {mean_top1:.3f} (min {min_top1}), mean KL {mean_kl:.4f} (max {max_kl})")
