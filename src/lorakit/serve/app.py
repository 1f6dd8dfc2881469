"""The HTTP side of `lorakit serve`: a FastAPI app with OpenAI's routes as vLLM serves them, on top of the
continuous-batching Engine and the AdapterRegistry.

    GET  /v1/models                 the base model and every registered adapter
    POST /v1/completions            prompt -> text; stream: true as server-sent events ending "data: [DONE]"
    POST /v1/chat/completions       messages through the tokenizer's chat template -> assistant message
    POST /v1/load_lora_adapter      {"lora_name", "lora_path", "description"?, "examples"?} (vLLM's payload)
    POST /v1/unload_lora_adapter    {"lora_name"}
    GET  /health                    200 while serving (never needs the API key)
    GET  /metrics                   Prometheus text (metrics.py)

Every refusal is OpenAI's error object {"error": {"message", "type", "param", "code"}} with a 4xx status. The
event loop never waits on the model: tokenising, routing and registry changes run in worker threads, and tokens
arrive from the engine thread through SequenceHandle.aevents(). A client that goes away (mid-stream or while
waiting for a whole response) cancels its sequences, so their batch slots are freed at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ..errors import LorakitError
from ..generation import build_prompt
from . import openai_api as api
from .metrics import CONTENT_TYPE, ServeMetrics
from .params import ServeError

if TYPE_CHECKING:
    from .engine import Engine, SequenceHandle, TokenEvent
    from .registry import AdapterRegistry, Target

log = logging.getLogger("lorakit.serve")


def prompt_ids(tokenizer: Any, request: api.GenerateRequest) -> list[int]:
    """The prompt's token ids: a completion prompt exactly as `lorakit generate` tokenises it (build_prompt), a
    chat through the tokenizer's template with the generation prompt (as `lorakit generate --chat`).

    Raises:
        ServeError: 400 for a chat with a tokenizer that has no template, messages its template refuses, or a
            prompt of no tokens.
    """
    if request.prompt is not None:
        ids = build_prompt(tokenizer, request.prompt, chat=False)["input_ids"][0].tolist()
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ServeError(400, "this model's tokenizer has no chat template; use /v1/completions",
                             param="messages")
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                                 tokenize=False)
        except TemplateError as err:  # a template's raise_exception, e.g. "roles must alternate"
            raise ServeError(400, f"the chat template refused these messages: {err}", param="messages") from err
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ServeError(400, "the prompt has no tokens", param="prompt")
    return list(ids)


def error_response(err: ServeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class EventStream(StreamingResponse):
    """text/event-stream whose `on_close` runs however the response ends (done, client gone, server exit)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def cancel_all(handles: Sequence[SequenceHandle]) -> None:
    """Cancel every sequence of a request (a finished one ignores it): their slots free at the next step."""
    for handle in handles:
        handle.cancel()


