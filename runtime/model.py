"""`edgellm.load(bundle)`: a loaded model with the streaming API on top of the one decode loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.backends.memory import MemoryEstimate, check_budget
from edgellm.backends.registry import create_backend, run_context
from edgellm.bundle.format import WEIGHTS_FILE
from edgellm.bundle.manifest import Manifest, read_manifest
from edgellm.errors import ContextOverflowError, EdgeLLMError
from edgellm.generate.chat import ChatSession
from edgellm.generate.chat_template import TemplateRenderer, check_messages, render_chat
from edgellm.generate.generation import Chunk, Generator, join_chunks
from edgellm.generate.sampling import SamplingParams
from edgellm.generate.tokenizer import BundleTokenizer
from edgellm.settings import RuntimeSettings

if TYPE_CHECKING:
    from edgellm.generate.chat import ChatSession


class Model:
    """A bundle loaded on a backend. Facts come from the manifest, policy from `settings`."""

    def __init__(self, manifest: Manifest, settings: RuntimeSettings):
        started = time.perf_counter()
        self.bundle = manifest.bundle
        self.manifest = manifest
        self.settings = settings
        self.config = manifest.config
        self.context_length = run_context(manifest, settings)
        if self.context_length > self.config.max_position_embeddings:
            raise ContextOverflowError(
                f"a context of {self.context_length} tokens is longer than the model was "
                f"trained for ({self.config.max_position_embeddings})",
                f"use --context {self.config.max_position_embeddings} or less",
            )
        self.memory: MemoryEstimate = check_budget(
            manifest, settings.backend, self.context_length, settings.prefill_chunk, settings.max_memory
        )
        if settings.verify_weights:
            self.verify_weights()
        self.tokenizer = BundleTokenizer.of(manifest)
        self.backend = create_backend(manifest, settings, self.context_length)
        self.chat_template: str | None = manifest.chat_template
        # its own process, started now so that it is ready when the first chat arrives
        self.template_renderer = TemplateRenderer() if self.chat_template else None
        self.load_seconds = time.perf_counter() - started
        self.generator = Generator(self.backend, self.tokenizer, self.config.vocab_size, self.load_seconds)

    @classmethod
    def load(cls, bundle: str | Path, settings: RuntimeSettings | None = None, **overrides: Any) -> Model:
        """Open a bundle folder. `overrides` are RuntimeSettings fields (threads=, context_length=, ...)."""
        settings = settings or RuntimeSettings.resolve(**overrides)
        return cls(read_manifest(bundle), settings)

    # -- integrity ----------------------------------------------------------------------------
    def verify_weights(self) -> None:
        """Hash weights.bin against the manifest (a tampered or damaged file fails here)."""
        self.manifest.verify_file(WEIGHTS_FILE)

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Ids of a raw prompt; text that spells a control token is text unless `parse_special`."""
        return self.tokenizer.encode(text, parse_special=parse_special)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, seconds: float | None = None
    ) -> str:
        """The conversation as the chat template writes it (ChatTemplateError past its time limit)."""
        if self.template_renderer is None:
            raise EdgeLLMError("this bundle has no chat template", "use a raw prompt (--raw) instead")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.tokenizer.special_tokens,
            seconds=seconds,
            renderer=self.template_renderer,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, seconds: float | None = None
    ) -> list[int]:
        """Ids of the rendered conversation. The template's markers are control tokens; a message's text
        is text, even where it spells one ("<|im_end|><|im_start|>system..." cannot open a system turn)."""
        return self.tokenizer.encode_chat(
            check_messages(messages), lambda marked: self.render_chat(marked, add_generation_prompt, seconds)
        )

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    # -- the streaming API ----------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        sampling: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        stop_token_ids: Sequence[int] | None = None,
        **sampling_overrides: Any,
    ) -> Iterator[Chunk]:
        """Stream the continuation of a raw prompt (text or token ids).

        `stop` strings end the answer and are never shown; generation also ends at the manifest's
        end-of-sequence ids unless `stop_token_ids` replaces them (() = never stop early).
        `sampling_overrides` are SamplingParams fields (temperature=0, top_k=..., seed=...)."""
        params = (
            (sampling or SamplingParams()).with_overrides(**sampling_overrides)
            if sampling_overrides
            else (sampling or SamplingParams())
        )
        if isinstance(stop, str):
            stop = [stop]
        return self.generator.stream(self._prompt_ids(prompt), params, max_tokens, stop, stop_token_ids, cancel)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        text, _ = join_chunks(self.stream(prompt, **kwargs))
        return text

    def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Iterator[Chunk]:
        """Stream the assistant's reply to a conversation rendered with the bundle's chat template."""
        return self.stream(self.encode_chat(messages), **kwargs)

    async def astream(self, prompt: str | Sequence[int], **kwargs: Any) -> AsyncIterator[Chunk]:
        """`stream` for asyncio servers: each step runs in a worker thread, the event loop stays free.
        Cancelling the consuming task cancels the generation and releases the model."""
        cancel = threading.Event()
        chunks = self.stream(prompt, cancel=cancel, **kwargs)
        done = object()
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, done)
                if chunk is done:
                    return
                yield chunk
        finally:
            cancel.set()
            await asyncio.to_thread(chunks.close)

    def chat_session(self, system: str | None = None, **defaults: Any) -> ChatSession:
        return ChatSession(self, system, **defaults)

    def close(self) -> None:
        self.backend.close()
        if self.template_renderer is not None:
            self.template_renderer.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load(bundle: str | Path, settings: RuntimeSettings | None = None, **overrides: Any) -> Model:
    return Model.load(bundle, settings, **overrides)
