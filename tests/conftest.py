"""Shared fixtures: the real SmolLM2 bundle is exported once per test session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models.py

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    from edgellm.export.exporter import export_model

    bundle = tmp_path_factory.mktemp("smollm2") / "bundle"
    export_model("default", bundle)
    return bundle


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory) -> Path:
    """A tiny random tied llama (tests/tiny_models.py) exported to an int4 bundle; read-only: copy it to mutate."""
    from edgellm.export.exporter import export_model
    from tiny_models import make_tiny_model, save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    bundle = folder / "bundle"
    export_model(save_tiny_model(make_tiny_model("llama", tie=True), folder / "hf"), bundle)
    return bundle
