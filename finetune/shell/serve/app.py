"""The Starlette application: OpenAI's routes, adapters added and removed at run time, auth.

Handlers decode and check a request, then hand it to the worker thread and relay its events:
as one JSON body, or as server-sent events ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from finetune.shell.serve import protocol
from finetune.shell.serve.errors import ApiError, bad_request, unknown_model
from finetune.shell.serve.protocol import AdapterRequest, ChatRequest, CompletionRequest, Reply
from finetune.shell.serve.worker import Job, Worker, load_adapter

MAX_BODY = 16 * 1024 * 1024  # bytes of a request body


def json_response(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error_response(err: ApiError) -> Response:
    return Response(err.json(), status_code=err.status, media_type="application/json")


class Adapter(msgspec.Struct, frozen=True):
    path: str
    swap: Any  # the engine's Swap
    created: int


class Served:
    """The base model's name, its adapters (published whole, under a lock) and the worker."""

    def __init__(self, base: str, worker: Worker):
        self.base = base
        self.worker = worker
        self.created = int(time.time())
        self.adapters: dict[str, Adapter] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        with self.lock:
            return [self.base, *self.adapters]

    def swap(self, model: str) -> Any:
        """The adapter layers a request for `model` runs with (None: the base), or a 404."""
        if model == self.base:
            return None
        with self.lock:
            found = self.adapters.get(model)
        if found is None:
            raise unknown_model(model, self.names())
        return found.swap

    def publish(self, name: str, path: str, swap: Any) -> None:
        with self.lock:
            protocol.check_adapter_name(name, [self.base, *self.adapters])
            self.adapters[name] = Adapter(path, swap, int(time.time()))

    def card(self, name: str) -> dict[str, Any]:
        with self.lock:
            found = self.adapters.get(name)
        if found is None:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "finetune"}
        return {"id": name, "object": "model", "created": found.created, "owned_by": "finetune",
                "root": found.path, "parent": self.base}


class Events:
    """A job's events, carried from the worker thread to this request's task."""

    def __init__(self, served: Served, job: Job):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        served.worker.submit(lambda: served.worker.generate(job, self._emit, self.cancel.is_set))

    def _emit(self, event: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            self.cancel.set()

    async def watch(self, request: Request) -> None:
        """Until the client disconnects; then cancel the job and say so."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel.set()
        self.queue.put_nowait(("gone", None))

    async def next(self) -> tuple[str, Any]:
        return await self.queue.get()


class EventStream(StreamingResponse):
    """Server-sent events; whatever ends the stream (done, error, disconnect) cancels the job."""

    def __init__(self, content: AsyncIterator[str], cancel: threading.Event):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


def sse(body: Any) -> str:
    return f"data: {msgspec.json.encode(body).decode()}\n\n"


def handled(fn: Callable[[Served, Request], Awaitable[Response]]):
    """A route whose ApiErrors become OpenAI-shaped responses."""

    async def route(request: Request) -> Response:
        try:
            return await fn(request.app.state.served, request)
        except ApiError as err:
            return error_response(err)

    return route


async def body_of(request: Request) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    return await request.body()


async def complete(served: Served, request: Request, chat: bool) -> Response:
    req = protocol.decode(await body_of(request), ChatRequest if chat else CompletionRequest)
    options = protocol.options(req)
    job = Job(chat=protocol.messages_row(req) if chat else None, prompt="" if chat else protocol.prompt_of(req),
              swap=served.swap(req.model), options=options)
    events = Events(served, job)
    watcher = asyncio.ensure_future(events.watch(request))
    streaming = False
    try:
        kind, value = await events.next()
        if kind == "error":
            raise value
        if options.stream and kind == "start":
            watcher.cancel()  # the stream listens for the disconnect itself, and cancels at its end
            streaming = True
            return EventStream(stream(events, Reply(chat, req.model), options, value), events.cancel)
        return await whole(events, Reply(chat, req.model), (kind, value))
    finally:
        watcher.cancel()
        if not streaming:  # done, failed, or cut short (the server stopping): the job ends too
            events.cancel.set()


async def whole(events: Events, reply: Reply, first: tuple[str, Any]) -> Response:
    pieces: list[str] = []
    kind, value = first
    prompt_tokens = value if kind == "start" else 0
    while kind not in ("end", "error", "gone"):
        kind, value = await events.next()
        if kind == "text":
            pieces.append(value)
    if kind == "error":
        raise value
    if kind == "gone":
        return Response(status_code=499)  # nobody reads it
    finish, count = value
    return json_response(reply.whole("".join(pieces), finish, protocol.usage(prompt_tokens, count)))


async def stream(events: Events, reply: Reply, options: protocol.Options, prompt_tokens: int) -> AsyncIterator[str]:
    try:
        if reply.chat:
            yield sse(reply.chunk(role=True))
        while True:
            kind, value = await events.next()
            if kind == "text":
                yield sse(reply.chunk(text=value))
            elif kind == "error":
                yield sse(value.body())
                break
            elif kind == "end":
                finish, count = value
                yield sse(reply.chunk(finish=finish))
                if options.include_usage:
                    yield sse(reply.usage_chunk(protocol.usage(prompt_tokens, count)))
                break
        yield "data: [DONE]\n\n"
    finally:
        events.cancel.set()


@handled
async def chat_completions(served: Served, request: Request) -> Response:
    return await complete(served, request, chat=True)


@handled
async def completions(served: Served, request: Request) -> Response:
    return await complete(served, request, chat=False)


@handled
async def models(served: Served, request: Request) -> Response:
    return json_response({"object": "list", "data": [served.card(n) for n in served.names()]})


@handled
async def model(served: Served, request: Request) -> Response:
    name = request.path_params["name"]
    if name not in served.names():
        raise unknown_model(name, served.names())
    return json_response(served.card(name))


@handled
async def add_adapter(served: Served, request: Request) -> Response:
    req = protocol.decode(await body_of(request), AdapterRequest)
    protocol.check_adapter_name(req.name, served.names())
    path = Path(req.path).expanduser()
    if not path.is_dir():
        raise bad_request(f"{req.path}: no such adapter directory (give a run directory or an adapter directory)", "path")
    directory = str(path.resolve())
    swap = await asyncio.wrap_future(served.worker.submit(lambda: load_adapter(served.worker.engine, directory)))
    served.publish(req.name, directory, swap)  # complete before anyone can pick it
    return json_response(served.card(req.name), status=201)


@handled
async def remove_adapter(served: Served, request: Request) -> Response:
    name = request.path_params["name"]
    if name == served.base:
        raise bad_request(f"{name!r} is the base model; only adapters can be removed", "name")
    with served.lock:
        gone = served.adapters.pop(name, None)
    if gone is None:
        raise unknown_model(name, served.names())
    return json_response({"id": name, "object": "model", "deleted": True})


async def health(request: Request) -> Response:
    worker = request.app.state.served.worker
    return json_response({"status": "ok", "busy": worker.busy, "queued": worker.queued(),
                          "generated_tokens": worker.generated_tokens})


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = "no such route" if exc.status_code == 404 else exc.detail
    err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {what}")
    return Response(err.json(), status_code=exc.status_code, media_type="application/json", headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))


class BearerAuth:
    """Pure ASGI: every route but /health needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' "
                               "with the key given to ft serve", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build(served: Served, api_key: str | None = None) -> Any:
    """The ASGI application: the routes, OpenAI-shaped errors, and auth when a key is set."""
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/adapters", add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", remove_adapter, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.served = served
    return BearerAuth(app, api_key) if api_key else app