async def merged_events(handles: Sequence[SequenceHandle]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, TokenEvent) from all of a request's sequences as they arrive, until each has finished."""
    if len(handles) == 1:
        async for event in handles[0].aevents():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, handle: SequenceHandle) -> None:
        try:
            async for event in handle.aevents():
                queue.put_nowait((index, event, None))
            queue.put_nowait((index, None, None))
        except Exception as err:  # handed to the consumer, which raises it in the request's task
            queue.put_nowait((index, None, err))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        open_ = len(handles)
        while open_:
            index, item, err = await queue.get()
            if err is not None:
                raise err
            if item is None:
                open_ -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def check_event(event: TokenEvent) -> None:
    """Raises: ServeError: for a sequence the engine ended with an error: 404 when its adapter was unloaded after the
    request was resolved (the model no longer exists), else 500 (server_error: an adapter file broken since it was
    registered, a failed forward; the request was valid, the server failed it)."""
    if event.finished and event.finish_reason == "error":
        if event.status == 404:
            raise ServeError(404, f"{event.error}", param="model", code="model_not_found")
        raise ServeError(500, f"generation failed: {event.error}", type="server_error")


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (ASGI "http.disconnect"; the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Service:
    """What the routes share: the engine, the registry, the tokenizer, the metrics and the limits."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, tokenizer: Any, max_n: int, base_name: str) -> None:
        self.engine, self.registry, self.tokenizer = engine, registry, tokenizer
        self.max_n, self.base_name = max_n, base_name
        self.created = int(time.time())
        self.metrics = ServeMetrics(engine, registry)

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the base (root: its name, no parent) and each adapter (parent: the base), as vLLM."""
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "lorakit", "root": name,
                    "parent": parent}
        return {"object": "list",
                "data": [card(self.base_name, None)] + [card(n, self.base_name) for n in self.registry.names()]}

    def submit(self, ids: list[int], target: Target, request: api.GenerateRequest) -> list[SequenceHandle]:
        """One sequence per choice (choice i samples with seed + i); all or none are submitted.

        Raises:
            ServeError: what Engine.submit raises (prompt + max_tokens beyond the context, shutting down).
        """
        handles: list[SequenceHandle] = []
        try:
            for i in range(request.n):
                seed = None if request.params.seed is None else request.params.seed + i
                handles.append(self.engine.submit(ids, target, dataclasses.replace(request.params, seed=seed)))
        except BaseException:
            cancel_all(handles)
            raise
        return handles

    async def generate(self, http: Request, request: api.GenerateRequest, chat: bool) -> Response:
        """Route, tokenise, submit, then answer with one JSON object or a stream of events."""
        start = time.perf_counter()
        target = await run_in_threadpool(self.registry.resolve, request.model, request.route_text)
        ids = await run_in_threadpool(prompt_ids, self.tokenizer, request)
        handles = self.submit(ids, target, request)
        self.metrics.requests.inc(model=target.served)
        reply = Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), target.served,
                      chat, len(ids), handles, start, self.metrics)
        if request.stream:
            return EventStream(reply.stream(request.include_usage), on_close=lambda: cancel_all(handles))
        work = asyncio.ensure_future(reply.collect())
        gone = asyncio.ensure_future(wait_disconnect(http.receive))
        left = True
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            left = not work.done()
        finally:
            gone.cancel()
            if left:  # the client went away (or this task was cancelled): free the slots
                work.cancel()
                cancel_all(handles)
        if left:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        return JSONResponse(work.result())


class Reply:
    """The answer to one generation request: its id, model, choices' text and counts, built from the events."""

    def __init__(self, rid: str, created: int, served: str, chat: bool, prompt_tokens: int,
                 handles: list[SequenceHandle], start: float, metrics: ServeMetrics) -> None:
        self.rid, self.created, self.served, self.chat = rid, created, served, chat
        self.prompt_tokens, self.handles, self.start, self.metrics = prompt_tokens, handles, start, metrics
        self.first_token_seen = False

    def _observe(self, event: TokenEvent) -> None:
        if not self.first_token_seen and event.token_id is not None:
            self.first_token_seen = True
            self.metrics.latency.observe(time.perf_counter() - self.start, phase="first_token")

    def _done(self) -> int:
        """Record the total latency; return the completion tokens of all choices."""
        self.metrics.latency.observe(time.perf_counter() - self.start, phase="total")
        return sum(h.result.completion_tokens for h in self.handles if h.result is not None)

    async def collect(self) -> dict[str, Any]:
        """The whole response object once every choice has finished."""
        texts: list[list[str]] = [[] for _ in self.handles]
        reasons: list[str | None] = [None] * len(self.handles)
        async for index, event in merged_events(self.handles):
            self._observe(event)
            check_event(event)
            texts[index].append(event.text)
            if event.finished:
                reasons[index] = event.finish_reason
        choices = [("".join(t), r) for t, r in zip(texts, reasons)]
        build = api.chat_response if self.chat else api.completion_response
        return build(self.rid, self.created, self.served, choices, self.prompt_tokens, self._done())

    def _chunk(self, index: int, text: str | None, finish_reason: str | None) -> bytes:
        if not self.chat:
            return api.sse(api.completion_chunk(self.rid, self.created, self.served, index, text or "",
                                                finish_reason))
        delta = {} if text is None else {"content": text}
        return api.sse(api.chat_chunk(self.rid, self.created, self.served, index, delta, finish_reason))

    async def stream(self, include_usage: bool) -> AsyncIterator[bytes]:
        """Server-sent events: (chat: a {"role"} delta per choice,) text pieces, a finish_reason per choice,
        (the usage chunk,) "data: [DONE]". An error after the first event is sent as an error event."""
        try:
            if self.chat:
                for index in range(len(self.handles)):
                    yield api.sse(api.chat_chunk(self.rid, self.created, self.served, index,
                                                 {"role": "assistant", "content": ""}, None))
            async for index, event in merged_events(self.handles):
                self._observe(event)
                check_event(event)
                if event.finished:
                    if self.chat and event.text:
                        yield self._chunk(index, event.text, None)
                    yield self._chunk(index, None if self.chat else event.text, event.finish_reason)
                elif event.text:
                    yield self._chunk(index, event.text, None)
            completion_tokens = self._done()
            if include_usage:
                yield api.sse(api.usage_chunk(self.rid, self.created, self.served, self.chat, self.prompt_tokens,
                                              completion_tokens))
        except ServeError as err:
            self.metrics.errors.inc(status=str(err.status))
            yield api.sse(err.body())
        except Exception as err:  # the status line is sent already: say so in the stream, keep the traceback
            log.exception("stream %s failed", self.rid)
            self.metrics.errors.inc(status="500")
            yield api.sse(ServeError(500, f"internal error: {type(err).__name__}", type="server_error").body())
        yield api.sse("[DONE]")


