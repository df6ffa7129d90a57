"""Chat templates rendered the way Hugging Face transformers renders them (jinja2, sandboxed), in a
child process with a time and size limit (template_sandbox.py says why and how)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from edgellm.errors import InvalidSettingError

ROLES = ("system", "user", "assistant", "tool")
RENDER_SECONDS = 2.0  # a real template renders in about a millisecond; a board is ~10x slower
STARTUP_SECONDS = 30.0  # the child's interpreter and jinja2, on a slow board with a cold page cache
MAX_PROMPT_CHARS = 1 << 22  # ~1M tokens of text: more than any context holds
_HINT = "use a raw prompt (--raw, or /v1/completions), or export the bundle from a source with a working template"


class ChatTemplateError(InvalidSettingError):
    """The template refused the conversation (raise_exception: `refused`), failed, or overran its limits."""

    def __init__(self, message: str, hint: str | None = None, refused: bool = False):
        super().__init__(message, hint)
        self.refused = refused


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


class TemplateRenderer:
    """One child process (template_sandbox.py) that renders templates, one request at a time.

    Started at once (so that its interpreter starts while the model loads), restarted after a render
    that overran: the child is killed, so a hostile template costs its time limit and nothing more."""

    def __init__(self, seconds: float = RENDER_SECONDS, max_chars: int = MAX_PROMPT_CHARS):
        self.seconds, self.max_chars = seconds, max_chars
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._start()

    def _start(self) -> None:
        # cwd "/": `python -m` puts its working directory on sys.path, and a folder named edgellm/ there
        # would shadow the package.
        self._child = subprocess.Popen(
            [sys.executable, "-m", "edgellm.generate.template_sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd="/",
            close_fds=True,
        )
        self._ready, self._buffer = False, b""

    def render(self, template: str, context: Mapping[str, Any], seconds: float | None = None) -> str:
        """The template's text for `context`, or ChatTemplateError within `seconds` (default: its limit)."""
        limit = self.seconds if seconds is None else min(seconds, self.seconds)
        if not self._lock.acquire(timeout=max(limit, 0.0)):
            raise ChatTemplateError(
                f"the chat template is busy with another conversation for longer than {limit:g} s", "retry"
            )
        try:
            if self._child is None or self._child.poll() is not None:
                self._start()
            if not self._ready:
                self._read_line(time.monotonic() + STARTUP_SECONDS, "start")
                self._ready = True
            request = json.dumps(
                {"template": template, "context": dict(context), "max_chars": self.max_chars}, ensure_ascii=False
            )
            deadline = time.monotonic() + limit
            try:
                self._child.stdin.write(request.encode("utf-8") + b"\n")
                self._child.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                raise ChatTemplateError("the chat template renderer stopped unexpectedly", _HINT) from None
            reply = self._read_line(deadline, "render")
        finally:
            self._lock.release()
        if "error" in reply:
            refused = bool(reply.get("refused"))
            raise ChatTemplateError(reply["error"], None if refused else _HINT, refused=refused)
        return reply["text"]

    def _read_line(self, deadline: float, what: str) -> dict:
        """The child's next line, or (after killing it) ChatTemplateError once `deadline` passes."""
        out = self._child.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready = select.select([out], [], [], max(remaining, 0.0))[0] if remaining > 0 else []
            if not ready:
                self._kill()
                if what == "start":
                    raise ChatTemplateError(f"the chat template renderer did not start within {STARTUP_SECONDS:g} s")
                raise ChatTemplateError(
                    f"the chat template did not finish within {self.seconds:g} s (it loops or computes too much)", _HINT
                )
            data = os.read(out, 1 << 20)
            if not data:
                self._kill()
                raise ChatTemplateError(
                    "the chat template renderer stopped unexpectedly (it ran out of memory?)", _HINT
                )
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _kill(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            for stream in (self._child.stdin, self._child.stdout):
                stream.close()
            self._child = None

    def close(self) -> None:
        with self._lock:
            self._kill()


_shared: TemplateRenderer | None = None
_shared_lock = threading.Lock()


def shared_renderer() -> TemplateRenderer:
    """One renderer for the callers that bring none (a Model has its own)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TemplateRenderer()
        return _shared


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    seconds: float | None = None,
    renderer: TemplateRenderer | None = None,
    **extra: Any,
) -> str:
    """The prompt text for `messages`, as `tokenizer.apply_chat_template(..., tokenize=False)` gives."""
    context = {
        "messages": check_messages(messages),
        "add_generation_prompt": add_generation_prompt,
        **(special_tokens or {}),
        **extra,
    }
    return (renderer or shared_renderer()).render(template, context, seconds)
