"""Shared fixtures: the real SmolLM2 bundle is exported once per test session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models.py

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(items):
    """A test that needs the real SmolLM2 bundle (the session fixture exports it: about a minute, once)
    is `slow`, whichever fixture brings it in; `make test-fast` leaves those out, with the `system` ones."""
    for item in items:
        if "smollm2_bundle" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


def skip_without_native(need: str = "", module: bool = False) -> None:
    """Skip a test (or, `module`, a whole test module) that needs the native engine (`need`: a kernel
    variant it must offer) where it is not built; under EDGELLM_REQUIRE_NATIVE=1 (CI, the README's test
    command) fail instead."""
    import os

    from edgellm.backends.native import ffi as native

    missing = None if native.available() else native.unavailable_reason()
    if missing is None and need and need not in native.available_variants():
        missing = f"the native engine offers no {need} variant here ({', '.join(native.available_variants())})"
    if missing is None:
        return
    if os.environ.get("EDGELLM_REQUIRE_NATIVE") == "1":
        pytest.fail(f"EDGELLM_REQUIRE_NATIVE=1: {missing}")
    pytest.skip(missing, allow_module_level=module)


@pytest.fixture(scope="session")
def smollm2_gguf_metadata() -> dict:
    """The real SmolLM2 GGUF's metadata (its tokenizer among it), parsed once: that takes seconds."""
    from edgellm.default_model import default_gguf_path
    from edgellm.export.sources.gguf_metadata import open_gguf, read_gguf_metadata

    return read_gguf_metadata(open_gguf(default_gguf_path()))


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    from edgellm.export.exporter import export_model

    bundle = tmp_path_factory.mktemp("smollm2") / "bundle"
    export_model("default", bundle)
    return bundle


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory) -> Path:
    """A tiny random tied llama (tests/tiny_models.py) exported to an int4 bundle; read-only: copy it to mutate."""
    from tiny_models import make_tiny_model, save_tiny_model

    from edgellm.export.exporter import export_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    bundle = folder / "bundle"
    export_model(save_tiny_model(make_tiny_model("llama", tie=True), folder / "hf"), bundle)
    return bundle
