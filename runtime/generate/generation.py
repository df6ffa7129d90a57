"""The one decode loop, in three layers (see STYLE.md):

  generate_step  yields token ids: reuses the cached prefix, prefills the rest, samples, decodes
  stream         yields Chunks of safe text; the last one carries finish_reason and stats
  generate       joins the stream into a string

Everything that produces text (the Python API, the CLI, the HTTP service) goes through these.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from edgellm.backends.base import Backend
from edgellm.backends.memory import peak_rss_bytes
from edgellm.errors import ContextOverflowError, EdgeLLMError, InvalidSettingError
from edgellm.generate.sampling import Sampler, SamplingParams
from edgellm.generate.tokenizer import BundleTokenizer

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous request
    generated_tokens: int = 0
    load_seconds: float = 0.0
    time_to_first_token: float = 0.0  # request start -> first token sampled
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Chunk:
    text: str
    token_id: int | None  # None on a final chunk that carries no new token
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class _Run:
    """Bookkeeping shared by the layers of one generation."""

    stats: GenerationStats
    started: float = field(default_factory=time.perf_counter)
    finish_reason: str | None = None


class Generator:
    """Drives a backend for one model. One generation at a time; the KV cache persists between
    generations so a prompt that starts like the previous conversation is not prefilled again."""

    def __init__(self, backend: Backend, tokenizer: BundleTokenizer, vocab_size: int, load_seconds: float = 0.0):
        self.backend = backend
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' length (may exceed the tokenizer's vocabulary)
        self.load_seconds = load_seconds
        self.cached_ids: list[int] = []  # the tokens whose keys/values are in the backend's cache
        self._busy = threading.Lock()

    # -- layer 1 --------------------------------------------------------------------------
    def generate_step(
        self, prompt_ids: Sequence[int], sampler: Sampler, max_tokens: int, run: _Run | None = None
    ) -> Iterator[int]:
        """Sampled token ids. A token is fed back into the cache only when the next is asked for,
        so a consumer that stops after a stop token leaves the cache exactly at that point."""
        run = run or _Run(GenerationStats())
        prompt_ids = list(prompt_ids)
        context = self.backend.context_length
        if not prompt_ids:
            raise InvalidSettingError("the prompt is empty")
        if len(prompt_ids) >= context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {context}",
                "shorten the prompt or raise the context length (--context)",
            )
        reuse = self._reusable_prefix(prompt_ids)
        self.backend.truncate(reuse)
        del self.cached_ids[reuse:]
        run.stats.prompt_tokens, run.stats.cached_tokens = len(prompt_ids), reuse
        start = time.perf_counter()
        self.cached_ids = prompt_ids[:reuse]  # until the prefill succeeds
        logits = self.backend.forward(prompt_ids[reuse:])
        self.cached_ids = list(prompt_ids)
        run.stats.prefill_seconds = time.perf_counter() - start
        history = list(prompt_ids)
        decode_start = time.perf_counter()
        for produced in range(max_tokens):
            token = sampler(logits, history)
            if produced == 0:
                run.stats.time_to_first_token = time.perf_counter() - run.started
                decode_start = time.perf_counter()
            run.stats.generated_tokens = produced + 1
            yield token
            history.append(token)
            if self.backend.position + 1 > context:
                run.finish_reason = "length"
                return
            logits = self.backend.forward([token])
            self.cached_ids.append(token)
            run.stats.decode_seconds = time.perf_counter() - decode_start
        run.finish_reason = "length"

    def _reusable_prefix(self, prompt_ids: list[int]) -> int:
        limit = min(len(self.cached_ids), len(prompt_ids) - 1)  # always recompute the last prompt token
        n = 0
        while n < limit and self.cached_ids[n] == prompt_ids[n]:
            n += 1
        return n

    # -- layer 2 --------------------------------------------------------------------------
    def stream(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk]:
        """Chunks of text; the last one has finish_reason ("stop", "length", "cancelled") and stats.

        Set `cancel` (from any thread) to end the generation after the current token; closing the
        iterator also ends it and releases the model for the next request.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidSettingError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
        stop_ids = set(self.tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids)
        text = self.tokenizer.text_stream(stop)
        sampler = Sampler(sampling, self.vocab_size)
        if not self._busy.acquire(blocking=False):
            raise EdgeLLMError("this model is already generating", "finish or close the other stream first")
        run = _Run(GenerationStats(load_seconds=self.load_seconds))
        steps = self.generate_step(prompt_ids, sampler, max_tokens, run)
        try:
            for token in steps:
                if token in stop_ids:
                    run.stats.generated_tokens -= 1  # the stop token is not part of the answer
                    run.finish_reason = "stop"
                    break
                piece = text.push(token)
                if text.stopped:
                    run.finish_reason = "stop"
                    if piece:
                        yield Chunk(piece, token)
                    break
                if cancel is not None and cancel.is_set():
                    run.finish_reason = "cancelled"
                    if piece:
                        yield Chunk(piece, token)
                    break
                yield Chunk(piece, token)
            tail = "" if text.stopped else text.flush()
            yield Chunk(tail, None, run.finish_reason or "length", self._finish_stats(run))
        finally:
            steps.close()
            self._busy.release()

    def _finish_stats(self, run: _Run) -> GenerationStats:
        s = run.stats
        s.prefill_tokens_per_second = (
            (s.prompt_tokens - s.cached_tokens) / s.prefill_seconds if s.prefill_seconds else 0.0
        )
        decoded = max(s.generated_tokens - 1, 0)  # the first token comes from the prefill's logits
        s.decode_tokens_per_second = decoded / s.decode_seconds if s.decode_seconds else 0.0
        s.peak_rss_bytes = peak_rss_bytes()
        return s


def join_chunks(chunks: Iterator[Chunk]) -> tuple[str, Chunk | None]:
    """Layer 3: the whole text, and the final chunk (finish reason and stats)."""
    parts, last = [], None
    for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last
