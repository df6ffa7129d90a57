"""How two sets of logits (or any two arrays) are compared: by export verification and by the tests.

`first_divergence` walks two traces of named intermediates (the numpy reference's `forward(trace=)`
and an engine's) in the reference's order, so that a parity failure names the first layer and tensor
that went astray, not only the logits at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def nmse(actual: np.ndarray, expected: np.ndarray) -> float:
    """Normalized mean squared error: MSE / mean(expected**2), in float64."""
    expected = np.asarray(expected, np.float64)
    power = float(np.mean(expected**2)) or 1.0
    return float(np.mean((np.asarray(actual, np.float64) - expected) ** 2)) / power


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, np.float64) - np.max(logits, -1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def kl_divergence(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """KL(softmax(expected) || softmax(actual)) per row, in nats."""
    log_p, log_q = log_softmax(expected), log_softmax(actual)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def top1(actual: np.ndarray, expected: np.ndarray) -> float:
    """The share of rows whose argmax agrees."""
    return float(np.mean(np.argmax(actual, -1) == np.argmax(expected, -1)))


def first_divergence(
    reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], max_nmse: float
) -> str | None:
    """The first intermediate, in the reference's order, where `other` strays past `max_nmse`, said as
    "layer 3, attn_residual: nmse 0.21 (max 1e-06)"; None when every one they share agrees."""
    for name, expected in reference.items():
        if name not in other:
            continue
        error = nmse(other[name], expected)
        if not error <= max_nmse:  # NaN strays too
            layer, _, tensor = name.rpartition(".")
            where = f"layer {layer}, {tensor}" if layer else tensor
            return f"{where}: nmse {error:.3g} (max {max_nmse:g})"
    return None
