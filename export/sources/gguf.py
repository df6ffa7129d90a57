"""Read a GGUF file into the canonical model: config, tensors (quantized blocks kept), tokenizer.

Q4_0, Q4_1 and Q8_0 blocks are carried over losslessly as BlockQuantTensor; F32/F16/BF16 become
float32; other block types (K-quants, IQ) are dequantized by the `gguf` library and left as
float32 for the exporter to re-quantize (with a warning, since that adds error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.bundle.architectures import GGUF_ARCHITECTURES, hf_tensor_name
from edgellm.bundle.format import file_sha256
from edgellm.bundle.model_config import ModelConfig
from edgellm.errors import EdgeLLMError
from edgellm.export.canonical import CanonicalModel, expected_shapes, tensor_shape
from edgellm.export.quant.formats import from_gguf_q4_0, from_gguf_q4_1, from_gguf_q8_0
from edgellm.export.reference import FREQ_FACTORS
from edgellm.export.sources.gguf_metadata import open_gguf, read_gguf_metadata
from edgellm.export.sources.gguf_tokenizer import tokenizer_from_gguf_metadata

LOSSLESS_TYPES = {"Q4_0": from_gguf_q4_0, "Q4_1": from_gguf_q4_1, "Q8_0": from_gguf_q8_0}
FLOAT_TYPES = ("F32", "F16", "BF16")

FREQ_FACTORS_GGUF = "rope_freqs.weight"  # Llama 3.x: per-frequency divisors of RoPE's table


def hf_name(gguf_name: str) -> str | None:
    if gguf_name == FREQ_FACTORS_GGUF:
        return FREQ_FACTORS
    return hf_tensor_name(gguf_name)


def _config_from_metadata(meta: dict, path: Path, tensor_names: set[str]) -> tuple[ModelConfig, bool]:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise EdgeLLMError(
            f"{path}: GGUF architecture {arch!r} is not supported",
            f"supported GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}",
        )
    family = GGUF_ARCHITECTURES[arch]

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in meta:
            raise EdgeLLMError(f"{path}: GGUF metadata lacks {full!r}", "the file is incomplete or not a decoder model")
        return meta[full]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise EdgeLLMError(f"{path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):  # llama3 scaling arrives as the rope_freqs tensor instead
        raise EdgeLLMError(
            f"{path}: RoPE scaling {scaling!r} is not supported", "supported: none, or Llama 3's rope_freqs tensor"
        )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    config = ModelConfig(
        architecture=family.name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )
    return config, family.gguf_permuted_qk


def _rope_unpermute_index(rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's interleaved-pair Q/K rows back into rotate-half order.

    convert_hf_to_gguf wrote gguf_row = h*d + 2*i + j for hf_row = h*d + j*d/2 + i.
    """
    half = rows // n_heads // 2
    return np.arange(rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)


def _read_tensor(t, path: Path, warnings: list[str]):
    type_name = t.tensor_type.name
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if type_name in LOSSLESS_TYPES and len(shape) == 2:
        return LOSSLESS_TYPES[type_name](np.asarray(t.data).reshape(rows, -1), rows, cols)
    if type_name == "F32":
        return np.array(t.data, np.float32).reshape(shape)
    if type_name == "F16":
        return np.asarray(t.data).view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        bits = np.asarray(t.data).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).reshape(shape)
    import gguf

    try:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise EdgeLLMError(
            f"{path}: tensor {t.name} has type {type_name}, which cannot be read",
            f"supported: {', '.join(FLOAT_TYPES + tuple(LOSSLESS_TYPES))} losslessly, K-quants by re-quantizing",
        ) from None
    warnings.append(f"{t.name}: {type_name} is dequantized and re-quantized, which adds error")
    return np.asarray(values, np.float32).reshape(shape)


def load_gguf(path: Path) -> CanonicalModel:
    path = Path(path)
    reader = open_gguf(path)
    meta = read_gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config, permuted = _config_from_metadata(meta, path, names)
    warnings: list[str] = []
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            warnings.append(f"{t.name}: not used by the decoder, skipped")
            continue
        try:
            tensor = _read_tensor(t, path, warnings)
        except EdgeLLMError:
            raise
        except Exception as exc:  # memmap past the end of a truncated file, bad shapes
            raise EdgeLLMError(
                f"{path}: tensor {t.name} is unreadable ({exc})", "the file may be truncated; download or copy it again"
            ) from None
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            n_heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            index = _rope_unpermute_index(tensor_shape(tensor)[0], n_heads)
            tensor = tensor.take_rows(index) if hasattr(tensor, "take_rows") else tensor[index]
        tensors[name] = tensor
    freq_factors = tensors.get("model.rotary_emb.freq_factors")
    _check_shapes(tensors, config, path, optional={"model.rotary_emb.freq_factors"})
    if freq_factors is not None and freq_factors.shape != (config.head_dim // 2,):
        raise EdgeLLMError(f"{path}: rope_freqs has shape {freq_factors.shape}, expected ({config.head_dim // 2},)")
    tokenizer = tokenizer_from_gguf_metadata(meta)
    source = {
        "format": "gguf",
        "path": str(path),
        "sha256": file_sha256(path),
        "name": meta.get("general.name") or path.stem,
        "file_type": meta.get("general.file_type"),
    }
    return CanonicalModel(config, tensors, tokenizer, source, warnings)


def _check_shapes(tensors: dict, config: ModelConfig, path: Path, optional: set[str]) -> None:
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise EdgeLLMError(f"{path}: tensor {name} is missing", "the file is incomplete")
        if tensor_shape(tensors[name]) != shape:
            raise EdgeLLMError(
                f"{path}: tensor {name} has shape {tensor_shape(tensors[name])}, the metadata implies {shape}"
            )
    extra = set(tensors) - set(expected) - optional
    if extra:
        raise EdgeLLMError(f"{path}: unexpected tensors {sorted(extra)[:5]}")
