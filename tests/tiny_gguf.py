"""Write a tiny transformers model as a GGUF file, the way llama.cpp's converter would (a helper).

Mirrors `convert_hf_to_gguf.py` (LlamaModel, Qwen2Model) closely enough that a reader which
handles these files handles the converter's: the same metadata keys, the same tensor names,
llama's Q/K row permutation for interleaved RoPE, the llama3 `rope_freqs` tensor, and 1-D
tensors (norms, biases) kept F32 whatever the matrix type. Quantized blocks come from
`gguf.quants.quantize`; Q4_K, which gguf-py cannot quantize, from `quantize_q4_k` here.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import numpy as np
from tiny_models import tiny_tokenizer_json

from edgellm.bundle.architectures import gguf_tensor_name  # the real SmolLM2 GGUF checks its names

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # gguf.TokenType


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: rotate-half rows -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_params(config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a transformers 4 or 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or params or None
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta") or 10000.0
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(theta), scaling


def llama3_rope_freqs(config) -> np.ndarray:
    """float32 [head_dim/2]: the per-frequency divisors convert_hf_to_gguf writes as rope_freqs."""
    base, scaling = rope_params(config)
    dim = config.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, np.float32)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """A plain (not llama.cpp's search-based) Q4_K quantizer: uint8 [rows, cols/256*144].

    Super-block of 256 = 8 sub-blocks of 32; w = d*sc[j]*q - dmin*m[j], q 0..15, sc/m 6-bit.
    Layout per super-block: d f16, dmin f16, scales[12] (6-bit sc and m packed as ggml's
    get_scale_k4), qs[128] (byte 32c+i: sub-block 2c value i low nibble, 2c+1 value i high).
    """
    import gguf

    rows, cols = values.shape
    assert cols % 256 == 0, "Q4_K needs columns in multiples of 256"
    x = values.astype(np.float32).reshape(-1, 8, 32)  # [n_super, sub, 32]
    lo = np.minimum(x.min(axis=-1), 0)  # the offset is subtracted, so it must be >= 0
    sub_scale = (x.max(axis=-1) - lo) / 15  # [n_super, 8]
    d = (sub_scale.max(axis=-1) / 63).astype(np.float16)
    dmin = (-lo.min(axis=-1) / 63).astype(np.float16)
    safe = lambda v: np.where(v == 0, 1, v)  # noqa: E731
    sc = np.clip(np.rint(sub_scale / safe(d.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(-lo / safe(dmin.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint((x + offset[..., None]) / safe(step)[..., None]), 0, 15).astype(np.uint8)

    scales = np.zeros((len(x), 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(x), 128)  # [n_super, 4 chunks * 32]
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qs], axis=1)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][1]
    return blocks.reshape(rows, -1)


def encode_tensor(values: np.ndarray, type_name: str) -> tuple[np.ndarray, object]:
    """(array for GGUFWriter.add_tensor, raw_dtype) for float32 `values` stored as `type_name`."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32), None
    if type_name == "F16":
        return values.astype(np.float16), None
    if type_name == "Q4_K":
        return quantize_q4_k(values), qtype
    return gguf.quants.quantize(values, qtype), qtype


def _type_for(name: str, values: np.ndarray, tensor_type: str | dict[str, str]) -> str:
    if values.ndim == 1:
        return "F32"  # as the converter: norms and biases stay F32
    if isinstance(tensor_type, str):
        return tensor_type
    for pattern, type_name in tensor_type.items():  # first matching GGUF-name pattern wins
        if fnmatch.fnmatchcase(name, pattern):
            return type_name
    return "F32"


def gguf_tensors(model, *, arch: str = "llama") -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in GGUF row order (Q/K permuted for llama), as the converter makes."""
    config = model.config
    tensors = {}
    for hf, value in model.state_dict().items():
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied checkpoints have no output tensor
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        w = value.detach().float().numpy().copy()
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_qk(w, config.num_attention_heads)
        elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, config.num_key_value_heads)
        tensors[gguf_tensor_name(hf)] = w
    return tensors


def write_tiny_gguf(
    model,
    path,
    *,
    arch: str = "llama",
    tensor_type: str | dict[str, str] = "F32",
    pre: str = "default",
    rope_freqs=None,
) -> Path:
    """Write `model` (a transformers *ForCausalLM from tiny_models) as a GGUF file at `path`.

    tensor_type: a GGUF type name (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K) for every matrix, or
      {GGUF-name pattern: type} (first match wins, unmatched matrices F32).
    rope_freqs: None writes `rope_freqs.weight` exactly when the converter would (llama3 rope
      scaling); False never writes it; an array is written as given.
    Weights are the model's own values (converted from its dtype), not a copy saved to disk.
    """
    import gguf

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be llama or qwen2, got {arch!r}")
    path = Path(path)
    config = model.config
    theta, scaling = rope_params(config)
    writer = gguf.GGUFWriter(str(path), arch)

    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_types = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }
    if isinstance(tensor_type, str):
        writer.add_file_type(file_types[tensor_type])

    _add_tokenizer(writer, config, pre)

    tensors = gguf_tensors(model, arch=arch)
    if rope_freqs is None and scaling is not None and scaling.get("rope_type") == "llama3":
        rope_freqs = llama3_rope_freqs(config)
    if rope_freqs is not None and rope_freqs is not False:
        tensors["rope_freqs.weight"] = np.asarray(rope_freqs, np.float32)
    for name, values in tensors.items():
        array, raw_dtype = encode_tensor(values, _type_for(name, values, tensor_type))
        writer.add_tensor(name, array, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, config, pre: str) -> None:
    """The tiny byte-level BPE as convert_hf_to_gguf's _set_vocab_gpt2 writes it."""
    from tiny_models import CHATML_TEMPLATE

    data = json.loads(tiny_tokenizer_json())
    vocab = dict(data["model"]["vocab"])
    special = {t["id"] for t in data["added_tokens"] if t["special"]}
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * config.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    assert None not in tokens, "the tokenizer's ids must cover the model's vocabulary"
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
