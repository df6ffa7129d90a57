"""Parity assertions for the tests (helpers, not a test module): logits compared by one rule, and a
failure that names the first layer and tensor where the engine left the reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgellm.export.verify.numerics import first_divergence, nmse, top1


def assert_parity(
    actual: np.ndarray,
    expected: np.ndarray,
    max_nmse: float,
    what: str,
    traces: Callable[[], tuple[dict, dict]] | None = None,
    min_top1: float = 1.0,
) -> None:
    """`actual` logits follow `expected` within `max_nmse` and `min_top1`; else an AssertionError that,
    when `traces` gives (reference trace, engine trace), names the first intermediate that diverged."""
    error, agreement = nmse(actual, expected), top1(actual, expected)
    if error <= max_nmse and agreement >= min_top1:
        return
    where = "no trace to compare"
    if traces is not None:
        where = first_divergence(*traces(), max_nmse) or "every traced intermediate agrees: the head or the cache"
    raise AssertionError(
        f"{what}: logits nmse {error:.3g} (max {max_nmse:g}), top-1 {agreement:.3f} "
        f"(min {min_top1}); first divergence: {where}"
    )
