"""The model families edgellm runs, and the names of their tensors, declared once.

Every family here is the llama decoder block with its own deltas; the sources (GGUF, Hugging Face),
the numpy reference, the ONNX graph builder, the native engine and the manifest check all read this
registry and these names. Tensor names are the Hugging Face checkpoint's module paths (so a bundle's
tensor index, an ONNX node and a parity trace all lead back to the checkpoint); GGUF names are
llama.cpp's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str  # the bundle's name of the family (transformers' model_type)
    hf_class: str  # config.json's "architectures"
    gguf_name: str | None  # llama.cpp's general.architecture; None: no GGUF reader for the family
    gguf_permuted_qk: bool  # convert_hf_to_gguf permuted Q/K rows for llama.cpp's interleaved RoPE
    default_max_positions: int  # transformers' class default, when config.json leaves it out
    attention_bias: bool | None  # q/k/v projections carry biases: fixed by the family, or None: config.json says


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("llama", "LlamaForCausalLM", "llama", True, 2048, None),
        Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", False, 32768, True),
        Architecture("mistral", "MistralForCausalLM", None, True, 4096 * 32, False),  # sliding window not applied
    )
}
GGUF_ARCHITECTURES = {a.gguf_name: a for a in ARCHITECTURES.values() if a.gguf_name}
HF_CLASSES = {a.hf_class: a for a in ARCHITECTURES.values()}

# Module paths (a tensor is the module's ".weight" or ".bias"): the whole model's, then one layer's
# (under model.layers.N) by role, each with llama.cpp's name (under blk.N for a layer).
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens", "model.norm", "lm_head"
GLOBAL_GGUF = {EMBED: "token_embd", FINAL_NORM: "output_norm", LM_HEAD: "output"}
LAYER_MODULES = {  # role -> (Hugging Face path in the layer, GGUF name in the block)
    "attn_norm": ("input_layernorm", "attn_norm"),
    "q_proj": ("self_attn.q_proj", "attn_q"),
    "k_proj": ("self_attn.k_proj", "attn_k"),
    "v_proj": ("self_attn.v_proj", "attn_v"),
    "o_proj": ("self_attn.o_proj", "attn_output"),
    "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
    "gate_proj": ("mlp.gate_proj", "ffn_gate"),
    "up_proj": ("mlp.up_proj", "ffn_up"),
    "down_proj": ("mlp.down_proj", "ffn_down"),
}


def layer_module(layer: int, role: str) -> str:
    """ "model.layers.3.self_attn.q_proj" for (3, "q_proj")."""
    return f"model.layers.{layer}.{LAYER_MODULES[role][0]}"


def layer_weight(layer: int, role: str) -> str:
    return f"{layer_module(layer, role)}.weight"


def layer_bias(layer: int, role: str) -> str:
    return f"{layer_module(layer, role)}.bias"


def layer_role(name: str) -> str | None:
    """The role of a layer's tensor or module ("model.layers.3.self_attn.q_proj.weight" -> "q_proj"), or None."""
    parts = name.split(".", 3)
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return None
    module = parts[3].removesuffix(".weight").removesuffix(".bias")
    return next((role for role, (hf, _) in LAYER_MODULES.items() if hf == module), None)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of the decoder ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"), or None for a tensor the decoder does not use."""
    module, dot, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    for hf, gguf in GLOBAL_GGUF.items():
        if module == gguf:
            return f"{hf}.{kind}"
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        for hf, gguf in LAYER_MODULES.values():
            if parts[2] == gguf:
                return f"model.layers.{parts[1]}.{hf}.{kind}"
    return None


def gguf_tensor_name(hf_name: str) -> str:
    """The inverse of hf_tensor_name, for the decoder's tensors."""
    module, _, kind = hf_name.rpartition(".")
    if module in GLOBAL_GGUF:
        return f"{GLOBAL_GGUF[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)  # model.layers.N.<path>
    gguf = next(g for hf, g in LAYER_MODULES.values() if hf == rest)
    return f"blk.{layer}.{gguf}.{kind}"
