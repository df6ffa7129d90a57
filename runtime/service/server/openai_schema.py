"""The OpenAI request bodies the server accepts, and the error body it answers with.

Fields are strict (a string is not a number) so wrong types are refused the way OpenAI refuses
them. Fields edgellm does not know are accepted and ignored, as OpenAI-compatible servers do, except
those whose meaning it cannot honour (n > 1, logprobs, echo, tools, ...): those are a 400, so a
client never gets an answer to a different question than it asked.

Sampling defaults for fields a client leaves out are edgellm's (SamplingParams), not OpenAI's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An answer other than 200, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# Fields whose non-default values would change what the answer means; refused with a 400.
UNSUPPORTED = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v not in (None, ""),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


class _GenerationRequest(_Strict):
    model: str | None = Field(None, description="The served model's id (GET /v1/models); may be left out.")
    max_tokens: int | None = Field(None, description="Most tokens to generate; capped by the context.")
    temperature: float | None = Field(None, description="0 = greedy. Default 0.8.")
    top_p: float | None = Field(None, description="(0, 1]; 1 = off. Default 0.95.")
    top_k: int | None = Field(None, description="0 = off. Default 40 (an edgellm extension).")
    min_p: float | None = Field(None, description="[0, 1]; 0 = off. Default 0.05 (an edgellm extension).")
    repetition_penalty: float | None = Field(None, description="> 0; 1 = off (an edgellm extension).")
    presence_penalty: float | None = Field(None, description="[-2, 2], over the last 64 tokens.")
    frequency_penalty: float | None = Field(None, description="[-2, 2], over the last 64 tokens.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    seed: int | None = Field(None, description=">= 0: same seed, settings and prompt give the same tokens.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} stop strings.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        """JSON can spell lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
        pending = [data]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("text must be valid Unicode; it holds an unpaired surrogate") from None
            elif isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
        return data

    @model_validator(mode="after")
    def _refuse_what_cannot_be_honoured(self) -> _GenerationRequest:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and UNSUPPORTED[name](value):
                raise ValueError(f"{name}={value!r} is not supported by this server")
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, description="The newer name of max_tokens.")


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] = Field(..., description="Text, or token ids; one prompt.")
    parse_special: bool = Field(
        False,
        description="Text in the prompt that spells a control token (<|im_start|>) "
        "becomes that token; off, it is plain text (an edgellm extension, "
        "named as in llama.cpp).",
    )


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route may answer with."""
    described = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        429: "Queue full",
        503: "Loading or draining",
        504: "Timed out",
    }
    return {
        status: {"description": described[status], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for status in statuses
    }
