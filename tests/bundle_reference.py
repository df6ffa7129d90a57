"""The numpy reference rebuilt from a bundle's own files (helpers for tests, not a test module)."""

import numpy as np

from edgellm.bundle.manifest import Manifest, read_manifest
from edgellm.bundle.quant_formats import dequantize, unpack_codes
from edgellm.bundle.weights import BundleWeights
from edgellm.export.reference import ReferenceModel


def reference_from_bundle(manifest: Manifest) -> ReferenceModel:
    """Dequantize every tensor straight from weights.bin through the manifest, as an engine would."""
    weights = BundleWeights.of(manifest)
    tensors = {}
    for name, m in manifest.matrices.items():
        mins = weights.array(m.mins) if m.mins else None
        tensors[name] = dequantize(
            m.format, unpack_codes(np.asarray(weights.array(m.qweight)), m.bits), weights.array(m.scales), mins, m.cols
        )
    for name in manifest.tensors:
        base = name.rsplit(".", 1)[0]
        if base not in manifest.matrices:
            tensors[name] = np.asarray(weights.array(name))
    return ReferenceModel(manifest.config, tensors)


def reference_for(bundle) -> ReferenceModel:
    return reference_from_bundle(read_manifest(bundle))


def reference_greedy(reference: ReferenceModel, prompt_ids, n: int) -> list[int]:
    """n greedy tokens from the reference forward with its KV cache (end-of-sequence ignored)."""
    cache = reference.new_cache()
    logits = reference.forward(prompt_ids, cache)[-1]
    out = []
    for _ in range(n):
        token = int(np.argmax(logits))
        out.append(token)
        logits = reference.forward([token], cache)[-1]
    return out
