"""The FastAPI app: OpenAI's chat and completions routes (streaming and not), models, health, metrics.

A request is checked and tokenized, admitted to the queue (or refused at once with 429/503), and
answered from the chunks the queue's worker hands back. The answer's headers go out with its first
token, so a request that fails before generating (timeout in the queue, shutdown) still gets a
proper status code; after that, a failure ends the event stream with an OpenAI-style error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm import __version__
from edgellm.backends.memory import current_rss_bytes, peak_rss_bytes
from edgellm.bundle.manifest import read_manifest
from edgellm.errors import ContextOverflowError, EdgeLLMError, InvalidSettingError
from edgellm.generate.generation import Chunk
from edgellm.generate.sampling import Sampler, SamplingParams
from edgellm.model import Model
from edgellm.service.server.config import ServerConfig
from edgellm.service.server.metrics import CONTENT_TYPE, ServerMetrics
from edgellm.service.server.middleware import ApiKey, BodyLimit, RequestLog
from edgellm.service.server.openai_schema import (
    MAX_STOP_STRINGS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _GenerationRequest,
    error_body,
    error_responses,
)
from edgellm.service.server.queue import AdmissionQueue, Draining, Generation, QueueFull
from edgellm.settings import RuntimeSettings

log = logging.getLogger("edgellm.service.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 503, 504)


class ServerState:
    """The one model and everything shared between requests."""

    def __init__(
        self,
        bundle: str | Path,
        config: ServerConfig,
        settings: RuntimeSettings | None = None,
        model: Any = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        self.bundle = Path(bundle)
        self.config = config
        self.settings = settings or RuntimeSettings.resolve()
        self.manifest = model.manifest if model is not None else read_manifest(self.bundle)  # fails early
        # The id clients send: --model-name, else the bundle folder's name ("smollm2-135m-instruct"),
        # which reads better in a URL than the checkpoint's own name; that one is accepted too.
        self.model_name = config.model_name or self.bundle.resolve().name
        self.model_aliases = {self.model_name, self.manifest.name or self.model_name}
        self.created = int(self.bundle.joinpath("manifest.json").stat().st_mtime) if model is None else int(time.time())
        self.model = model
        self.status = "loading"  # loading -> ready -> draining; or failed
        self.fatal: BaseException | None = None
        self.on_fatal = on_fatal
        self.ready = asyncio.Event()
        self.queue: AdmissionQueue | None = None
        self.metrics = ServerMetrics()
        self._loader: asyncio.Task | None = None
        self._add_gauges()

    def _add_gauges(self) -> None:
        m = self.metrics
        m.gauge(
            "edgellm_ready",
            "1 once the model is loaded and warmed up; 0 while loading or draining.",
            lambda: float(self.status == "ready"),
        )
        m.gauge(
            "edgellm_queue_depth",
            "Requests admitted and waiting for the model.",
            lambda: len(self.queue.waiting) if self.queue else 0,
        )
        m.gauge(
            "edgellm_queue_capacity",
            "Requests that may wait while one generates (--max-queue).",
            lambda: self.config.max_queue,
        )
        m.gauge(
            "edgellm_generation_active",
            "1 while the model is generating.",
            lambda: float(self.queue is not None and self.queue.current is not None),
        )
        m.gauge("edgellm_resident_memory_bytes", "Resident set size of the server process.", current_rss_bytes)
        m.gauge("edgellm_peak_resident_memory_bytes", "Peak resident set size of the server process.", peak_rss_bytes)
        m.gauge(
            "edgellm_model_info",
            "The served model (value 1).",
            lambda: 1,
            model=self.model_name,
            backend=self.settings.backend,
            version=__version__,
        )

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="edgellm-load")

    async def _load(self) -> None:
        try:
            if self.model is None:
                started = time.perf_counter()
                self.model = await asyncio.to_thread(Model.load, self.bundle, self.settings)
                log.info(
                    "loaded %s from %s in %.2f s: backend %s, context %d tokens, memory estimate %s",
                    self.model_name,
                    self.bundle,
                    time.perf_counter() - started,
                    self.settings.backend,
                    self.model.context_length,
                    self.model.memory.describe(),
                )
            await asyncio.to_thread(warm_up, self.model)
        except asyncio.CancelledError:  # the server stopped before the model was ready
            raise
        except BaseException as error:  # EdgeLLMError, MemoryError, a broken backend: the service cannot run
            self.status, self.fatal = "failed", error
            log.error("loading %s failed: %s", self.bundle, error)
            if self.on_fatal is not None:
                self.on_fatal(error)
            if not isinstance(error, Exception):
                raise
            return
        self.queue = AdmissionQueue(self.model, self.config.max_queue, on_finished=self._count)
        self.queue.start()
        if self.status == "loading":
            self.status = "ready"
        self.ready.set()

    async def drain(self, grace: float) -> int:
        """Refuse new requests (503), give admitted ones `grace` seconds, cancel the rest."""
        self.status = "draining"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()  # the load thread runs on; nothing will use its result
        if self.queue is None:
            return 0
        cancelled = await self.queue.drain(grace)
        if cancelled:
            log.warning("grace period of %.0f s over: cancelled %d generation(s)", grace, cancelled)
        return cancelled

    async def close(self) -> None:
        """After serving: cancel what is left (serve.py has drained already), free the model."""
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.queue is not None:
            await self.queue.drain(0.001)
            await self.queue.close()
        if self.model is not None:
            self.model.close()

    def alive(self, stall_limit: float) -> bool:
        """For the watchdog: loading (bounded by TimeoutStartSec) or a worker that moves."""
        if self.status == "loading":
            return True
        return self.queue is not None and self.queue.alive(stall_limit)

    # -- per-generation accounting ------------------------------------------------------------
    def _count(self, generation: Generation) -> None:
        m = self.metrics
        if generation.cancel_reason is not None:
            m.cancelled.inc(1, generation.cancel_reason)
        if generation.error is not None:
            m.generations.inc(1, "error")
        elif generation.final is not None:
            m.generations.inc(1, generation.finish_reason)
        elif generation.cancel_reason is not None:
            m.generations.inc(1, "cancelled")  # cancelled before it started
        if generation.started is not None:
            usage = _usage(generation)
            m.prompt_tokens.inc(usage["prompt_tokens"])
            m.generated_tokens.inc(usage["completion_tokens"])
        stats = generation.stats
        if stats is not None and stats.generated_tokens >= 2 and stats.decode_tokens_per_second > 0:
            m.decode_speed.observe(stats.decode_tokens_per_second)
        if generation.first_token is not None:
            m.ttft.observe(generation.first_token - generation.arrived)


def warm_up(model: Any) -> None:
    """One tiny greedy generation, so the first request does not pay for lazy initialization, and the chat
    template rendered once (its process started), so that a broken one is reported at start."""
    prompt = model.encode("Hello") or [0]
    for _ in model.stream(prompt, max_tokens=1, temperature=0):
        pass
    if model.chat_template:
        try:
            model.encode_chat([{"role": "user", "content": "Hello"}])
        except EdgeLLMError as error:
            log.warning("the bundle's chat template fails (%s): chat requests will be answered with 400", error)


# -- requests to generation options -------------------------------------------------------------
def _sampling(body: _GenerationRequest, vocab_size: int) -> SamplingParams:
    given = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
    if body.logit_bias:
        bias = {}
        for key, value in body.logit_bias.items():
            if not re.fullmatch(r"[0-9]+", key):
                raise APIError(
                    400, f"logit_bias keys must be token ids (whole numbers >= 0), got {key!r}", param="logit_bias"
                )
            bias[int(key)] = value
        given["logit_bias"] = bias
    try:
        params = SamplingParams(**given)
        Sampler(params, vocab_size)  # checks logit_bias ids against the vocabulary
    except InvalidSettingError as error:
        named = re.search(r"sampling setting (\w+)=", error.message)
        raise APIError(400, str(error), param=named.group(1) if named else None) from None
    return params


def _options(
    body: _GenerationRequest,
    prompt_ids: list[int],
    context: int,
    vocab_size: int,
    requested_max: int | None,
    default_max: int | None,
    prompt_param: str,
) -> dict[str, Any]:
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if len(prompt_ids) >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, your prompt has "
            f"{len(prompt_ids)} tokens. Please shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = context - len(prompt_ids)
    max_tokens = requested_max if requested_max is not None else min(default_max or room, room)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is too large: this model's maximum context length is {context} "
            f"tokens and the prompt uses {len(prompt_ids)}, which leaves {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = body.stop_strings()
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return {"max_tokens": max_tokens, "stop": stop, "sampling": _sampling(body, vocab_size)}


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for item in error.errors()[:3]:
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        if item.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON: {item.get('ctx', {}).get('error', item.get('msg'))}")
            continue
        where = ".".join(location)
        param = param or where or None
        problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(problems) or "invalid request", param


# -- the app ----------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    """The ASGI app over `state`. Its lifespan loads the model in the background (GET /health says
    "loading" until then), then warms it up, then takes requests."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="edgellm",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="An OpenAI-compatible server for one small language model on an edge device.",
    )
    app.state.edgellm = state
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes)
    app.add_middleware(ApiKey, key=state.config.api_key)
    app.add_middleware(RequestLog, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        code = {413: "body_too_large"}.get(error.status_code)
        return JSONResponse(
            error_body(message, code=code), status_code=error.status_code, headers=getattr(error, "headers", None)
        )

    @app.exception_handler(EdgeLLMError)
    async def edgellm_error(request: Request, error: EdgeLLMError) -> JSONResponse:
        return JSONResponse(error_body(str(error)), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(error).__name__}", "server_error"), status_code=500)

    @app.get("/health", responses={503: {"description": "Loading, draining or failed"}})
    async def health() -> JSONResponse:
        """ready (200), or loading / draining / failed (503)."""
        body: dict[str, Any] = {"status": state.status, "model": state.model_name}
        if state.queue is not None:
            body["queue"] = {
                "waiting": len(state.queue.waiting),
                "capacity": state.config.max_queue,
                "generating": state.queue.current is not None,
            }
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "edgellm"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=error_responses(404))
    async def get_model(model_id: str) -> dict:
        _check_model_name(state, model_id)
        return model_card()

    @app.post("/v1/chat/completions", responses=GENERATION_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrived = time.monotonic()  # the deadline and time to first token count from here
        model = _ready_model(state, body.model)
        if not model.chat_template:
            raise APIError(
                400, "this model has no chat template; use /v1/completions with a raw prompt", param="messages"
            )
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        # in a thread, and the template in its own process with its own time limit, within the request's
        prompt_ids = await asyncio.to_thread(
            model.encode_chat, messages, True, _remaining(arrived + state.config.timeout)
        )
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        options = _options(body, prompt_ids, model.context_length, model.config.vocab_size, requested, None, "messages")
        return await _answer(state, request, body, prompt_ids, options, arrived, chat=True)

    @app.post("/v1/completions", responses=GENERATION_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        arrived = time.monotonic()  # the deadline and time to first token count from here
        model = _ready_model(state, body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(model.encode, prompt, body.parse_special)
        else:
            vocab = model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab - 1}]", param="prompt")
            prompt_ids = list(prompt)
        options = _options(
            body,
            prompt_ids,
            model.context_length,
            model.config.vocab_size,
            body.max_tokens,
            COMPLETIONS_DEFAULT_MAX_TOKENS,
            "prompt",
        )
        return await _answer(state, request, body, prompt_ids, options, arrived, chat=False)

    return app


def _check_model_name(state: ServerState, name: str | None) -> None:
    if name is not None and name not in state.model_aliases:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def _ready_model(state: ServerState, requested_name: str | None):
    _check_model_name(state, requested_name)
    if state.status != "ready" or state.queue is None:
        _refuse(state, "draining" if state.status == "draining" else "loading")
    if state.queue.full:  # answered before tokenizing; submit() checks again
        _refuse(state, "queue_full")
    return state.model


def _refuse(state: ServerState, reason: str):
    state.metrics.rejected.inc(1, reason)
    if reason == "queue_full":
        raise APIError(
            429,
            f"the server is busy: {state.config.max_queue} request(s) already wait for the model; retry shortly",
            "rate_limit_exceeded",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if reason == "draining":
        raise APIError(503, "the server is shutting down", "server_error", code="draining")
    raise APIError(
        503, "the model is still loading; retry shortly", "server_error", code="loading", headers={"Retry-After": "2"}
    )


async def _watch_disconnect(request: Request, generation: Generation) -> None:
    """Cancel the generation when the client goes away (the queue frees its place at once)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel("client_disconnected")
            return


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _usage(generation: Generation) -> dict:
    stats = generation.stats  # None when the generation was cut short: count what was delivered
    prompt = stats.prompt_tokens if stats else len(generation.prompt_ids)
    completion = stats.generated_tokens if stats else generation.tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0},
    }


def _failure(generation: Generation) -> APIError:
    """Why a generation ended without a normal finish, as the error its request gets."""
    if generation.cancel_reason == "timeout":
        return APIError(504, "the request timed out", "timeout", code="timeout")
    if generation.cancel_reason == "shutdown":
        return APIError(
            503, "the server is shutting down; the answer was cut short", "server_error", code="shutting_down"
        )
    if generation.cancel_reason == "client_disconnected":
        return APIError(499, "the client disconnected", "invalid_request_error", code="client_disconnected")
    error = generation.error
    if isinstance(error, (InvalidSettingError, ContextOverflowError)):
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")


def _note(request: Request, generation: Generation) -> None:
    """Figures for the request log line."""
    usage = _usage(generation)
    figures = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
    if generation.first_token is not None:
        figures["ttft"] = f"{generation.first_token - generation.arrived:.3f}s"
    figures["finish"] = (
        generation.cancel_reason or ("error" if generation.error else None) or generation.finish_reason or "none"
    )
    request.state.generation = figures


async def _answer(
    state: ServerState,
    request: Request,
    body: _GenerationRequest,
    prompt_ids: list[int],
    options: dict,
    arrived: float,
    chat: bool,
):
    try:
        generation = state.queue.submit(prompt_ids, arrived=arrived, **options)
    except QueueFull:
        _refuse(state, "queue_full")
    except Draining:
        _refuse(state, "draining")
    deadline = arrived + state.config.timeout
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, generation))
    reply = _Reply(state.model_name, chat)
    try:
        first = await asyncio.wait_for(generation.next_chunk(), _remaining(deadline))
    except asyncio.TimeoutError:
        generation.cancel("timeout")
        watcher.cancel()
        _note(request, generation)
        raise _failure(generation) from None
    except BaseException:
        generation.cancel("client_disconnected")
        watcher.cancel()
        raise
    if first is None:  # ended before any chunk: cancelled in the queue, or failed
        watcher.cancel()
        _note(request, generation)
        raise _failure(generation)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_events(generation, first, reply, deadline, include_usage, request, watcher)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    try:
        parts, chunk = [], first
        while chunk is not None:
            parts.append(chunk.text)
            chunk = await asyncio.wait_for(generation.next_chunk(), _remaining(deadline))
    except asyncio.TimeoutError:
        generation.cancel("timeout")
    finally:
        watcher.cancel()
        generation.cancel("client_disconnected")  # a no-op when it ended
        _note(request, generation)
    if generation.finish_reason not in ("stop", "length"):
        raise _failure(generation)
    return JSONResponse(reply.whole("".join(parts), generation.finish_reason, _usage(generation)))


async def _stream_events(
    generation: Generation,
    first: Chunk,
    reply: _Reply,
    deadline: float,
    include_usage: bool,
    request: Request,
    watcher: asyncio.Task,
) -> AsyncIterator[bytes]:
    """Server-sent events: the chunks, the finish reason, usage if asked, then [DONE]."""
    usage_field = {"usage": None} if include_usage else {}
    try:
        if reply.chat:
            yield reply.event(reply.delta({"role": "assistant", "content": ""}, None), usage_field)
        chunk: Chunk | None = first
        timed_out = False
        while chunk is not None:
            if chunk.text:
                yield reply.event(reply.piece(chunk.text), usage_field)
            try:
                chunk = await asyncio.wait_for(generation.next_chunk(), _remaining(deadline))
            except asyncio.TimeoutError:
                generation.cancel("timeout")
                timed_out = True
                break
        if not timed_out and generation.finish_reason in ("stop", "length"):
            yield reply.event(reply.finish(generation.finish_reason), usage_field)
            if include_usage:
                yield reply.event({**reply.envelope(), "choices": [], "usage": _usage(generation)})
        else:
            yield ("data: " + json.dumps(_failure(generation).body()) + "\n\n").encode()
        yield b"data: [DONE]\n\n"
    finally:  # also when the client went away and Starlette cancelled us
        generation.cancel("client_disconnected")
        watcher.cancel()
        _note(request, generation)


class _Reply:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, model_name: str, chat: bool):
        self.model_name, self.chat = model_name, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def envelope(self, streaming: bool = True) -> dict:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": f"edgellm-{__version__}",
        }

    def delta(self, delta: dict, finish_reason: str | None) -> dict:
        return {
            **self.envelope(),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def piece(self, text: str) -> dict:
        if self.chat:
            return self.delta({"content": text}, None)
        return {**self.envelope(), "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

    def finish(self, finish_reason: str) -> dict:
        if self.chat:
            return self.delta({}, finish_reason)
        return {
            **self.envelope(),
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}],
        }

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self.envelope(streaming=False), "choices": [choice], "usage": usage}

    @staticmethod
    def event(payload: dict, extra: dict | None = None) -> bytes:
        if extra:
            payload = {**payload, **extra}
        return ("data: " + json.dumps(payload, ensure_ascii=False) + "\n\n").encode()
