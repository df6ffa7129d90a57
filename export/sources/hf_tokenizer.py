"""The tokenizer half of a Hugging Face folder: tokenizer.json and its companion files
(tokenizer_config.json, generation_config.json, chat_template.jinja/json) -> TokenizerSpec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.export.canonical import TokenizerSpec


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a clear error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgeLLMError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})",
            "the file may be truncated; download or copy it again",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeLLMError(f"{path}: unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise EdgeLLMError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_hf_tokenizer(folder: Path, raw_config: dict[str, Any], vocab_size: int) -> tuple[TokenizerSpec, list[str]]:
    """TokenizerSpec from tokenizer.json and its companions, and notes about anything odd."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        hint = "save the fast tokenizer: AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
        raise EdgeLLMError(f"{folder}: no tokenizer.json", hint)
    text = path.read_text(encoding="utf-8")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
        raise EdgeLLMError(
            f"{path}: not a readable tokenizers file ({exc})", "the file may be truncated; download or copy it again"
        ) from None
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokenizer_vocab > vocab_size:
        raise EdgeLLMError(
            f"{path}: {tokenizer_vocab} tokens, but config.json vocab_size is {vocab_size}",
            "the tokenizer belongs to another model",
        )

    tok_config_path = folder / "tokenizer_config.json"
    tok_config = read_json(tok_config_path) if tok_config_path.is_file() else {}
    gen_config_path = folder / "generation_config.json"
    gen_config = read_json(gen_config_path) if gen_config_path.is_file() else {}
    specials = {key: _token_text(tok_config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
    specials = {key: value for key, value in specials.items() if value is not None}

    def token_id(key: str) -> int | None:
        return tokenizer.token_to_id(specials[key]) if key in specials else None

    def first(*candidates: Any) -> int | None:
        for candidate in candidates:
            ids = _ids(candidate)
            if ids:
                return ids[0]
        return None

    # The tokenizer's own special tokens first (they are what the chat template emits), then the
    # model's ids; eos is the union because generation should stop at any of them.
    bos_id = first(token_id("bos_token"), raw_config.get("bos_token_id"), gen_config.get("bos_token_id"))
    eos_ids: list[int] = []
    for candidate in (token_id("eos_token"), raw_config.get("eos_token_id"), gen_config.get("eos_token_id")):
        eos_ids += [i for i in _ids(candidate) if i not in eos_ids]
    if not eos_ids:
        raise EdgeLLMError(
            f"{folder}: no end-of-sequence token",
            "set eos_token in tokenizer_config.json or eos_token_id in config.json",
        )
    pad_id = first(token_id("pad_token"), raw_config.get("pad_token_id"), gen_config.get("pad_token_id"))
    unk_id = first(token_id("unk_token"))
    for what, ids in (("bos", [bos_id]), ("eos", eos_ids), ("pad", [pad_id]), ("unk", [unk_id])):
        for i in ids:
            if i is not None and not 0 <= i < tokenizer_vocab:
                raise EdgeLLMError(
                    f"{folder}: {what} token id {i} is outside the tokenizer's {tokenizer_vocab} tokens",
                    "the config files belong to another model",
                )

    chat_template, warnings = _chat_template(folder, tok_config, tok_config_path)
    spec = TokenizerSpec(
        tokenizer_json=text,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        unk_token_id=unk_id,
        add_bos_token=_add_bos_token(tok_config, json.loads(text), specials.get("bos_token")),
        chat_template=chat_template,
        special_tokens=specials,
    )
    return spec, warnings


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _add_bos_token(tok_config: dict[str, Any], tokenizer_doc: dict[str, Any], bos: str | None) -> bool:
    """tokenizer_config.json's add_bos_token, else whether the post-processor prepends BOS.

    Llama 3 style tokenizers have no add_bos_token flag and add BOS in tokenizer.json's
    TemplateProcessing instead; this is the rule gguf-py applies, so both sources agree.
    """
    flag = tok_config.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    processor = tokenizer_doc.get("post_processor") or {}
    for step in processor.get("processors", [processor]):
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            if len(single) > 1 and bos is not None:
                return single[0].get("SpecialToken", {}).get("id") == bos
    return False


def _chat_template(folder: Path, tok_config: dict[str, Any], tok_config_path: Path) -> tuple[str | None, list[str]]:
    # transformers >= 4.43 saves the template as chat_template.jinja and lets it override
    # tokenizer_config.json; processors once used chat_template.json.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), []
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json").get("chat_template")
    if template is None or isinstance(template, str):
        return template, []
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], []
        return None, [
            f"{tok_config_path.name}: chat templates {sorted(map(str, named))} have no "
            "'default'; no chat template is used"
        ]
    raise EdgeLLMError(
        f"{tok_config_path}: field 'chat_template' is {type(template).__name__}",
        "expected a string or a list of {name, template}",
    )
