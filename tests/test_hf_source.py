"""A Hugging Face folder loads into exactly the tensors and config transformers has, or fails clearly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import CHATML_TEMPLATE, make_tiny_model, save_tiny_model, tiny_tokenizer_json

from edgellm.errors import EdgeLLMError
from edgellm.export.sources.hf import load_hf_folder

torch = pytest.importorskip("torch")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# Each family tied and untied, each saved dtype, each GQA ratio, sharding for each family.
ROUND_TRIPS = [
    # arch,    tie,  heads, kv, hidden, dtype,      shard
    ("llama", False, 4, 2, 64, "float32", None),
    ("llama", True, 4, 4, 64, "bfloat16", "30KB"),
    ("llama", False, 6, 2, 96, "bfloat16", None),
    ("qwen2", True, 6, 2, 96, "float16", None),
    ("qwen2", False, 4, 2, 64, "bfloat16", "30KB"),
    ("mistral", False, 6, 2, 96, "float16", "30KB"),
    ("mistral", True, 4, 4, 64, "float32", None),
]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """An untied fp32 llama folder that bad-input tests copy and then break."""
    return save_tiny_model(make_tiny_model("llama", tie=False), tmp_path_factory.mktemp("llama"))


@pytest.fixture
def folder(llama_folder, tmp_path) -> Path:
    return Path(shutil.copytree(llama_folder, tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def load_error(folder: Path) -> str:
    with pytest.raises(EdgeLLMError) as info:
        load_hf_folder(folder)
    return str(info.value)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch,tie,heads,kv_heads,hidden,dtype,shard", ROUND_TRIPS)
def test_loaded_tensors_and_config_equal_what_transformers_saved(
    tmp_path, arch, tie, heads, kv_heads, hidden, dtype, shard
):
    model = make_tiny_model(arch, tie=tie, heads=heads, kv_heads=kv_heads, hidden=hidden)
    folder = save_tiny_model(model, tmp_path / "model", shard_size=shard, dtype=dtype)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1

    loaded = load_hf_folder(folder)

    state = {
        name: value for name, value in model.state_dict().items() if not (tie and name == "lm_head.weight")
    }  # transformers lists the tied alias too
    assert set(loaded.tensors) == set(state)
    for name, value in state.items():
        widened = value.to(TORCH_DTYPES[dtype]).float().numpy()
        assert loaded.tensors[name].dtype == np.float32, name
        assert np.array_equal(loaded.tensors[name], widened), name

    hf, config = model.config, loaded.config
    assert config.architecture == arch
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_hidden_layers,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, kv_heads, 16)
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings is tie
    assert config.attention_bias is (arch == "qwen2")
    assert loaded.warnings == []


def test_tokenizer_spec_comes_from_tokenizer_json_and_tokenizer_config(folder):
    tokenizer = load_hf_folder(folder).tokenizer
    assert tokenizer.tokenizer_json == tiny_tokenizer_json()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.pad_token_id) == (1, [2], 0)
    assert tokenizer.add_bos_token is False
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }


def test_source_names_the_folder_and_hashes_weights_then_config(folder):
    source = load_hf_folder(folder).source
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        digest.update(path.read_bytes())
    assert source == {"format": "hf", "path": str(folder), "sha256": digest.hexdigest(), "name": "model"}


def test_eos_ids_are_the_union_of_tokenizer_config_and_generation_config(folder):
    edit_json(folder / "generation_config.json", eos_token_id=[2, 0])
    assert load_hf_folder(folder).tokenizer.eos_token_ids == [2, 0]


def test_a_list_of_named_chat_templates_yields_the_default_one(folder):
    edit_json(
        folder / "tokenizer_config.json",
        chat_template=[{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}],
    )
    assert load_hf_folder(folder).tokenizer.chat_template == "y"


def test_chat_template_jinja_overrides_tokenizer_config_as_in_transformers(folder):
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_hf_folder(folder).tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_add_bos_token_follows_the_post_processor_when_tokenizer_config_is_silent(folder):
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_str(tiny_tokenizer_json())
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]),
        ]
    )
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    edit_json(folder / "tokenizer_config.json", add_bos_token=None)
    assert load_hf_folder(folder).tokenizer.add_bos_token is True


# ----------------------------------------------------------------------------- config variants


def test_llama3_rope_scaling_is_read(tmp_path):
    model = make_tiny_model("llama", tie=True, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    config = load_hf_folder(save_tiny_model(model, tmp_path / "model")).config
    assert config.rope_scaling == LLAMA3_ROPE
    assert config.rope_theta == 500000.0


def test_a_transformers_4_config_with_rope_scaling_type_key_is_read(folder):
    legacy = {key: value for key, value in LLAMA3_ROPE.items() if key != "rope_type"}
    edit_json(
        folder / "config.json", rope_parameters=None, rope_theta=500000.0, rope_scaling={"type": "llama3", **legacy}
    )
    config = load_hf_folder(folder).config
    assert config.rope_scaling == LLAMA3_ROPE
    assert config.rope_theta == 500000.0


def test_an_unknown_rope_type_fails_naming_it_and_the_supported_one(folder):
    edit_json(folder / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    message = load_error(folder)
    assert "'yarn'" in message and "llama3" in message and "config.json" in message


def test_head_dim_and_kv_heads_default_from_heads_when_config_json_omits_them(folder):
    edit_json(folder / "config.json", head_dim=None, num_key_value_heads=None, num_attention_heads=2)
    with pytest.raises(EdgeLLMError) as info:  # 2 kv heads of 32 -> k_proj is (64, 64), not (32, 64)
        load_hf_folder(folder)
    assert "model.layers.0.self_attn.k_proj.weight" in str(info.value)
    assert "(64, 64)" in str(info.value)


def test_a_mistral_sliding_window_shorter_than_the_context_is_reported(tmp_path):
    model = make_tiny_model("mistral", tie=True)
    folder = save_tiny_model(model, tmp_path / "model")
    edit_json(folder / "config.json", sliding_window=64)
    warnings = load_hf_folder(folder).warnings
    assert len(warnings) == 1 and "sliding_window=64" in warnings[0]


def test_an_untied_config_without_lm_head_is_treated_as_tied(tmp_path):
    folder = save_tiny_model(make_tiny_model("llama", tie=True), tmp_path / "model")
    edit_json(folder / "config.json", tie_word_embeddings=False)
    loaded = load_hf_folder(folder)
    assert loaded.config.tie_word_embeddings is True
    assert "lm_head.weight" not in loaded.tensors
    assert any("lm_head.weight" in w for w in loaded.warnings)


def test_rotary_inv_freq_buffers_are_dropped(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, folder / "model.safetensors")
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in load_hf_folder(folder).tensors


# -------------------------------------------------------------------------------- bad inputs


def test_a_missing_folder_fails_naming_it(tmp_path):
    assert "no such folder" in load_error(tmp_path / "nowhere")


def test_a_folder_without_config_json_fails_naming_the_file(folder):
    (folder / "config.json").unlink()
    assert "no config.json" in load_error(folder)


def test_an_unreadable_config_json_fails_as_invalid_json(folder):
    (folder / "config.json").write_text('{"architectures": [')
    message = load_error(folder)
    assert "config.json" in message and "not valid JSON" in message


def test_an_unknown_architecture_fails_listing_the_supported_ones(folder):
    edit_json(folder / "config.json", architectures=["GPT2LMHeadModel"])
    message = load_error(folder)
    assert "'GPT2LMHeadModel'" in message
    assert all(name in message for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"))


def test_an_inconsistent_config_json_fails_naming_the_file(folder):
    edit_json(folder / "config.json", num_key_value_heads=3)
    message = load_error(folder)
    assert "config.json" in message and "num_key_value_heads (3)" in message


def test_a_tensor_whose_shape_disagrees_with_config_json_fails_naming_both_shapes(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    save_file(tensors, folder / "model.safetensors")
    message = load_error(folder)
    assert "model.safetensors" in message and "model.layers.1.self_attn.k_proj.weight" in message
    assert "(48, 64)" in message and "(32, 64)" in message and "config.json" in message


def test_a_missing_tensor_fails_naming_it(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    message = load_error(folder)
    assert "model.layers.1.mlp.up_proj.weight" in message and "missing" in message


def test_an_unexpected_tensor_fails_naming_it_and_its_file(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, folder / "model.safetensors")
    message = load_error(folder)
    assert "model.safetensors" in message and "model.layers.0.self_attn.o_proj.bias" in message


def test_a_truncated_safetensors_file_fails_saying_it_may_be_truncated(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = load_error(folder)
    assert "model.safetensors" in message and "truncated" in message


def test_a_folder_without_safetensors_fails_clearly(folder):
    (folder / "model.safetensors").unlink()
    assert "no *.safetensors" in load_error(folder)


def test_a_missing_shard_named_by_the_index_fails_naming_it(tmp_path):
    folder = save_tiny_model(make_tiny_model("qwen2", tie=True), tmp_path / "model", shard_size="30KB")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    message = load_error(folder)
    assert shard.name in message and "missing" in message


def test_a_missing_tokenizer_json_fails_naming_it(folder):
    (folder / "tokenizer.json").unlink()
    assert "no tokenizer.json" in load_error(folder)
