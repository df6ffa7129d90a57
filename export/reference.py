"""The numpy reference forward: the single definition of the decoder math (fp32).

Llama-family decoder with a KV cache: RMSNorm, rotate-half RoPE (optionally llama3-scaled),
grouped-query attention, SwiGLU MLP, tied or untied output head. Every other engine (the ONNX
graph, the C kernels) is tested against this; this is tested against `transformers`.
Shapes: S = new tokens, T = cached + new tokens, H = query heads, KV = key/value heads,
D = head_dim, E = hidden size, V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgellm.bundle.architectures import EMBED, FINAL_NORM, LM_HEAD, layer_bias, layer_weight
from edgellm.bundle.format import INV_FREQ
from edgellm.bundle.model_config import ModelConfig

FREQ_FACTORS = "model.rotary_emb.freq_factors"  # a GGUF's rope_freqs


def rope_inv_freq(config: ModelConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """float32 [D/2]: the rotation speed of each pair of dimensions."""
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        # Llama 3.1's NTK-by-parts: slow frequencies are divided by `factor`, fast ones kept,
        # the band between interpolated (same formula as transformers' _compute_llama3_parameters).
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    if freq_factors is not None:  # GGUF's rope_freqs tensor: the same idea, precomputed
        inv_freq = (inv_freq / freq_factors.astype(np.float32)).astype(np.float32)
    return inv_freq


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # x [S, E], weight [E]
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    # x [S, heads, D], positions [S] -> rotated x [S, heads, D]; pairs are (i, i + D/2)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [S, D/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # [S, 1, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention.

    q [S, H, D] at absolute `positions` [S]; k, v [T, KV, D] hold positions 0..T-1.
    Query head h reads key/value head h // (H / KV). Returns [S, H*D].
    """
    s, h, d = q.shape
    t, kv, _ = k.shape
    group = h // kv
    qg = q.reshape(s, kv, group, d).transpose(1, 2, 0, 3)  # [KV, G, S, D]
    kt = k.transpose(1, 2, 0)[:, None]  # [KV, 1, D, T]
    scores = (qg @ kt) / np.float32(math.sqrt(d))  # [KV, G, S, T]
    visible = np.arange(t)[None, :] <= positions[:, None]  # [S, T]
    scores = np.where(visible, scores, -np.inf)
    probs = softmax(scores, axis=-1)
    out = probs @ v.transpose(1, 0, 2)[:, None]  # [KV, G, S, D]
    return out.transpose(2, 0, 1, 3).reshape(s, h * d)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def swiglu(x: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray) -> np.ndarray:
    # x [S, E]; gate/up [F, E]; down [E, F]
    return (silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


@dataclass
class KVCache:
    """Per layer, keys and values of every position seen so far: [T, KV, D] each."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


class ReferenceModel:
    """The decoder, run in numpy from a dict of float32 weights named like the HF checkpoint."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray]):
        self.config = config
        self.w = {name: np.asarray(value, np.float32) for name, value in weights.items()}
        stored = self.w.get(INV_FREQ)  # a bundle stores the exact table it runs
        self.inv_freq = stored if stored is not None else rope_inv_freq(config, self.w.get(FREQ_FACTORS))

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(
        self, token_ids, cache: KVCache | None = None, trace: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Logits [S, V] for `token_ids` [S], continuing from `cache` (which is extended)."""
        c, w = self.config, self.w
        cache = cache if cache is not None else KVCache()
        ids = np.asarray(token_ids, np.int64)
        start = cache.length
        positions = np.arange(start, start + len(ids))
        x = w[f"{EMBED}.weight"][ids]  # [S, E]
        for i in range(c.num_hidden_layers):

            def weight(role: str, i: int = i) -> np.ndarray:
                return w[layer_weight(i, role)]

            h = rms_norm(x, weight("attn_norm"), c.rms_norm_eps)
            q = h @ weight("q_proj").T  # [S, H*D]
            k = h @ weight("k_proj").T  # [S, KV*D]
            v = h @ weight("v_proj").T
            if c.attention_bias:
                q = q + w[layer_bias(i, "q_proj")]
                k = k + w[layer_bias(i, "k_proj")]
                v = v + w[layer_bias(i, "v_proj")]
            q = rope(q.reshape(len(ids), c.num_attention_heads, c.head_dim), positions, self.inv_freq)
            k = rope(k.reshape(len(ids), c.num_key_value_heads, c.head_dim), positions, self.inv_freq)
            v = v.reshape(len(ids), c.num_key_value_heads, c.head_dim)
            if len(cache.keys) <= i:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[i] = np.concatenate([cache.keys[i], k])
                cache.values[i] = np.concatenate([cache.values[i], v])
            attn = attention(q, cache.keys[i], cache.values[i], positions)  # [S, H*D]
            x = x + attn @ weight("o_proj").T
            if trace is not None:
                trace[f"{i}.attn_norm"], trace[f"{i}.attn"], trace[f"{i}.attn_residual"] = h, attn, x
            h = rms_norm(x, weight("mlp_norm"), c.rms_norm_eps)
            x = x + swiglu(h, weight("gate_proj"), weight("up_proj"), weight("down_proj"))
            if trace is not None:
                trace[f"{i}.mlp_norm"], trace[f"{i}.out"] = h, x
        x = rms_norm(x, w[f"{FINAL_NORM}.weight"], c.rms_norm_eps)
        head = w[f"{EMBED}.weight"] if c.tie_word_embeddings else w[f"{LM_HEAD}.weight"]
        if trace is not None:
            trace["final_norm"] = x
        return x @ head.T  # [S, V]
