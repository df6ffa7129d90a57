"""`edgellm doctor`: what edgellm sees on this machine and what it would do with it.

The detected board and why, the CPU and its features, the native kernel variant the runtime would
run (after the board's ceiling and EDGELLM_KERNELS), ONNX Runtime's providers and whether QNN is
installed (and whether the bundle has NPU graphs for it), memory and the context a bundle fits in, the
settings a `run` would use, and the service's status when its unit is installed. Nothing here loads a model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from rich.markup import escape

from edgellm.backends.memory import MIB, available_memory, estimate, largest_context
from edgellm.backends.native import ffi as native
from edgellm.backends.npu.session import DEFAULT_SOC_MODEL, DEFAULT_SOC_NAME
from edgellm.backends.registry import run_context
from edgellm.boards.detect import CPU_FEATURES, detect, detected
from edgellm.boards.profile import capped_variant, load_profile
from edgellm.bundle.manifest import read_manifest
from edgellm.cli.info import npu_summary
from edgellm.cli.run import default_bundle_dir
from edgellm.errors import EdgeLLMError
from edgellm.service.unit import UNIT_PATH
from edgellm.settings import RuntimeSettings


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def native_report(settings: RuntimeSettings, arch: str) -> dict[str, Any]:
    if not native.available():
        return {"available": False, "reason": native.unavailable_reason(), "variant": None}
    variants = native.available_variants()
    forced = os.environ.get("EDGELLM_KERNELS") or None
    chosen = forced or capped_variant(variants, settings.kernel_ceiling, arch) or variants[-1]
    return {
        "available": True,
        "variants": variants,
        "variant": chosen,
        "forced_by_env": forced,
        "ceiling": settings.kernel_ceiling,
    }


def onnxruntime_report() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as error:
        return {"available": False, "reason": str(error)}
    qnn_package = importlib.util.find_spec("onnxruntime_qnn") is not None
    providers = ort.get_available_providers()
    return {
        "available": True,
        "version": ort.__version__,
        "providers": providers,
        "qnn": {
            "installed": qnn_package or "QNNExecutionProvider" in providers,
            "package": _version("onnxruntime-qnn") if qnn_package else None,
            "hint": None if qnn_package else "pip install onnxruntime-qnn (Qualcomm boards; x86-64 simulates HTP)",
        },
    }


def memory_report(settings: RuntimeSettings, bundle: Path | None) -> dict[str, Any]:
    available = available_memory()
    report: dict[str, Any] = {"available_bytes": available}
    if bundle is None:
        return report

    manifest = read_manifest(bundle)
    try:  # the context a run would use (on npu: the graphs' window)
        context = run_context(manifest, settings)
    except EdgeLLMError as error:  # e.g. --backend npu on a bundle without NPU graphs: say so, keep the report
        report["bundle"] = {"path": str(bundle), "backend": settings.backend, "error": error.message}
        return report
    needed = estimate(manifest, settings.backend, context, settings.prefill_chunk)
    report["bundle"] = {
        "path": str(bundle),
        "backend": settings.backend,
        "context": context,
        "needed_bytes": needed.total,
        "fits": available is None or needed.total <= available,
        "largest_context_that_fits": None
        if available is None
        else largest_context(manifest, settings.backend, settings.prefill_chunk, available),
    }
    return report


def npu_report(settings: RuntimeSettings, bundle: Path | None) -> dict[str, Any]:
    """The SoC model QNN would compile for, and whether the bundle carries NPU graphs (--backend npu)."""
    soc = str(settings.npu_provider_options.get("soc_model", DEFAULT_SOC_MODEL))
    report: dict[str, Any] = {
        "soc_model": soc,
        "soc_model_from": "board profile"
        if "soc_model" in settings.npu_provider_options
        else f"default ({DEFAULT_SOC_NAME})",
        "bundle": None,
    }
    if bundle is not None:
        report["bundle"] = {"path": str(bundle), "graphs": npu_summary(read_manifest(bundle))}
    return report


def service_report() -> dict[str, Any]:
    report: dict[str, Any] = {"unit": str(UNIT_PATH), "installed": UNIT_PATH.is_file(), "active": None}
    if report["installed"] and shutil.which("systemctl"):
        try:
            result = subprocess.run(
                ["systemctl", "is-active", UNIT_PATH.name], capture_output=True, text=True, timeout=5
            )
            report["active"] = result.stdout.strip() or result.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            report["active"] = f"unknown ({error})"
    return report


def doctor_report(
    board: str | None = None, bundle: Path | None = None, root: str | Path = "/", arch: str | None = None
) -> dict[str, Any]:
    """`root` and `arch` point detection at recorded files (tests)."""
    found = detected() if str(root) == "/" and arch is None else detect(root, arch)
    choice = board or os.environ.get("EDGELLM_BOARD") or "auto"
    profile = found.profile if choice == "auto" else None if choice == "none" else load_profile(choice)
    settings = RuntimeSettings.resolve(board=profile.source if profile and profile.source != "built-in" else "none")
    arch = found.cpu.arch
    features = set(found.cpu.features)
    notes = list(found.notes)
    if profile and profile.arch != arch:
        notes.append(f"the {profile.name} profile is for {profile.arch} boards; this machine is {arch}")
    return {
        "notes": notes,
        "edgellm": _version("edgellm"),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "board": {
            **found.to_json(),
            "profile": profile.to_json() if profile else None,
            "chosen_by": "detection" if choice == "auto" else f"--board/EDGELLM_BOARD {choice}",
        },
        "cpu": {
            "summary": found.cpu.model_name,
            "cores": found.cpu.cores,
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "features": [f for f in CPU_FEATURES if f in features],
        },
        "native": native_report(settings, arch),
        "onnxruntime": onnxruntime_report(),
        "settings": {
            "backend": settings.backend,
            "threads": settings.thread_count,
            "cpu_affinity": settings.cpu_affinity,
            "default_context": settings.default_context,
            "providers": list(settings.providers),
        },
        "memory": {"total_bytes": found.memory_total, **memory_report(settings, bundle)},
        "npu": npu_report(settings, bundle),
        "service": service_report(),
    }


def print_report(report: dict[str, Any], console) -> None:
    board, cpu, native, ort = report["board"], report["cpu"], report["native"], report["onnxruntime"]
    memory, settings, service = report["memory"], report["settings"], report["service"]
    lines = [
        ("board", f"{board['title']} [{board['board']}]: {board['reason']}"),
        (
            "profile",
            f"{board['profile']['name']} ({board['chosen_by']}): {board['profile']['source']}"
            if board["profile"]
            else f"none ({board['chosen_by']})",
        ),
        (
            "cpu",
            f"{cpu['summary']}, {cpu['cores']} cores ({cpu['usable_cores']} usable), {report['board']['cpu']['arch']}",
        ),
        ("features", " ".join(cpu["features"]) or "none of note"),
        (
            "kernels",
            f"{native['variant']} (of {', '.join(native['variants'])}"
            + (f"; board ceiling {native['ceiling']}" if native.get("ceiling") else "")
            + ("; forced by EDGELLM_KERNELS" if native.get("forced_by_env") else "")
            + ")"
            if native["available"]
            else f"native engine unavailable: {native['reason']}",
        ),
        (
            "onnxruntime",
            f"{ort['version']}: {', '.join(ort['providers'])}" if ort["available"] else f"unavailable: {ort['reason']}",
        ),
        (
            "qnn",
            ("installed" + (f" (onnxruntime-qnn {ort['qnn']['package']})" if ort["qnn"]["package"] else ""))
            if ort.get("qnn", {}).get("installed")
            else f"not installed: {ort.get('qnn', {}).get('hint')}",
        ),
        ("npu", _npu_line(report["npu"])),
        (
            "settings",
            f"backend {settings['backend']}, {settings['threads']} threads"
            + (f" on CPUs {settings['cpu_affinity']}" if settings["cpu_affinity"] else "")
            + f", context {settings['default_context']}",
        ),
        ("memory", _memory_line(memory)),
        (
            "service",
            f"{service['unit']}: "
            + ("not installed" if not service["installed"] else f"installed, {service['active'] or 'status unknown'}"),
        ),
    ]
    for note in report["notes"]:
        lines.append(("note", note))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        console.print(f"[bold]{key:<{width}}[/bold]  {escape(value)}", highlight=False, soft_wrap=True)


def _npu_line(npu: dict[str, Any]) -> str:
    text = f"QNN SoC model {npu['soc_model']} ({npu['soc_model_from']})"
    bundle = npu.get("bundle")
    if bundle:
        graphs = bundle["graphs"]
        text += (
            f"; {Path(bundle['path']).name} has NPU graphs (prefill {graphs['chunk']} tokens, context "
            f"{graphs['context']}, {graphs['quantization']}): --backend npu"
            if graphs
            else f"; {Path(bundle['path']).name} has no NPU graphs (export with --profile npu)"
        )
    return text


def _memory_line(memory: dict[str, Any]) -> str:
    total, available = memory.get("total_bytes"), memory.get("available_bytes")
    text = (f"{available / MIB:.0f} MiB available" if available else "available memory unknown") + (
        f" of {total / MIB:.0f} MiB" if total else ""
    )
    bundle = memory.get("bundle")
    if bundle:
        verdict = "fits" if bundle["fits"] else "does NOT fit"
        text += (
            f"; {Path(bundle['path']).name} at context {bundle['context']} needs "
            f"{bundle['needed_bytes'] / MIB:.0f} MiB ({verdict}); largest context that fits: "
            f"{bundle['largest_context_that_fits']}"
        )
    return text


def run_doctor(board: str | None, bundle: str | None, as_json: bool) -> dict[str, Any]:
    import json

    from rich.console import Console

    path = Path(bundle) if bundle else None
    if path is None:
        default = default_bundle_dir()
        path = default if (default / "manifest.json").is_file() else None
    elif not (path / "manifest.json").is_file():
        raise EdgeLLMError(
            f"{path} is not a bundle folder (no manifest.json)", "pass a folder written by edgellm export"
        )
    report = doctor_report(board, path)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, Console())
    return report
