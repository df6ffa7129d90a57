"""The one small interface every engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from edgellm.errors import ContextOverflowError


class Backend(ABC):
    """Runs the decoder over a KV cache of fixed capacity.

    The cache holds positions 0 .. position-1. `forward` appends tokens and returns logits;
    `truncate` forgets everything from a position on (the cache is reused, not freed).
    """

    name: str
    context_length: int  # capacity of the KV cache, in tokens
    prefill_chunk: int  # largest number of tokens one forward call takes
    position: int = 0

    @abstractmethod
    def _forward_chunk(self, token_ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """Run at most `prefill_chunk` tokens at `position`; advance `position`."""

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens (prefilled in chunks); logits of the last one [V], or of all [S, V]."""
        if not len(token_ids):
            raise ValueError("forward needs at least one token")
        if self.position + len(token_ids) > self.context_length:
            raise ContextOverflowError(
                f"{self.position + len(token_ids)} tokens do not fit in the context of {self.context_length}",
                "shorten the prompt, or raise the context length (--context)",
            )
        rows = []
        for start in range(0, len(token_ids), self.prefill_chunk):
            rows.append(self._forward_chunk(token_ids[start : start + self.prefill_chunk], all_logits))
        return np.concatenate(rows) if all_logits else rows[-1]

    def score(self, token_ids: Sequence[int], decode_steps: int = 0) -> np.ndarray:
        """Logits [S, V] of every token of `token_ids` from an empty cache, computed as generation does:
        all but the last `decode_steps` prefilled (in chunks), the rest one at a time through the cache."""
        self.reset()
        split = max(1, len(token_ids) - decode_steps)
        rows = [self.forward(list(token_ids[:split]), all_logits=True)]
        rows += [self.forward([token])[None] for token in token_ids[split:]]
        return np.concatenate(rows)

    def truncate(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot truncate a cache of {self.position} tokens to {position}")
        self.position = position

    def reset(self) -> None:
        self.truncate(0)

    def close(self) -> None:  # noqa: B027  (release sessions and buffers: a backend that holds some overrides it)
        pass

    def describe(self) -> dict:
        return {"backend": self.name, "context_length": self.context_length}
