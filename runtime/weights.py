"""weights.bin, memory-mapped: every tensor is a zero-copy numpy view at its manifest offset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle_format import ALIGN, WEIGHTS_FILE
from .errors import EdgeLLMError


class BundleWeights:
    def __init__(self, bundle: Path, manifest: dict):
        path = Path(bundle) / WEIGHTS_FILE
        self.index = manifest["tensors"]
        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        for name, entry in self.index.items():
            end = entry["offset"] + entry["nbytes"]
            if entry["offset"] % ALIGN or end > self.map.size:
                raise EdgeLLMError(f"{path}: tensor {name} lies outside the file or is misaligned",
                                   "the bundle is damaged; export it again")

    def array(self, name: str) -> np.ndarray:
        """The stored tensor `name` as a read-only view of the mapped file."""
        entry = self.index[name]
        raw = self.map[entry["offset"]: entry["offset"] + entry["nbytes"]]
        return raw.view(np.dtype(entry["dtype"])).reshape(entry["shape"])
