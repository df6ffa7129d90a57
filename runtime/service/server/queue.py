"""Bounded admission in front of the model, which generates one answer at a time.

A request is admitted (`submit`) only if the queue has room: at most `max_waiting` generations wait
while one runs. Otherwise it is refused at once (QueueFull: the server answers 429), and while
draining every new request is refused (Draining: 503). One worker task takes generations in arrival
order and runs each through `Model.astream`, whose steps run in a worker thread, so the event loop
stays free and the worker's progress is visible to the watchdog.

Cancelling a generation (the client went away, its timeout passed, the server is stopping) takes
effect at once for one that waits: it leaves the queue and frees its place. One that runs ends after
the step in flight (one token, or the prefill): the worker then closes the stream, which releases
the model, and starts the next. The worker itself is never cancelled mid-step: `Model.astream` must
be closed from the task that iterates it, between steps.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgellm.generate.generation import Chunk, GenerationStats

log = logging.getLogger("edgellm.service.server")

CANCEL_REASONS = ("client_disconnected", "timeout", "shutdown")


class QueueFull(Exception):
    """No room: as many generations wait as the queue holds."""


class Draining(Exception):
    """The server is stopping and takes no new work."""


class StreamingModel(Protocol):
    def astream(self, prompt: Sequence[int], **kwargs: Any) -> AsyncIterator[Chunk]: ...


_END = object()
_ids = itertools.count(1)


@dataclass(eq=False)
class Generation:
    """One admitted request: what to generate, and the chunks the worker hands back in order."""

    prompt_ids: list[int]
    options: dict[str, Any]  # Model.stream keywords: max_tokens, stop, sampling
    arrived: float = field(default_factory=time.monotonic)  # when the request came in (TTFT counts from here)
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "waiting"  # waiting -> running -> done
    cancel_reason: str | None = None
    error: BaseException | None = None
    final: Chunk | None = None  # the last chunk: finish_reason and stats
    started: float | None = None  # when the worker began it
    first_token: float | None = None
    tokens: int = 0  # chunks that carried a token: the count for a generation cut short (no final stats)
    _chunks: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    _on_cancel: Callable[[Generation], None] | None = field(default=None, repr=False)

    def cancel(self, reason: str) -> None:
        """Stop this generation (from the event loop's thread). The first reason given is kept; one that
        has produced its last chunk already is finished, whatever happens after (the log says what the
        client received)."""
        if self.state == "done" or self.cancel_reason is not None or self.final is not None:
            return
        self.cancel_reason = reason
        if self._on_cancel is not None:
            self._on_cancel(self)

    async def next_chunk(self, timeout: float | None = None) -> Chunk | None:
        """The next chunk, or None when the generation has ended (see final, error, cancel_reason).

        Raises TimeoutError if nothing arrives within `timeout` seconds."""
        item = await asyncio.wait_for(self._chunks.get(), timeout) if timeout is not None else await self._chunks.get()
        if item is _END:
            self._chunks.put_nowait(_END)  # every later call also sees the end
            return None
        return item

    @property
    def stats(self) -> GenerationStats | None:
        return self.final.stats if self.final is not None else None

    @property
    def finish_reason(self) -> str | None:
        return self.final.finish_reason if self.final is not None else None

    # -- the worker's side -----------------------------------------------------------------
    def _push(self, chunk: Chunk) -> None:
        if chunk.token_id is not None:
            self.tokens += 1
            if self.first_token is None:
                self.first_token = time.monotonic()
        if chunk.finish_reason is not None:
            self.final = chunk
        self._chunks.put_nowait(chunk)

    def _end(self) -> None:
        self.state = "done"
        self._chunks.put_nowait(_END)


class AdmissionQueue:
    """At most one generation runs and `max_waiting` wait; the rest are refused at once."""

    def __init__(
        self, model: StreamingModel, max_waiting: int, on_finished: Callable[[Generation], None] | None = None
    ):
        self.model = model
        self.max_waiting = max_waiting
        self.on_finished = on_finished  # called once per generation that ran or was cancelled
        self.waiting: collections.deque[Generation] = collections.deque()
        self.current: Generation | None = None
        self.draining = False
        self.last_progress = time.monotonic()  # the worker's last step (or when it became idle)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task | None = None

    # -- admission ------------------------------------------------------------------------
    @property
    def admitted(self) -> int:
        return len(self.waiting) + (self.current is not None)

    @property
    def full(self) -> bool:
        return self.admitted >= self.max_waiting + 1

    def submit(self, prompt_ids: Sequence[int], arrived: float | None = None, **options: Any) -> Generation:
        if self.draining:
            raise Draining()
        if self.full:
            raise QueueFull()
        generation = Generation(list(prompt_ids), options, _on_cancel=self._cancelled)
        if arrived is not None:
            generation.arrived = arrived
        self.waiting.append(generation)
        self._idle.clear()
        self._wakeup.set()
        return generation

    def _cancelled(self, generation: Generation) -> None:
        if generation.state == "waiting":  # frees its place now; the worker never sees it
            self.waiting.remove(generation)
            self._finish(generation)
            self._maybe_idle()
        # a running one is ended by the worker after the step in flight

    # -- the worker -----------------------------------------------------------------------
    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="edgellm-generation-worker")

    async def _work(self) -> None:
        while True:
            while not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            generation = self.waiting.popleft()
            self.current = generation
            try:
                await self._run(generation)
            finally:
                self.current = None
                self.last_progress = time.monotonic()
                self._maybe_idle()

    async def _run(self, generation: Generation) -> None:
        generation.state, generation.started = "running", time.monotonic()
        self.last_progress = generation.started
        chunks = self.model.astream(generation.prompt_ids, **generation.options)
        try:
            async for chunk in chunks:
                self.last_progress = time.monotonic()
                generation._push(chunk)
                if generation.cancel_reason is not None:
                    break
        except Exception as error:  # reported to the request; the worker goes on with the next
            generation.error = error
            log.error("generation %d failed: %s: %s", generation.id, type(error).__name__, error)
        finally:
            await chunks.aclose()  # closes Model.stream: the model is free again
            self._finish(generation)

    def _finish(self, generation: Generation) -> None:
        generation._end()
        if self.on_finished is not None:
            try:
                self.on_finished(generation)
            except Exception:  # metrics must never take the worker down
                log.exception("on_finished failed")

    def _maybe_idle(self) -> None:
        if self.current is None and not self.waiting:
            self._idle.set()

    # -- health and shutdown ----------------------------------------------------------------
    def alive(self, stall_limit: float) -> bool:
        """The worker is running and either idle or made a step within `stall_limit` seconds."""
        if self._worker is None or self._worker.done():
            return False
        return self.current is None or time.monotonic() - self.last_progress < stall_limit

    async def drain(self, grace: float) -> int:
        """Refuse new work, let what was admitted finish for up to `grace` seconds, then cancel the
        rest and wait for the model to be free. Returns how many generations were cancelled."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return 0
        except asyncio.TimeoutError:
            pass
        cancelled = self.cancel_all("shutdown")
        await self._idle.wait()  # the running one ends after its step in flight
        return cancelled

    def cancel_all(self, reason: str) -> int:
        """Cancel every admitted generation; returns how many there were."""
        admitted = list(self.waiting) + ([self.current] if self.current is not None else [])
        for generation in admitted:
            generation.cancel(reason)
        return len(admitted)

    async def close(self) -> None:
        """Stop the worker once it is idle (after `drain`)."""
        if self._worker is None:
            return
        await self._idle.wait()
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
