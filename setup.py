"""Builds the optional native kernels (native/build_ffi.py, through cffi); everything else about
the package is in pyproject.toml.

The extension is optional: without cffi at build time, or without a working C compiler, edgellm
still installs and edgellm.native reports "native backend unavailable: <reason>".
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _warn(message: str) -> None:
    print(f"WARNING: edgellm: {message}; the native backend will be unavailable", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning instead of a failed install.

    pip shows a successful build's output only with -v; edgellm.native says at run time that
    the backend is unavailable and how to fix it."""

    failed: set

    def run(self):
        self.failed = set()
        try:
            super().run()
        except Exception as error:  # e.g. no compiler at all (DistutilsPlatformError)
            _warn(f"could not build C extensions ({type(error).__name__}: {error})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # CompileError, LinkError, a missing Python.h, ...
            self.failed.add(ext.name)
            _warn(f"could not build {ext.name} ({type(error).__name__}: {error})")

    def copy_extensions_to_source(self):  # editable installs: skip what was not built
        built = [ext for ext in self.extensions if ext.name not in self.failed]
        self.extensions, everything = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything


def _cffi_modules() -> dict:
    try:
        import cffi  # noqa: F401  (its setuptools hook handles the cffi_modules keyword)
    except ImportError:
        _warn("cffi is not installed at build time")
        return {}
    return {"cffi_modules": ["native/build_ffi.py:ffibuilder"]}


# The extension uses only the stable ABI (cffi builds it with Py_LIMITED_API: _native.abi3.so), so one
# wheel serves every CPython from 3.10 on: Raspberry Pi OS (3.11) and JetPack's Ubuntu 22.04 (3.10) alike.
setup(cmdclass={"build_ext": OptionalBuildExt}, options={"bdist_wheel": {"py_limited_api": "cp310"}}, **_cffi_modules())
