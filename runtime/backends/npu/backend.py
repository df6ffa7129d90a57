"""NPU backend: the bundle's static-shape QDQ graphs on the Hexagon NPU, through ONNX Runtime's QNN EP.

The graphs (`edgellm export --profile npu`) were compiled for one context window and one prefill
chunk; runtime/npu_host.py feeds them (host embedding, masks, the fixed-size KV cache written in
place) and runtime/npu_session.py opens them on the HTP with CPU fallback off and the compiled
context cached. The generator, sampler and streaming are the same as on every other backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgellm.backends.base import Backend
from edgellm.backends.npu.host import MASK_VALUE, HostEmbedding, NpuDecoder, check_graph_io
from edgellm.backends.npu.session import QnnSessions, cache_dir, log, model_hash
from edgellm.bundle.architectures import EMBED
from edgellm.bundle.format import cache_root
from edgellm.bundle.manifest import Manifest, NpuGraphs
from edgellm.bundle.weights import BundleWeights
from edgellm.errors import ContextOverflowError, NpuError
from edgellm.settings import RuntimeSettings


def npu_entry(manifest: Manifest) -> NpuGraphs:
    """The manifest's description of the NPU graphs; NpuError when the bundle has none."""
    entry = manifest.npu
    if entry is None:
        raise NpuError(
            "this bundle has no NPU graphs", "export it with them: edgellm export SRC -o BUNDLE --profile npu"
        )
    if entry.mask_value != float(MASK_VALUE):
        raise NpuError(
            f"the NPU graphs were calibrated for mask value {entry.mask_value}, this runtime feeds {float(MASK_VALUE)}",
            "export the bundle again with this edgellm",
        )
    return entry


def npu_context(manifest: Manifest, settings: RuntimeSettings) -> int:
    """The context the NPU backend runs: the graphs' fixed window, or less when --context asks for less."""
    window = npu_entry(manifest).context
    if settings.context_length > window:
        raise ContextOverflowError(
            f"a context of {settings.context_length} tokens is longer than the NPU graphs' fixed window of {window}",
            f"use --context {window} or less, or export with --npu-context {settings.context_length}",
        )
    return settings.context_length or window


class NpuBackend(Backend):
    name = "npu"

    def __init__(self, manifest: Manifest, settings: RuntimeSettings, context_length: int):
        entry = npu_entry(manifest)
        bundle = manifest.bundle
        self.config = manifest.config
        self.window = entry.context  # KV cache slots the graphs were compiled for
        self.context_length = min(context_length, self.window)
        self.prefill_chunk = entry.chunk
        self.position = 0
        qnn = QnnSessions(settings.npu_provider_options)
        folder = cache_dir(bundle)
        if folder is None:
            log.warning(
                "neither %s nor %s can be written: the NPU graphs are compiled at every start",
                Path(bundle) / "npu_cache",
                cache_root() / "npu",
            )
        digest = model_hash(manifest, entry.files.values())
        sessions, self.loads = {}, []
        for role, seq in (("prefill", self.prefill_chunk), ("decode", 1)):
            graph = manifest.path(entry.files[role])
            session, report = qnn.open(graph, qnn.key(role, digest), folder)
            check_graph_io(session, self.config, seq, self.window, str(graph))
            sessions[seq] = session
            self.loads.append(report)
        table = manifest.matrices[f"{EMBED}.weight"]
        self.decoder = NpuDecoder(self.config, self.window, sessions, HostEmbedding(BundleWeights.of(manifest), table))

    def _forward_chunk(self, token_ids: Sequence[int], all_logits: bool) -> np.ndarray:
        self.decoder.truncate(self.position)
        logits = self.decoder.forward_chunk(token_ids)
        self.position = self.decoder.position
        return (logits if all_logits else logits[-1]).copy()  # only what is kept: a prefill's last row

    def close(self) -> None:
        self.decoder = None

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "context_length": self.context_length,
            "prefill_chunk": self.prefill_chunk,
            "execution_provider": "QNNExecutionProvider (HTP, CPU fallback disabled)",
            "soc_model": self.loads[0]["soc_model"] if self.loads else None,
            "loads": self.loads,
        }
