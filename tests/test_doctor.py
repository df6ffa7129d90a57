"""`edgellm doctor`: the report on this machine agrees with what the runtime itself reports."""

import json
import subprocess
import sys

from conftest import FIXTURES

from edgellm.cli.doctor import doctor_report


def test_doctor_json_describes_this_machine(tiny_llama_bundle):
    result = subprocess.run(
        [sys.executable, "-m", "edgellm", "doctor", str(tiny_llama_bundle), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    import onnxruntime as ort

    from edgellm.backends.native import ffi as native
    from edgellm.boards.detect import detect

    assert report["board"]["board"] == detect().profile.name
    assert report["onnxruntime"]["providers"] == ort.get_available_providers()
    if native.available():
        assert report["native"]["variant"] == native.kernel_variant()
        assert report["native"]["variants"] == native.available_variants()
    assert report["memory"]["bundle"]["fits"] is True
    assert report["memory"]["bundle"]["largest_context_that_fits"] >= report["memory"]["bundle"]["context"]
    assert report["service"]["installed"] in (True, False)
    assert isinstance(report["onnxruntime"]["qnn"]["installed"], bool)


def test_doctor_prints_a_line_per_topic():
    result = subprocess.run([sys.executable, "-m", "edgellm", "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    keys = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    for key in (
        "board",
        "profile",
        "cpu",
        "features",
        "kernels",
        "onnxruntime",
        "qnn",
        "settings",
        "memory",
        "service",
    ):
        assert key in keys


def test_doctor_reads_a_recorded_board():
    report = doctor_report(root=FIXTURES / "boards" / "rk3588", arch="aarch64")
    assert report["board"]["board"] == "rk3588"
    assert report["settings"]["cpu_affinity"] == "4-7" and report["settings"]["threads"] == 4
    assert report["native"].get("ceiling") in (None, "dotprod")


def test_doctor_notes_a_profile_for_another_architecture():
    report = doctor_report(board="rpi5", root=FIXTURES / "boards" / "x86-64", arch="x86_64")
    assert any("rpi5 profile is for aarch64" in note for note in report["notes"])
