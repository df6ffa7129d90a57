"""The measuring scripts of native/scripts still run: they are not tests themselves, so nothing else
would notice one broken by a change of the package (bench_kernels.py was, by the layout change)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_without_native

SCRIPTS = Path(__file__).resolve().parent.parent / "native" / "scripts"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def test_bench_kernels_times_every_format_and_variant_with_both_activation_widths():
    skip_without_native()
    from edgellm.backends.native import ffi as native

    rows = [
        json.loads(line)
        for line in run(
            "bench_kernels.py", "--rows", "8", "--cols", "96", "--tokens", "2", "--repeat", "1"
        ).splitlines()
    ]
    assert {(r["format"], r["variant"]) for r in rows} == {
        (f, v) for f in native.FORMATS for v in native.available_variants()
    }
    for r in rows:
        for key in ("matvec_us", "matmul_2_us", "matvec_8bit_us", "matmul_2_8bit_us"):
            assert r[key] > 0, (r, key)


@pytest.mark.parametrize("script", ["armcost.py", "fidelity.py"])
def test_the_measuring_scripts_parse_their_arguments(script):
    """Their measurements need qemu and a cross compiler, or llama-cpp-python: not here; their --help
    imports the script and builds its parser without them."""
    assert "usage:" in run(script, "--help")
