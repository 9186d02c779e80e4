"""TurnstreamMiddleware: lifespan, the turn routes, tenant isolation, pass-through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests._helpers import CURSOR_CASES, WordProducer, call_with_a_stalled_body, ndjson, text_of
from turnstream import (
    ChatTurnRequest,
    Limits,
    MemoryStore,
    Principal,
    RequestTimeout,
    Supervisor,
    TurnIdentity,
    TurnstreamError,
    TurnstreamMiddleware,
    handle_chat_turn,
)
from turnstream._middleware import LifespanMode
from turnstream._problems import problem_for_exception


def principal_of(request: Request) -> Principal:
    return Principal(request.headers.get("x-tenant", "t1"), request.headers.get("x-user", "u1"))


def build_app(supervisor: Supervisor, producer: WordProducer) -> TurnstreamMiddleware:
    async def chat(request: Request) -> Any:
        try:
            body = await ChatTurnRequest.read(request)
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        who = principal_of(request)
        identity = TurnIdentity(who.tenant_id, "proj", body.session_id, who.user_id,
                                body.turn_index)
        return await handle_chat_turn(
            identity,
            {"message": body.message},
            supervisor=supervisor,
            produce=producer,
            format=request.query_params.get("format"),
            accept=request.headers.get("accept"),
        )

    async def hello(request: Request) -> Response:
        return PlainTextResponse("app")

    app = Starlette(routes=[Route("/chat", chat, methods=["POST"]), Route("/hello", hello),
                            Route("/turns", hello)])
    return TurnstreamMiddleware(app, supervisor=supervisor, authorize=principal_of)


@pytest.fixture
async def env() -> AsyncIterator[tuple[httpx.AsyncClient, Supervisor, WordProducer]]:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000)
    producer = WordProducer(words=6, delay=0.005)
    app = build_app(supervisor, producer)
    async with supervisor, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client, supervisor, producer


async def finished_turn(client: httpx.AsyncClient, **headers: str) -> list[dict[str, Any]]:
    response = await client.post(
        "/chat", json={"sessionId": "s1", "turnIndex": 0, "message": "hi"}, headers=headers
    )
    assert response.status_code == 200, response.text
    return ndjson(response.content)


async def test_pass_through_for_other_routes(env: Any) -> None:
    client, _, _ = env
    assert (await client.get("/hello")).text == "app"
    assert (await client.get("/turns")).text == "app"
    assert (await client.get("/turns/a:b:0/unknown")).status_code == 404


async def test_resume_route_replays_after_the_cursor(env: Any) -> None:
    client, _, producer = env
    events = await finished_turn(client)
    response = await client.get("/turns/proj:s1:0/stream", headers={"Last-Event-ID": "3"})
    assert response.status_code == 200
    assert response.headers["x-turn-mode"] == "replayed"
    assert response.headers["cache-control"] == "no-store"
    assert ndjson(response.content) == events[3:]
    by_query = await client.get("/turns/proj:s1:0/stream?after=5")
    assert ndjson(by_query.content) == events[5:]
    sse = await client.get("/turns/proj:s1:0/stream", headers={"Accept": "text/event-stream"})
    assert sse.headers["content-type"].startswith("text/event-stream")
    assert sse.text.count("\n\n") == len(events)
    assert producer.calls == 1


async def test_resume_route_is_204_for_unknown_and_other_tenants(env: Any) -> None:
    client, _, _ = env
    await finished_turn(client)
    assert (await client.get("/turns/proj:nope:0/stream")).status_code == 204
    other_tenant = await client.get("/turns/proj:s1:0/stream", headers={"x-tenant": "t2"})
    assert other_tenant.status_code == 204
    other_user = await client.get("/turns/proj:s1:0/stream", headers={"x-user": "u2"})
    assert other_user.status_code == 204


async def test_status_route(env: Any) -> None:
    client, _, producer = env
    events = await finished_turn(client)
    status = (await client.get("/turns/proj:s1:0")).json()
    assert status["status"] == "completed"
    assert status["lastSeq"] == len(events)
    assert status["finalText"] == text_of(events) == producer.expected_text()
    unknown = await client.get("/turns/proj:s1:9")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert (await client.get("/turns/proj:s1:0", headers={"x-tenant": "t2"})).status_code == 404


async def test_cancel_route_needs_json_and_is_idempotent(env: Any) -> None:
    client, _, producer = env
    producer.gate = anyio.Event()  # the turn parks after two words until cancelled
    results: list[httpx.Response] = []

    async def post_turn() -> None:
        # httpx's ASGITransport hands the response over only once it is complete.
        results.append(
            await client.post("/chat", json={"sessionId": "s1", "turnIndex": 0, "message": "hi"})
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(post_turn)
        with anyio.fail_after(5):
            while (await client.get("/turns/proj:s1:0")).status_code != 200:
                await anyio.sleep(0.01)
        form = await client.post("/turns/proj:s1:0/cancel", data={"x": "1"})
        assert form.status_code == 415
        assert form.headers["content-type"] == "application/problem+json"
        empty = await client.post(
            "/turns/proj:s1:0/cancel", headers={"Content-Type": "application/json"}
        )
        assert empty.status_code == 400
        assert empty.json()["field"] == "body"
        other = await client.post("/turns/proj:s1:0/cancel", json={}, headers={"x-tenant": "t2"})
        assert other.status_code == 404
        assert (await client.get("/turns/proj:s1:0")).json()["status"] == "running"
        accepted = await client.post("/turns/proj:s1:0/cancel", json={})
        assert accepted.status_code == 202
        assert accepted.json()["cancelRequested"] is True
    events = ndjson(results[0].content)
    assert events[-1]["type"] == "session.run.cancelled"
    # The checkpoint is the fold of what was logged before the cancel landed.
    assert events[-1]["finalText"] == text_of(events)
    assert producer.closed == 1
    again = await client.post("/turns/proj:s1:0/cancel", json={})
    assert again.status_code == 202
    assert again.json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{}", 202),
        (b' {"reason": "changed my mind"} ', 202),  # other members are ignored
        (b"", 400),
        (b"{", 400),
        (b"not json", 400),
        (b"[]", 400),
        (b"null", 400),
        (b'"cancel"', 400),
        (b"1", 400),
        (b"{}" + b" " * (1024 * 1024), 413),
    ],
)
async def test_cancel_takes_a_json_object_body(env: Any, content: bytes, status: int) -> None:
    client, _, _ = env
    await finished_turn(client)
    response = await client.post(
        "/turns/proj:s1:0/cancel", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    if status == 202:
        assert response.json()["executionId"] == "proj:s1:0"
    else:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["field"] == "body"


async def test_a_bad_cancel_body_is_refused_before_the_store_is_asked() -> None:
    # An unknown turn with a bad body is a 400, not a 404: the body is judged first, so a
    # malformed cancel learns nothing about which turns exist.
    supervisor = Supervisor(MemoryStore(), lease_ms=2000)
    app = build_app(supervisor, WordProducer())
    async with supervisor, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.post(
            "/turns/proj:nope:0/cancel", content=b"[]", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        unknown = await client.post("/turns/proj:nope:0/cancel", json={})
        assert unknown.status_code == 404


async def test_a_cancel_body_that_never_arrives_is_a_408() -> None:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000, limits=Limits(body_timeout_s=0.2))
    app = build_app(supervisor, WordProducer())
    async with supervisor:
        answer = await call_with_a_stalled_body(app, "/turns/proj:s1:0/cancel", first_chunk=b"{")
    assert answer.status == 408
    assert 0.15 < answer.seconds < 2, answer.seconds
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["connection"] == "close"  # the server stops reading, too
    assert answer.json()["type"] == "https://turnstream.dev/problems/request-timeout"
    assert answer.json()["field"] == "body"


async def test_chat_turn_request_read_has_a_deadline() -> None:
    limits = Limits(body_timeout_s=0.2)
    answers: list[object] = []

    async def chat(request: Request) -> Response:
        try:
            await ChatTurnRequest.read(request, limits=limits)
        except TurnstreamError as exc:
            answers.append(exc)
            return problem_for_exception(exc)
        return PlainTextResponse("read")  # never: the body does not arrive

    app = Starlette(routes=[Route("/chat", chat, methods=["POST"])])
    answer = await call_with_a_stalled_body(app, "/chat")
    assert answer.status == 408
    assert 0.15 < answer.seconds < 2, answer.seconds
    assert isinstance(answers[0], RequestTimeout)


@pytest.mark.parametrize(("value", "expected"), CURSOR_CASES, ids=repr)
async def test_the_resume_route_reads_both_cursor_sources_by_one_rule(
    env: Any, value: str, expected: int | None
) -> None:
    # The same table as the parser's test (tests/test_framing.py), through a real request:
    # once as the raw header value the app sees, once as the query value.
    client, _, _ = env
    events = await finished_turn(client)
    by_header = await client.get(
        "/turns/proj:s1:0/stream", headers=[(b"last-event-id", value.encode("ascii"))]
    )
    by_query = await client.get("/turns/proj:s1:0/stream", params={"after": value})
    for response, field in ((by_header, "Last-Event-ID"), (by_query, "after")):
        if expected is None:
            assert response.status_code == 400, (field, response.text)
            assert response.json()["field"] == field
        else:
            assert response.status_code == 200, (field, response.text)
            assert ndjson(response.content) == events[expected:]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/turns/not-an-id/stream", {}, 400),
        ("GET", "/turns/a:b:01/stream", {}, 400),
        ("GET", "/turns/a%3ab:c:0/stream", {}, 400),
        ("GET", "/turns/proj:s1:0/stream", {"Last-Event-ID": "-1"}, 400),
        ("GET", "/turns/proj:s1:0/stream", {"Last-Event-ID": "1e3"}, 400),
        ("GET", "/turns/proj:s1:0/stream?after=x", {}, 400),
        ("GET", "/turns/proj:s1:0/stream?format=xml", {}, 400),
        ("POST", "/turns/proj:s1:0/stream", {}, 405),
        ("GET", "/turns/proj:s1:0/cancel", {}, 405),
        ("DELETE", "/turns/proj:s1:0", {}, 405),
    ],
)
async def test_bad_route_input_is_a_problem_document(
    env: Any, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    client, _, _ = env
    response = await client.request(method, path, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status


async def test_lifespan_starts_and_stops_the_supervisor() -> None:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000)
    app = build_app(supervisor, WordProducer())
    sent: list[dict[str, Any]] = []
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    started_during_startup: list[bool] = []

    async def receive() -> dict[str, Any]:
        if sent:
            started_during_startup.append(supervisor.started)
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert started_during_startup == [True]
    assert not supervisor.started


# -- lifespan modes -----------------------------------------------------------------------


async def run_lifespan(app: Any) -> list[str]:
    """One lifespan as a server runs it: startup, then shutdown once startup completed. After a
    failed startup a server stops listening and abandons the lifespan task; here the app is
    cancelled when it next waits for a message. The types of the messages the app sent."""
    sent: list[str] = []
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    server = anyio.CancelScope()

    async def receive() -> dict[str, Any]:
        if "lifespan.startup.failed" in sent:
            server.cancel()
            await anyio.sleep_forever()
        if not inbox:
            raise AssertionError("lifespan received more than startup and shutdown")
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        if "lifespan.startup.failed" not in sent:
            sent.append(message["type"])

    with anyio.fail_after(5), server:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


COMPLETE = ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def app_with_lifespan(supervisor: Supervisor, log: list[str]) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.append(f"app startup (supervisor started: {supervisor.started})")
        yield
        log.append(f"app shutdown (supervisor started: {supervisor.started})")

    return Starlette(lifespan=lifespan)


@pytest.mark.parametrize("mode", ["auto", "forward"])
async def test_an_apps_own_lifespan_runs_inside_the_supervisors(mode: LifespanMode) -> None:
    supervisor = Supervisor(MemoryStore())
    log: list[str] = []
    app = TurnstreamMiddleware(
        app_with_lifespan(supervisor, log), supervisor=supervisor, authorize=principal_of,
        lifespan=mode,
    )
    assert await run_lifespan(app) == COMPLETE
    # The supervisor starts before the app's startup and drains before its shutdown: running
    # turns may still need what the app's lifespan set up.
    assert log == [
        "app startup (supervisor started: True)",
        "app shutdown (supervisor started: False)",
    ]
    assert not supervisor.started


async def raises_on_lifespan(scope: Any, receive: Any, send: Any) -> None:
    # What Django's ASGIHandler does with any scope but "http".
    raise ValueError(f"only HTTP, not {scope['type']}")


async def reads_then_raises(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    raise RuntimeError("lifespan is not for me")


async def returns_on_lifespan(scope: Any, receive: Any, send: Any) -> None:
    return None


@pytest.mark.parametrize("inner", [raises_on_lifespan, reads_then_raises, returns_on_lifespan])
async def test_auto_serves_the_lifespan_an_app_does_not_speak(inner: Any) -> None:
    supervisor = Supervisor(MemoryStore())
    started: list[bool] = []
    original_aclose = supervisor.aclose

    async def aclose() -> None:
        started.append(supervisor.started)
        await original_aclose()

    supervisor.aclose = aclose  # type: ignore[method-assign]
    app = TurnstreamMiddleware(inner, supervisor=supervisor, authorize=principal_of)
    assert await run_lifespan(app) == COMPLETE
    assert started[0] is True  # it ran between startup and shutdown
    assert not supervisor.started


async def test_forward_lets_the_apps_refusal_through() -> None:
    supervisor = Supervisor(MemoryStore())
    app = TurnstreamMiddleware(
        raises_on_lifespan, supervisor=supervisor, authorize=principal_of, lifespan="forward"
    )
    with pytest.raises(ValueError, match="only HTTP"):
        await run_lifespan(app)
    assert not supervisor.started


async def test_own_never_shows_the_app_a_lifespan() -> None:
    supervisor = Supervisor(MemoryStore())
    log: list[str] = []
    app = TurnstreamMiddleware(
        app_with_lifespan(supervisor, log), supervisor=supervisor, authorize=principal_of,
        lifespan="own",
    )
    assert await run_lifespan(app) == COMPLETE
    assert log == []
    assert not supervisor.started


async def test_an_apps_failed_startup_is_its_own() -> None:
    supervisor = Supervisor(MemoryStore())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    app = TurnstreamMiddleware(
        Starlette(lifespan=lifespan), supervisor=supervisor, authorize=principal_of
    )
    # Starlette answered `startup.failed` itself, so this is no app without lifespan: nothing
    # is taken over, and the app's exception reaches the server.
    with pytest.raises(RuntimeError, match="no database"):
        await run_lifespan(app)
    assert not supervisor.started


@pytest.mark.parametrize("mode", ["auto", "own", "forward"])
async def test_a_supervisor_that_cannot_start_fails_the_startup(
    mode: LifespanMode, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor(MemoryStore())

    async def start() -> None:
        raise ConnectionError("no redis")

    supervisor.start = start  # type: ignore[method-assign]
    inner: Any = raises_on_lifespan if mode != "forward" else Starlette()
    app = TurnstreamMiddleware(inner, supervisor=supervisor, authorize=principal_of, lifespan=mode)
    assert await run_lifespan(app) == ["lifespan.startup.failed"]
    assert "failed to start" in caplog.text


def test_lifespan_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="lifespan must be"):
        TurnstreamMiddleware(
            Starlette(), supervisor=Supervisor(MemoryStore()), authorize=principal_of,
            lifespan="on",  # type: ignore[arg-type]
        )
