"""Picks the backend a bundle runs on for the settings, and the context it runs with."""

from __future__ import annotations

from edgellm.backends.base import Backend
from edgellm.backends.native.backend import NativeBackend
from edgellm.backends.npu.backend import NpuBackend, npu_context
from edgellm.backends.onnxruntime import OnnxRuntimeBackend
from edgellm.backends.placement import cap_kernel_variant, pin_process
from edgellm.bundle.manifest import Manifest
from edgellm.errors import InvalidSettingError
from edgellm.settings import RuntimeSettings

BACKENDS = {"native": NativeBackend, "onnxruntime": OnnxRuntimeBackend, "npu": NpuBackend}


def run_context(manifest: Manifest, settings: RuntimeSettings) -> int:
    """The context a bundle runs with on settings.backend: the NPU graphs' compiled window (or less, if
    asked), else the setting or the default capped by what the model was trained for."""
    if settings.backend == "npu":
        return npu_context(manifest, settings)
    return settings.context_for(manifest.config.max_position_embeddings)


def create_backend(manifest: Manifest, settings: RuntimeSettings, context_length: int) -> Backend:
    if settings.cpu_affinity:  # before any backend starts its threads: they inherit it
        pin_process(settings.cpu_affinity)
    if settings.backend == "native" and settings.kernel_ceiling:
        cap_kernel_variant(settings.kernel_ceiling)
    backend = BACKENDS.get(settings.backend)
    if backend is None:
        raise InvalidSettingError(f"unknown backend {settings.backend!r}")
    return backend(manifest, settings, context_length)
