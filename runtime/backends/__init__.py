"""Engines that run a bundle's decoder over a KV cache. All sit behind `Backend`."""

from __future__ import annotations

from ..errors import InvalidSettingError
from ..manifest import Manifest
from ..settings import RuntimeSettings
from .base import Backend


def run_context(manifest: Manifest, settings: RuntimeSettings) -> int:
    """The context a bundle runs with on settings.backend: the NPU graphs' compiled window (or less, if
    asked), else the setting or the default capped by what the model was trained for."""
    if settings.backend == "npu":
        from .npu_backend import npu_context

        return npu_context(manifest, settings)
    return settings.context_for(manifest.config.max_position_embeddings)


def create_backend(manifest: Manifest, settings: RuntimeSettings, context_length: int) -> Backend:
    from ..placement import cap_kernel_variant, pin_process

    if settings.cpu_affinity:  # before any backend starts its threads: they inherit it
        pin_process(settings.cpu_affinity)
    if settings.backend == "native":
        if settings.kernel_ceiling:
            cap_kernel_variant(settings.kernel_ceiling)
        from .native_backend import NativeBackend

        return NativeBackend(manifest, settings, context_length)
    if settings.backend == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, settings, context_length)
    if settings.backend == "npu":
        from .npu_backend import NpuBackend

        return NpuBackend(manifest, settings, context_length)
    raise InvalidSettingError(f"unknown backend {settings.backend!r}")


__all__ = ["Backend", "create_backend", "run_context"]
