"""turnstream on Django (ASGI), in process: Django's ``ASGIHandler`` inside TurnstreamMiddleware,
driven message by message (httpx's ASGI transport buffers whole responses, which would hide
whether Django streams).

What is checked: the middleware answers the lifespan Django refuses; Django streams the turn
as it is produced (not buffered); a client disconnect ends the reader and not the turn; problem
documents and headers come through ``django_response``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import django
import orjson
import pytest
from django.conf import settings

from tests._helpers import WordProducer, ndjson
from turnstream import (
    Limits,
    MemoryStore,
    Principal,
    RunKey,
    Supervisor,
    TurnIdentity,
    TurnstreamError,
    Unauthorized,
    authorize_request,
    handle_chat_turn,
)
from turnstream._framing import SSE_KEEPALIVE
from turnstream.django import chat_turn_request, django_problem, django_response, stream_options

if not settings.configured:
    settings.configure(
        SECRET_KEY="test",
        DEBUG=False,
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
    )
    django.setup()

from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponseBase
from django.urls import path

from turnstream import TurnstreamMiddleware


class Env:
    """What the view of the test at hand uses (Django's URLconf is process-wide)."""

    supervisor: Supervisor
    producer: WordProducer
    body_exits: list[str]


env = Env()


def authorize(request: Any) -> Principal:
    user = request.headers.get("x-user-id", "u1")
    if user == "anonymous":
        raise Unauthorized("sign in first")
    if user == "blocked":
        raise PermissionError("read-only seat")
    if user == "buggy":
        raise RuntimeError("the session backend is down")
    return Principal("t1", user)


async def tracked(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The turn's body as Django gets it, recording how its iteration ended."""
    try:
        async for chunk in body:
            yield chunk
    except BaseException as exc:
        env.body_exits.append(type(exc).__name__)
        raise
    env.body_exits.append("end")


async def chat(request: HttpRequest) -> HttpResponseBase:
    try:
        who = await authorize_request(authorize, request)
        body = chat_turn_request(request)
    except TurnstreamError as exc:
        return django_problem(exc)
    identity = TurnIdentity(who.tenant_id, "proj", body.session_id, who.user_id, body.turn_index)
    result = await handle_chat_turn(
        identity,
        {"message": body.message},
        supervisor=env.supervisor,
        produce=env.producer,
        **stream_options(request),
    )
    if not isinstance(result.body, bytes):
        result.body = tracked(aiter(result.body))
    return django_response(result)


urlpatterns = [path("chat", chat)]


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
async def app(limits: Limits) -> AsyncIterator[TurnstreamMiddleware]:
    env.supervisor = Supervisor(MemoryStore(), lease_ms=2000, limits=limits)
    env.producer = WordProducer(words=6)
    env.body_exits = []
    yield TurnstreamMiddleware(
        get_asgi_application(), supervisor=env.supervisor, authorize=authorize
    )
    if env.supervisor.started:  # started lazily by the first turn (no lifespan here)
        await env.supervisor.aclose()
    

class Call:
    """One ASGI call in a task of its own, with a queue each way."""

    def __init__(self, app: Any, scope: dict[str, Any]) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def send(message: Any) -> None:
            await self.outbox.put(dict(message))

        self.task = asyncio.create_task(app(scope, self.inbox.get, send))

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.outbox.get(), 5)


def http_scope(
    path_: str,
    *,
    method: str = "POST",
    query: bytes = b"",
    content_type: str = "application/json",
    **headers: str,
) -> dict[str, Any]:
    raw = [(b"host", b"testserver"), (b"content-type", content_type.encode())]
    raw += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_,
        "raw_path": path_.encode(),
        "query_string": query,
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def post_chat(app: Any, body: bytes, *, query: bytes = b"", **headers: str) -> Call:
    call = Call(app, http_scope("/chat", query=query, **headers))
    call.inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
    return call


TURN = b'{"sessionId": "s1", "turnIndex": 0, "message": "hi"}'


async def read_to_end(call: Call) -> tuple[dict[str, Any], bytes]:
    start = await call.next()
    assert start["type"] == "http.response.start"
    body = b""
    while True:
        message = await call.next()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await asyncio.wait_for(call.task, 5)
    return start, body


def headers_of(start: dict[str, Any]) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in start["headers"]}


# -- lifespan -----------------------------------------------------------------------------