def install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error as OpenAI's error object: ServeError with its status, a route or method that does not exist
    (404 / 405), a LorakitError (a bad file or value: 400); anything else is a bug: 500 in the same shape."""

    async def serve_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, ServeError)
        metrics.errors.inc(status=str(err.status))
        return error_response(err)

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, StarletteHTTPException)
        code = "not_found" if err.status_code == 404 else None
        return await serve_error(request, ServeError(err.status_code, f"{request.method} {request.url.path}: "
                                                     f"{err.detail}", code=code))

    async def validation_error(request: Request, err: Exception) -> Response:
        return await serve_error(request, ServeError(400, f"invalid request: {err}"))

    async def lorakit_error(request: Request, err: Exception) -> Response:
        return await serve_error(request, ServeError(400, str(err)))

    async def unexpected(request: Request, err: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return await serve_error(request, ServeError(500, f"internal error: {type(err).__name__}: {err}",
                                                     type="server_error"))

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(LorakitError, lorakit_error)
    app.add_exception_handler(Exception, unexpected)


def bearer_check(api_key: str) -> Callable[[Request], Any]:
    """A dependency refusing (401) a request without "Authorization: Bearer <api_key>" (constant-time compare)."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ServeError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
    return check


def create_app(engine: Engine, registry: AdapterRegistry, tokenizer: Any, *, api_key: str | None = None, max_n: int = 8,
               base_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) and `registry`.

    Args:
        engine: a started lorakit.serve.Engine (submit, stats).
        registry: the lorakit.serve.AdapterRegistry the engine uses (resolve, register, unregister, names, stats).
        tokenizer: the model's tokenizer (prompts are tokenised here, as `lorakit generate` does).
        api_key: when given, every route but /health requires "Authorization: Bearer <api_key>".
        max_n: the largest `n` (choices per request) accepted.
        base_name: the served name of the base model (default: the registry's).

    Raises:
        ValueError: max_n < 1 or an empty api_key.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (give None for no key)")
    service = Service(engine, registry, tokenizer, max_n, base_name or registry.base_name)
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    install_error_handlers(app, service.metrics)
    router = APIRouter(dependencies=[Depends(bearer_check(api_key))] if api_key else [])

    async def body(request: Request) -> dict[str, Any]:
        return api.parse_json(await request.body())

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.generate(request, api.parse_completion(await body(request), service.max_n), False)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.generate(request, api.parse_chat(await body(request), service.max_n), True)

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        name, path, description, examples = api.parse_load(await body(request))
        await run_in_threadpool(registry.register, name, path, description=description, examples=examples)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        name = api.parse_unload(await body(request))
        await run_in_threadpool(registry.unregister, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @router.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Response:
        return PlainTextResponse("ok")

    app.include_router(router)
    return app


__all__ = ["create_app", "prompt_ids"]
