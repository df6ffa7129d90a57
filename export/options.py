"""What an export is asked to do (`ExportOptions`): the one definition of the exporter's settings and
their defaults, which `edgellm export` shows and passes on. A leaf: the CLI imports it without the
export extras."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from edgellm.bundle.architectures import EMBED, LM_HEAD
from edgellm.errors import EdgeLLMError

SCHEMES = {"a16w8": ("QUInt16", "QInt8"), "a16w4": ("QUInt16", "QInt4")}  # activations, weights

HIGH_PRECISION_DEFAULT = (f"{EMBED}.weight", f"{LM_HEAD}.weight")


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4  # 4 or 8, for float matrices
    block: int = 32  # 32, 64 or 128 values per block
    symmetric: bool = False  # int4: symmetric (zero point 8) instead of scale + minimum
    keep_8bit: tuple[str, ...] = field(default=HIGH_PRECISION_DEFAULT)  # names or fnmatch patterns

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise EdgeLLMError(f"--bits must be 4 or 8, got {self.bits}")
        if self.block not in (16, 32, 64, 128):
            raise EdgeLLMError(f"--block must be 16, 32, 64 or 128, got {self.block}")

    def format_for(self, name: str) -> str:
        if self.bits == 8 or any(fnmatch.fnmatchcase(name, p) for p in self.keep_8bit):
            return "int8_sym"
        return "int4_sym" if self.symmetric else "int4_asym"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block": self.block, "symmetric": self.symmetric, "keep_8bit": list(self.keep_8bit)}


@dataclass(frozen=True)
class NpuOptions:
    chunk: int = 64  # tokens per prefill call
    context: int = 512  # KV cache slots, fixed at export
    quant: str = "a16w8"  # a16w8 | a16w4

    def __post_init__(self) -> None:
        if self.quant not in SCHEMES:
            raise EdgeLLMError(f"--npu-quant must be one of {', '.join(SCHEMES)}, got {self.quant!r}")
        if not isinstance(self.context, int) or not 16 <= self.context <= 8192:
            raise EdgeLLMError(f"--npu-context must be 16..8192 tokens, got {self.context!r}")
        if not isinstance(self.chunk, int) or not 2 <= self.chunk <= self.context:
            raise EdgeLLMError(
                f"--npu-chunk must be 2..{self.context} (the context), got {self.chunk!r}",
                "single tokens always go through the decode graph",
            )

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "context": self.context, "quant": self.quant}


PROFILES = ("cpu", "npu")  # npu: the CPU bundle plus the NPU graphs


@dataclass(frozen=True)
class ExportOptions:
    quant: QuantOptions = field(default_factory=QuantOptions)
    verify: bool = True
    force: bool = False
    profile: str = "cpu"  # "npu": also the static-shape QDQ graphs for an NPU (export/npu_export.py)
    npu: NpuOptions = field(default_factory=NpuOptions)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise EdgeLLMError(f"--profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