async def lifespan_round_trip(app: Any, supervisor: Supervisor) -> None:
    call = Call(app, {"type": "lifespan", "asgi": {"version": "3.0"}})
    try:
        await call.inbox.put({"type": "lifespan.startup"})
        assert (await call.next())["type"] == "lifespan.startup.complete"
        assert supervisor.started
        await call.inbox.put({"type": "lifespan.shutdown"})
        assert (await call.next())["type"] == "lifespan.shutdown.complete"
        await asyncio.wait_for(call.task, 5)
    finally:
        call.task.cancel()
    assert not supervisor.started


async def test_the_middleware_answers_the_lifespan_django_refuses(
    app: TurnstreamMiddleware,
) -> None:
    await lifespan_round_trip(app, env.supervisor)


async def test_forward_only_lifespan_surfaces_djangos_refusal() -> None:
    supervisor = Supervisor(MemoryStore())
    app = TurnstreamMiddleware(
        get_asgi_application(), supervisor=supervisor, authorize=authorize, lifespan="forward"
    )
    call = Call(app, {"type": "lifespan", "asgi": {"version": "3.0"}})
    await call.inbox.put({"type": "lifespan.startup"})
    with pytest.raises(ValueError, match="Django can only handle ASGI/HTTP"):
        await asyncio.wait_for(call.task, 5)
    assert not supervisor.started


# -- streaming ----------------------------------------------------------------------------


async def test_django_streams_the_turn_as_it_is_produced(app: TurnstreamMiddleware) -> None:
    gate = env.producer.gate = anyio.Event()
    call = post_chat(app, TURN)
    start = await call.next()
    assert start["status"] == 200
    headers = headers_of(start)
    assert headers["content-type"] == "application/x-ndjson"
    assert headers["x-turn-mode"] == "fresh"
    assert headers["x-execution-id"] == "proj:s1:0"
    assert headers["cache-control"] == "no-store"
    assert headers["x-accel-buffering"] == "no"
    # The producer is held after two words: what arrives now was not buffered to the end.
    seen: list[dict[str, Any]] = []
    while len(seen) < 3:
        message = await call.next()
        assert message["more_body"] is True
        seen += ndjson(message["body"])
    assert [e["type"] for e in seen] == ["session.run.started", "text-delta", "text-delta"]
    assert not call.task.done()
    gate.set()
    rest = b""
    while True:
        message = await call.next()
        rest += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await asyncio.wait_for(call.task, 5)
    events = seen + ndjson(rest)
    assert [e["seq"] for e in events] == list(range(1, 9))
    assert events[-1]["finalText"] == env.producer.expected_text()
    assert env.body_exits == ["end"]


async def test_a_disconnect_ends_the_reader_not_the_turn(app: TurnstreamMiddleware) -> None:
    gate = env.producer.gate = anyio.Event()
    call = post_chat(app, TURN)
    assert (await call.next())["type"] == "http.response.start"
    seen: list[dict[str, Any]] = []
    while len(seen) < 3:
        seen += ndjson((await call.next())["body"])
    # The reader now waits for the held producer; the client leaves.
    await call.inbox.put({"type": "http.disconnect"})
    await asyncio.wait_for(call.task, 5)
    assert env.body_exits == ["CancelledError"]  # Django cancelled the body: the reader ended
    gate.set()
    # The turn goes on without its client and finishes; a retry replays it whole.
    for _ in range(200):
        run = await env.supervisor.store.get_run(
            RunKey("t1", "proj:s1:0", "u1")
        )
        if run is not None and run.status.finished:
            break
        await asyncio.sleep(0.01)
    replay = post_chat(app, TURN)
    start, body = await read_to_end(replay)
    assert headers_of(start)["x-turn-mode"] == "replayed"
    events = ndjson(body)
    assert events[-1]["type"] == "session.run.completed"
    assert events[-1]["finalText"] == env.producer.expected_text()
    assert env.producer.calls == 1


async def test_sse_and_cursor_come_from_the_django_request(app: TurnstreamMiddleware) -> None:
    _, whole = await read_to_end(post_chat(app, TURN))
    start, body = await read_to_end(
        post_chat(app, TURN, query=b"format=sse", last_event_id="5")
    )
    assert headers_of(start)["content-type"].startswith("text/event-stream")
    assert headers_of(start)["x-turn-mode"] == "replayed"
    ids = [line for line in body.decode().splitlines() if line.startswith("id: ")]
    assert ids == ["id: 6", "id: 7", "id: 8"]
    assert len(ndjson(whole)) == 8


