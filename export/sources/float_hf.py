"""A GGUF dequantized to fp32 and written as a Hugging Face folder: what onnxruntime-genai's model builder
reads (the bench's peer), and the float twin the tests export to check the HF path against the GGUF path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from edgellm.bundle.architectures import ARCHITECTURES
from edgellm.export.canonical import as_float
from edgellm.export.sources.gguf import load_gguf


def write_float_hf_folder(gguf: Path, folder: Path) -> Path:
    """Write `gguf` dequantized to fp32 into a new folder, the way transformers saves a model."""
    model = load_gguf(gguf)
    folder.mkdir(parents=True)
    save_file(
        {name: np.ascontiguousarray(as_float(t)) for name, t in model.tensors.items()},
        str(folder / "model.safetensors"),
    )
    c, tokenizer = model.config, model.tokenizer
    config = {
        "architectures": [ARCHITECTURES[c.architecture].hf_class],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_ids[0],
    }
    if c.rope_scaling:
        config["rope_scaling"] = dict(c.rope_scaling)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(tokenizer.tokenizer_json)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": tokenizer.chat_template, "add_bos_token": False, **tokenizer.special_tokens})
    )
    return folder
