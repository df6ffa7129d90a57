"""weights.bin, memory-mapped: every tensor is a zero-copy numpy view at its index entry's offset."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edgellm.bundle.format import WEIGHTS_FILE
from edgellm.bundle.manifest import Manifest, TensorEntry


class BundleWeights:
    """`index` was checked against the file (manifest.py): every entry lies inside it."""

    def __init__(self, file: BinaryIO | Path, index: Mapping[str, TensorEntry]):
        self.index = index
        self.map = np.memmap(file, dtype=np.uint8, mode="r")

    @classmethod
    def of(cls, manifest: Manifest) -> BundleWeights:
        """weights.bin of a checked bundle."""
        with manifest.open(WEIGHTS_FILE) as handle:  # the mapping outlives the descriptor
            return cls(handle, manifest.tensors)

    def array(self, name: str) -> np.ndarray:
        """The stored tensor `name` as a read-only view of the mapped file."""
        entry = self.index[name]
        raw = self.map[entry.offset : entry.offset + entry.nbytes]
        return raw.view(np.dtype(entry.dtype)).reshape(entry.shape)