@pytest.mark.parametrize("limits", [Limits(keepalive_s=0.05)])
async def test_an_idle_sse_stream_gets_keepalives(app: TurnstreamMiddleware) -> None:
    gate = env.producer.gate = anyio.Event()
    call = post_chat(app, TURN, query=b"format=sse")
    assert (await call.next())["type"] == "http.response.start"
    body = b""
    while body.count(SSE_KEEPALIVE) < 3:  # the producer is held: only keep-alives come
        body += (await call.next())["body"]
    assert body.count(b"id: ") == 3  # started, w0, w1: whole frames, none lost or split
    gate.set()
    while True:
        message = await call.next()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await asyncio.wait_for(call.task, 5)
    frames = [f for f in body.split(b"\n\n") if f and not f.startswith(b":")]
    assert [f.split(b"\n")[0] for f in frames] == [f"id: {i}".encode() for i in range(1, 9)]


@pytest.mark.parametrize("limits", [Limits(send_timeout_s=0.2)])
async def test_a_client_that_stops_reading_loses_its_reader(app: TurnstreamMiddleware) -> None:
    # Paced, so the turn outlasts the check below however the reader batches its chunks (a
    # fast producer's 400 words can fit in the few chunks a stuck transport and the one-slot
    # queue hold, and then the body ends before any timeout).
    env.producer.words, env.producer.delay = 400, 0.01
    stuck = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))
        if message["type"] == "http.response.body":
            stuck.set()
            await asyncio.Event().wait()  # the client's window is full: send never returns

    task = asyncio.create_task(app(http_scope("/chat"), _one_request(TURN), send))
    try:
        await asyncio.wait_for(stuck.wait(), 5)
        for _ in range(100):  # the reader is dropped after send_timeout_s, not at the end
            if env.body_exits:
                break
            await asyncio.sleep(0.02)
        assert env.body_exits == ["GeneratorExit"]
        assert env.producer.calls == 1
    finally:
        task.cancel()


def _one_request(body: bytes) -> Any:
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # no disconnect: the client is there, just not reading
        raise AssertionError

    return receive


# -- problem documents --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", {}, 400),
        (b'{"sessionId": "s1", "turnIndex": -1, "message": "hi"}', {}, 400),
        (TURN, {"content_type": "text/plain"}, 400),
        (b'{"sessionId": "s1", "turnIndex": 0, "message": "' + b"x" * 2_000_000 + b'"}', {}, 413),
    ],
)
async def test_bad_bodies_are_problem_documents(
    app: TurnstreamMiddleware, body: bytes, headers: dict[str, str], status: int
) -> None:
    start, content = await read_to_end(post_chat(app, body, **headers))
    assert start["status"] == status
    assert headers_of(start)["content-type"] == "application/problem+json"
    assert orjson.loads(content)["status"] == status
    assert env.producer.calls == 0


async def test_a_conflicting_retry_is_409(app: TurnstreamMiddleware) -> None:
    await read_to_end(post_chat(app, TURN))
    start, _ = await read_to_end(
        post_chat(app, b'{"sessionId": "s1", "turnIndex": 0, "message": "other"}')
    )
    assert start["status"] == 409
    headers = headers_of(start)
    assert headers["content-type"] == "application/problem+json"
    assert headers["x-execution-id"] == "proj:s1:0"


async def test_turn_routes_are_the_middlewares(app: TurnstreamMiddleware) -> None:
    await read_to_end(post_chat(app, TURN))
    call = Call(app, http_scope("/turns/proj:s1:0", method="GET"))
    call.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    start, content = await read_to_end(call)
    assert start["status"] == 200
    assert orjson.loads(content)["status"] == "completed"


@pytest.mark.parametrize(
    ("user", "status"), [("anonymous", 401), ("blocked", 403), ("buggy", 500)]
)
async def test_an_authorize_that_says_no_is_a_problem_document(
    app: TurnstreamMiddleware, user: str, status: int
) -> None:
    start, content = await read_to_end(post_chat(app, TURN, x_user_id=user))
    assert start["status"] == status
    assert headers_of(start)["content-type"] == "application/problem+json"
    document = orjson.loads(content)
    assert document["status"] == status
    assert "session backend" not in content.decode()  # a bug's text stays in the log
    assert env.producer.calls == 0


def test_importing_turnstream_django_does_not_import_django() -> None:
    code = "import sys, turnstream.django; print('django' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
