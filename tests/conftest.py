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
