"""Multi-turn chat that keeps the conversation's KV cache between turns.

Each turn renders the whole conversation with the chat template, but the generator reuses
the cached keys and values of the longest prefix it already holds, so only the new user
message (and the template's glue) is prefilled.

Context policy: when the conversation plus the room reserved for the reply no longer fits the
context window, the oldest turns after the system prompt are dropped (a user message with its
reply at a time) until it fits; if even the latest message alone does not fit, the turn fails
with ContextOverflowError.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgellm.errors import ContextOverflowError, EdgeLLMError
from edgellm.generate.generation import Chunk


class ChatSession:
    def __init__(self, model, system: str | None = None, **defaults: Any):
        self.model = model
        self.system = system
        self.defaults = defaults  # stream() keyword arguments applied to every turn
        self.turns: list[dict[str, str]] = []  # user/assistant messages, oldest first
        self.dropped_turns = 0

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def send(self, text: str, **kwargs: Any) -> Iterator[Chunk]:
        """Stream the reply to `text`; the reply (even a cancelled, partial one) joins the history."""
        options = {**self.defaults, **kwargs}
        turn = {"role": "user", "content": text}
        self.turns.append(turn)
        try:
            prompt_ids = self._fit(options.get("max_tokens", 256))
        except EdgeLLMError:  # the template refused it, or it does not fit: the session stays as it was
            if self.turns and self.turns[-1] is turn:
                self.turns.pop()
            raise
        reply = []
        try:
            for chunk in self.model.stream(prompt_ids, **options):
                reply.append(chunk.text)
                yield chunk
        finally:
            self.turns.append({"role": "assistant", "content": "".join(reply)})

    def _fit(self, reserve: int) -> list[int]:
        context = self.model.context_length
        while True:
            ids = self.model.encode_chat(self.messages)
            if len(ids) + min(reserve, context // 2) <= context:
                return ids
            if len(self.turns) <= 1:
                self.turns.pop()
                raise ContextOverflowError(
                    f"the message needs {len(ids)} tokens with the system prompt; the context holds {context}",
                    "shorten it or raise --context",
                )
            del self.turns[:2]  # the oldest user message and its reply
            self.dropped_turns += 1

    def reset(self) -> None:
        self.turns.clear()
        self.dropped_turns = 0
