"""A local fake of OpenAI's Responses API in background mode, served by real uvicorn.

It speaks the documented wire format of exactly the endpoints the adapter uses:

* ``POST /v1/responses`` with ``background: true`` (and ``stream: true``: an SSE stream of
  ``event: <type>`` / ``data: <json with "type" and "sequence_number">``). The response runs in
  the server's task group, so it goes on when the client disconnects.
* ``GET /v1/responses/{id}?stream=true&starting_after=N``: the events after ``N`` (all of them
  without ``N``), then live ones until the response ends; a finished response replays the rest.
  Only a response created with ``stream: true`` can be streamed again, as OpenAI documents.
* ``GET /v1/responses/{id}``: the response object.
* ``POST /v1/responses/{id}/cancel``: cancels a queued or running response; cancelling a
  cancelled one returns it again (idempotent); a finished one answers 400 ("Cannot cancel a
  completed response."), an unknown one 404 — what the real API answers.

The fake model streams ``Echo: <input>.`` and then ``tokens`` deltas, ``delay`` seconds apart.
``httpx.ASGITransport`` buffers whole bodies, so streaming needs a real server: :func:`serve`
runs uvicorn in a thread on a socket bound to a free loopback port.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TERMINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})


@dataclass
class FakeModel:
    """How the fake model behaves; one per server.

    ``fail_after`` / ``error_after`` / ``incomplete_after``: after that many text deltas the
    response ends with ``response.failed`` / an ``error`` event / ``response.incomplete``.
    ``cancel_event``: a cancel emits ``response.cancelled`` (else the streams just end).
    ``drop_after``: the create request's stream is cut after that many events (a dropped
    connection); the response goes on. ``output_text``: what the finished response reports
    as its output instead of the streamed text (to test the adapter's check).
    ``create_status``: every create answers this HTTP status (and creates nothing).
    ``fail_prompt``: a response to exactly this input fails after two deltas.
    """

    tokens: int = 6
    delay: float = 0.0
    fail_after: int | None = None
    error_after: int | None = None
    incomplete_after: int | None = None
    cancel_event: bool = True
    drop_after: int | None = None
    output_text: str | None = None
    create_status: int | None = None
    fail_prompt: str = "please fail"

    def deltas(self, prompt: str) -> list[str]:
        return [f"Echo: {prompt}.", *(f" t{i}" for i in range(self.tokens))]


@dataclass
class FakeResponse:
    id: str
    model: str
    prompt: str
    body: dict[str, Any]
    status: str = "queued"
    text: str = ""
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    events: list[bytes] = field(default_factory=list)
    created_at: int = field(default_factory=lambda: int(time.time()))
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    changed: anyio.Event = field(default_factory=anyio.Event)
    output_override: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def snapshot(self) -> dict[str, Any]:
        text = self.text if self.output_override is None else self.output_override
        content = [{"type": "output_text", "text": text, "annotations": []}]
        output = (
            []
            if not self.text
            else [
                {
                    "id": f"msg_{self.id}",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed" if self.status == "completed" else "in_progress",
                    "content": content,
                }
            ]
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": True,
            "model": self.model,
            "instructions": self.body.get("instructions"),
            "metadata": self.body.get("metadata") or {},
            "output": output,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }

    def emit(self, event_type: str, **fields: Any) -> None:
        event = {"type": event_type, "sequence_number": len(self.events), **fields}
        self.events.append(f"event: {event_type}\ndata: {json.dumps(event)}\n\n".encode())
        self.wake()

    def wake(self) -> None:
        # Every follower waits on the Event it saw before this change.
        changed, self.changed = self.changed, anyio.Event()
        changed.set()


class FakeOpenAI:
    """The fake API's state and ASGI app. ``created`` counts responses created.

    ``model`` is read when a response is created, so a test may replace it before that.
    """

    def __init__(self, model: FakeModel | None = None) -> None:
        self.model = model or FakeModel()
        self.responses: dict[str, FakeResponse] = {}
        self.created = 0
        self.create_requests = 0
        self.cancels = 0
        self._ids = itertools.count(1)
        self._tasks: TaskGroup | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/responses", self._create, methods=["POST"]),
                Route("/v1/responses/{id}", self._retrieve, methods=["GET"]),
                Route("/v1/responses/{id}/cancel", self._cancel, methods=["POST"]),
            ],
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            yield
            tasks.cancel_scope.cancel()

    # -- endpoints -------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        if denied := _unauthorized(request):
            return denied
        self.create_requests += 1
        if self.model.create_status is not None:
            return _error(self.model.create_status, "The fake was told to refuse.")
        body = await request.json()
        if not isinstance(body.get("model"), str):
            return _error(400, "Missing required parameter: 'model'.", param="model")
        if body.get("background") is not True:
            return _error(400, "This fake only models background mode.", param="background")
        assert self._tasks is not None
        prompt = _prompt_of(body.get("input"))
        run = FakeResponse(
            id=f"resp_{next(self._ids):04d}", model=body["model"], prompt=prompt, body=body
        )
        run.output_override = self.model.output_text
        self.responses[run.id] = run
        self.created += 1
        self._tasks.start_soon(self._generate, run, self.model)
        if body.get("stream") is not True:
            return JSONResponse(run.snapshot())
        return _sse(self._follow(run, after=-1, limit=self.model.drop_after))

    async def _retrieve(self, request: Request) -> Response:
        if denied := _unauthorized(request):
            return denied
        run = self.responses.get(request.path_params["id"])
        if run is None:
            return _not_found(request.path_params["id"])
        if request.query_params.get("stream") != "true":
            return JSONResponse(run.snapshot())
        if run.body.get("stream") is not True:
            return _error(400, "This response was not created with stream=true.", param="stream")
        raw = request.query_params.get("starting_after", "-1")
        try:
            after = int(raw)
        except ValueError:
            return _error(400, f"Invalid 'starting_after': {raw!r}.", param="starting_after")
        return _sse(self._follow(run, after=after))

    async def _cancel(self, request: Request) -> Response:
        if denied := _unauthorized(request):
            return denied
        self.cancels += 1
        run = self.responses.get(request.path_params["id"])
        if run is None:
            return _not_found(request.path_params["id"])
        if run.status == "cancelled":
            return JSONResponse(run.snapshot())
        if run.finished:
            return _error(400, f"Cannot cancel a {run.status} response.")
        run.scope.cancel()
        run.status = "cancelled"
        if self.model.cancel_event:
            run.emit("response.cancelled", response=run.snapshot())
        else:
            run.wake()  # the streams end without a terminal event
        return JSONResponse(run.snapshot())

    # -- the fake model --------------------------------------------------------------------

    async def _generate(self, run: FakeResponse, model: FakeModel) -> None:
        item_id = f"msg_{run.id}"
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        with run.scope:
            run.emit("response.created", response=run.snapshot())
            await anyio.sleep(model.delay)
            run.status = "in_progress"
            run.emit("response.in_progress", response=run.snapshot())
            item = {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            run.emit("response.output_item.added", output_index=0, item=item)
            run.emit("response.content_part.added", part=part, **where)
            fail_after = 2 if run.prompt == model.fail_prompt else model.fail_after
            for count, delta in enumerate(model.deltas(run.prompt)):
                if count == fail_after:
                    run.status = "failed"
                    run.error = {"code": "server_error", "message": "The model broke."}
                    run.emit("response.failed", response=run.snapshot())
                    return
                if count == model.error_after:
                    run.status = "failed"
                    run.error = {"code": "rate_limit_exceeded", "message": "Slow down."}
                    run.emit("error", code="rate_limit_exceeded", message="Slow down.", param=None)
                    return
                if count == model.incomplete_after:
                    run.status = "incomplete"
                    run.incomplete_details = {"reason": "max_output_tokens"}
                    run.emit("response.incomplete", response=run.snapshot())
                    return
                await anyio.sleep(model.delay)
                run.text += delta
                run.emit("response.output_text.delta", delta=delta, logprobs=[], **where)
            run.emit("response.output_text.done", text=run.text, logprobs=[], **where)
            run.emit("response.content_part.done", part={**part, "text": run.text}, **where)
            item = {**item, "status": "completed", "content": [{**part, "text": run.text}]}
            run.emit("response.output_item.done", output_index=0, item=item)
            run.status = "completed"
            run.emit("response.completed", response=run.snapshot())

    async def _follow(
        self, run: FakeResponse, *, after: int, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        index, sent = max(after + 1, 0), 0
        while True:
            while index < len(run.events):
                yield run.events[index]
                index += 1
                sent += 1
                if limit is not None and sent >= limit:
                    return  # the connection "drops"; the response goes on
            if run.finished:
                return
            await run.changed.wait()


def _prompt_of(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        content = value[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _error(status: int, message: str, *, param: str | None = None) -> JSONResponse:
    body = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return JSONResponse({"error": body}, status_code=status)


def _not_found(response_id: str) -> JSONResponse:
    return _error(404, f"Response with id '{response_id}' not found.")


def _unauthorized(request: Request) -> JSONResponse | None:
    if request.headers.get("authorization", "").startswith("Bearer "):
        return None
    return _error(401, "You didn't provide an API key.")


@contextmanager
def serve(fake: FakeOpenAI, *, start_timeout: float = 10.0) -> Iterator[str]:
    """Run ``fake`` under uvicorn in a thread; yield its ``…/v1`` base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        fake.app,
        log_level="warning",
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="fake-openai", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the fake OpenAI server did not stop"
