"""What `edgellm export --profile npu` prints about the NPU graphs it added to a bundle."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from .bundle_info import print_verification_report
from .manifest import Manifest


def npu_summary(manifest: Manifest) -> dict[str, Any] | None:
    """The NPU variant in a few fields (None when the bundle has none)."""
    if manifest.npu is None:
        return None
    npu = manifest.npu
    verification = npu.raw["verification"]
    return {"chunk": npu.chunk, "context": npu.context, "quantization": npu.scheme, "files": npu.files,
            "verification": "skipped" if verification.get("skipped") else
            {k: verification.get(k) for k in ("passed", "mean_top1", "mean_kl")}}


def print_npu(manifest: Manifest, console: Console) -> None:
    entry = manifest.npu.raw
    quant = entry["quantization"]
    calibration = quant["calibration"]
    console.print(f"NPU graphs: prefill {entry['chunk']} tokens and decode 1 token over a fixed context of "
                  f"{entry['context']}; {quant['scheme']}: activations {quant['activations']}, weights "
                  f"{quant['weights']}; calibrated on {calibration['prefill_samples']} prefill and "
                  f"{calibration['decode_samples']} decode samples of {calibration['file']}")
    print_verification_report(entry["verification"], console, "NPU verification",
                              {"top-1": "{top1:.3f}", "KL": "{kl:.4f}"},
                              "mean top-1 {mean_top1:.3f} (min {min_top1}), mean KL {mean_kl:.4f} (max {max_kl})")
