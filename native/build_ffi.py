"""cffi (API mode) builder for edgellm._native: the C sources of native/src compiled into one
Python extension. setup.py hands `ffibuilder` to cffi's setuptools hook (cffi_modules), which
compiles it at `pip install`; run this file directly to build it in place for a quick check.

The cdef is the block of edgellm.h between EL_CDEF_BEGIN and EL_CDEF_END, so the Python side
sees exactly the declarations the C code is compiled against.
"""

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "edgellm.h"
SOURCES = [
    "api.c",
    "dispatch.c",
    "engine.c",
    "pool.c",
    "ref.c",
    "x86.c",
    "x86_panel.c",
    "arm.c",
    "arm_q8a.c",
    "x86_q8a.c",
]

# -ffp-contract=off: no fused a*b+c, whose rounding differs from separate ops (and from numpy);
# the bit-exactness of every variant against ref and numpy depends on it. No -march: the SIMD
# variants carry their ISA in target attributes and dispatch picks one at load.
COMPILE_ARGS = ["-O2", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"]


def cdef_from_header(text: str) -> str:
    match = re.search(r"/\* EL_CDEF_BEGIN \*/(.*)/\* EL_CDEF_END \*/", text, re.S)
    if not match:
        raise RuntimeError(f"{HEADER}: no EL_CDEF_BEGIN/EL_CDEF_END block")
    return "#define EL_ABI_VERSION ...\n#define EL_QBLOCK ...\n" + match.group(1)


def _relative(path: Path) -> str:
    # setuptools wants sources relative to the project (the directory setup.py runs in)
    return os.path.relpath(path, Path.cwd())


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "edgellm._native",
    '#include "edgellm.h"',
    sources=[_relative(HERE / "src" / name) for name in SOURCES],
    include_dirs=[_relative(HERE)],
    depends=[_relative(HEADER), _relative(HERE / "src" / "kernels.h"), _relative(HERE / "src" / "x86_sums.h")],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE / "build" / "cffi"), verbose=True)
