"""Chat templates rendered the way Hugging Face transformers renders them (jinja2, sandboxed)."""

from __future__ import annotations

import datetime as _dt
import json
from functools import lru_cache
from typing import Any, Mapping, Sequence

from .errors import EdgeLLMError, InvalidSettingError

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(EdgeLLMError):
    """The template refused the conversation (raise_exception) or failed to render."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the bundle's chat template does not compile: {exc}") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidSettingError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidSettingError(f"messages[{i}] must have 'role' and 'content'")
        if message["role"] not in ROLES:
            raise InvalidSettingError(f"messages[{i}].role is {message['role']!r}", f"use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise InvalidSettingError(f"messages[{i}].content must be text")
        checked.append(dict(message))
    return checked


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str] | None = None, **extra: Any) -> str:
    """The prompt text for `messages`, as `tokenizer.apply_chat_template(..., tokenize=False)` gives."""
    compiled = _compile(template)
    context = {"messages": check_messages(messages), "add_generation_prompt": add_generation_prompt,
               **(special_tokens or {}), **extra}
    try:
        return compiled.render(**context)
    except ChatTemplateError:
        raise
    except Exception as exc:  # jinja2 runtime errors: undefined names, type errors in the template
        raise ChatTemplateError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from None
