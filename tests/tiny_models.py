"""Tiny random Hugging Face models and tokenizers for tests (helpers, not a test module).

Every dimension that is a matrix input (hidden, ffn, heads * head_dim) stays a multiple of 32
so that 32-element quant blocks tile the rows. Weights are seeded, fp32, and built with eager
attention so the transformers forward is the plain math our reference reproduces.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

# Short on purpose but varied: byte-level BPE needs repeated pairs in every script it should
# merge, and the runtime's UTF-8 tests want Japanese, Chinese, emoji, math, JSON and code.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! How are you today? I am fine, thank you, and you?",
    "Small language models run on edge devices with quantized weights.",
    "The model reads the prompt, then writes one token at a time until it stops.",
    "こんにちは世界。今日はいい天気ですね。日本語のテキストも少し入れます。",
    "東京は日本の首都です。私は毎朝コーヒーを飲みます。",
    "你好世界。今天天气很好。我们在边缘设备上运行语言模型。",
    "中文文本也需要一些重复的词语：模型，设备，语言，世界。",
    "Emoji: 🙂 😀 🚀 ❤️ 👍 🎉 — and accents: café, naïve, über, señor, façade.",
    "Math: ∑ x² + ∫ f(x) dx ≤ √2 · π ≈ 3.14159, α β γ δ ∞ ≠ ±",
    '{"name": "edgellm", "version": 1, "tags": ["tiny", "test"], "ok": true}',
    "def forward(x):\n    return rms_norm(x) * weight  # shape (seq, hidden)\n",
    "for (int i = 0; i < n; i++) { out[i] = a[i] * b[i]; }",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.cache
def tiny_tokenizer_json() -> str:
    """A byte-level BPE (vocab 400) with the ChatML special tokens, as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return tokenizer.to_str()


def tiny_vocab_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tiny_tokenizer_json()).get_vocab_size()


def _torch_dtype(dtype: str):
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return dtypes[dtype]


def make_tiny_model(
    arch: str,
    *,
    tie: bool,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    hidden: int = 64,
    layers: int = 2,
    ffn: int = 128,
    seed: int = 0,
    rope_scaling: dict | None = None,
    dtype: str = "float32",
    **config_overrides,
):
    """A seeded random `*ForCausalLM` in eval mode whose vocab is the tiny tokenizer's.

    `config_overrides` go straight to the transformers config (e.g. rope_theta, sliding_window).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in config_classes:
        raise ValueError(f"arch must be one of {tuple(config_classes)}, got {arch!r}")
    fields = dict(
        vocab_size=tiny_vocab_size(),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,  # Qwen2 has no such field but its attention reads it when present
        tie_word_embeddings=tie,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # Larger than the 0.02 default so logits are decisive and greedy parity is not a coin toss.
        initializer_range=0.1,
        bos_token_id=1,  # <|im_start|>
        eos_token_id=2,  # <|im_end|>
        pad_token_id=0,  # <|endoftext|>
    )
    if rope_scaling is not None:
        fields["rope_scaling"] = dict(rope_scaling)
    if arch == "mistral":
        # The runtime does not apply sliding windows; keep the reference on full attention.
        fields["sliding_window"] = None
    fields.update(config_overrides)
    config = config_classes[arch](**fields)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # transformers initializes norms to 1 and biases to 0, which would hide a dropped or
    # misplaced norm or bias from every parity test; make them random too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.to(_torch_dtype(dtype)).eval()


def tokenizer_config() -> dict:
    return {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_tiny_model(model, folder: Path, *, shard_size: str | None = None, dtype: str = "float32") -> Path:
    """Write `model` as a Hugging Face folder (safetensors weights cast to `dtype`, tokenizer).

    `shard_size` (e.g. "20KB") splits the weights into shards with model.safetensors.index.json.
    The caller's model is left untouched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(model).to(_torch_dtype(dtype))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    saved.save_pretrained(folder, safe_serialization=True, **kwargs)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2), encoding="utf-8")
    return folder
