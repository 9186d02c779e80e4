"""The demo app, in process (httpx.ASGITransport: no lifespan, so the supervisor starts lazily
on the first turn and the fixture stops it)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from tests._helpers import call_with_a_stalled_body
from tests._redis_process import free_port
from turnstream import Limits
from turnstream._demo import create_demo_app, fake_reply
from turnstream._demo._fake import VOCABULARY
from turnstream._supervisor import Supervisor

TOKENS = 6
JSON = {"Content-Type": "application/json"}
TERMINAL = {"session.run.completed", "session.run.failed", "session.run.cancelled"}


def body(session: Any = "s1", turn: Any = 0, message: Any = "hello there") -> dict[str, Any]:
    return {"sessionId": session, "turnIndex": turn, "message": message}


def events_of(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in content.splitlines()]


def assert_whole_log(events: list[dict[str, Any]], message: str, tokens: int = TOKENS) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "session.run.started"
    assert events[-1]["type"] == "session.run.completed"
    deltas = [e["delta"] for e in events if e["type"] == "text-delta"]
    assert deltas == fake_reply(message, tokens)
    assert events[-1]["finalText"] == "".join(deltas)


def execution_url(execution_id: str, tail: str = "") -> str:
    return "/turns/" + quote(execution_id, safe="") + tail


async def make_client(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_demo_app(**options)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
            yield client
    finally:
        await app.state.supervisor.aclose()  # the lazily started one; a no-op if never started


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for c in make_client(tokens=TOKENS, token_delay_ms=0):
        yield c


@pytest.fixture
async def slow_client() -> AsyncIterator[httpx.AsyncClient]:
    # Slow enough to act on a turn while it is live (ASGITransport buffers whole responses,
    # so a live turn is driven from a background task).
    async for c in make_client(tokens=200, token_delay_ms=10):
        yield c


async def producer_calls(client: httpx.AsyncClient, execution_id: str, **headers: str) -> int:
    response = await client.get(
        "/debug/producer-calls", params={"executionId": execution_id}, headers=headers
    )
    assert response.status_code == 200
    calls: int = response.json()["calls"]
    return calls


async def wait_until_live(client: httpx.AsyncClient, execution_id: str) -> None:
    for _ in range(500):  # bounded: 5 s
        response = await client.get(execution_url(execution_id))
        if response.status_code == 200 and response.json()["lastSeq"] >= 2:
            assert response.json()["status"] == "running"
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the turn never went live")


# -- the fake model -------------------------------------------------------------------------


def test_fake_reply_is_deterministic() -> None:
    assert fake_reply("hello", 40) == fake_reply("hello", 40)
    assert fake_reply("hello", 40) != fake_reply("hello!", 40)
    assert fake_reply("hello", 3) == fake_reply("hello", 40)[:3]
    assert fake_reply("hello", 0) == []
    assert all(w.endswith(" ") and w[:-1] in VOCABULARY for w in fake_reply("x", 100))
    # Pinned: the same message gives the same reply in every process and on every Python.
    assert fake_reply("hi there", 5) == ["still ", "bright ", "keeps ", "small ", "every "]
    with pytest.raises(ValueError):
        fake_reply("x", -1)


def test_create_demo_app_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        create_demo_app(tokens=-1)
    with pytest.raises(ValueError):
        create_demo_app(token_delay_ms=-1)
    with pytest.raises(ValueError):
        create_demo_app(lease_ms=1)
    from turnstream import MemoryStore

    with pytest.raises(ValueError):
        create_demo_app(store=MemoryStore(), redis_url="redis://127.0.0.1:1/0")


# -- page and health ------------------------------------------------------------------------


async def test_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert "<title>turnstream demo</title>" in page
    # No external assets, no build step: nothing is loaded from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page
    for needle in (
        "/chat",
        "/stream?after=",
        "encodeURIComponent",
        "/cancel",
        "X-Turn-Mode",
        "X-Execution-Id",
        "session.run.restarted",
        "localStorage",
        "Last-Event-ID",
        "X-Demo-Tenant",
        "X-Demo-User",
        "X-Demo-Worker",
        "/demo/config",
    ):
        assert needle in page


async def test_healthz_is_the_readiness_check() -> None:
    app = create_demo_app(tokens=TOKENS, token_delay_ms=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
        # No lifespan here, and the check does not start the supervisor by itself.
        not_started = await client.get("/healthz")
        assert not_started.status_code == 503
        assert not_started.headers["retry-after"] == "1"
        assert not_started.json()["type"] == "https://turnstream.dev/problems/not-ready"
        async with app.state.supervisor:
            response = await client.get("/healthz")
            assert response.status_code == 200
            assert response.json() == {"status": "ready"}
            assert (await client.head("/healthz")).status_code == 200
        assert (await client.get("/healthz")).status_code == 503  # shut down


@pytest.mark.parametrize(
    ("path", "first_chunk"),
    [
        ("/chat", b'{"sessionId": "s'),
        ("/api/chat", b'{"id": "c1", "messages": ['),
        (execution_url("demo:s1:0", "/cancel"), b"{"),
    ],
)
async def test_a_body_that_never_arrives_is_a_408(path: str, first_chunk: bytes) -> None:
    app = create_demo_app(tokens=TOKENS, token_delay_ms=0, limits=Limits(body_timeout_s=0.2))
    try:
        answer = await call_with_a_stalled_body(app, path, first_chunk=first_chunk)
    finally:
        await app.state.supervisor.aclose()
    assert answer.status == 408
    assert 0.15 < answer.seconds < 2, answer.seconds
    assert answer.headers["connection"] == "close"
    assert answer.json()["type"] == "https://turnstream.dev/problems/request-timeout"
    assert app.state.producer_calls.total == 0


# -- turns ------------------------------------------------------------------------------------


async def test_fresh_then_replay_without_a_second_producer_call(
    client: httpx.AsyncClient,
) -> None:
    fresh = await client.post("/chat", json=body())
    assert fresh.status_code == 200
    assert fresh.headers["content-type"] == "application/x-ndjson"
    assert fresh.headers["x-turn-mode"] == "fresh"
    assert fresh.headers["x-execution-id"] == "demo:s1:0"
    assert fresh.headers["cache-control"] == "no-store"
    events = events_of(fresh.content)
    assert_whole_log(events, "hello there")
    assert await producer_calls(client, "demo:s1:0") == 1

    replay = await client.post("/chat", json=body())
    assert replay.headers["x-turn-mode"] == "replayed"
    assert replay.content == fresh.content
    assert await producer_calls(client, "demo:s1:0") == 1

    total = (await client.get("/debug/producer-calls")).json()
    assert total == {"total": 1}


async def test_cursor_from_query_and_last_event_id(client: httpx.AsyncClient) -> None:
    whole = events_of((await client.post("/chat", json=body())).content)
    after_query = await client.post("/chat?after=3", json=body())
    assert events_of(after_query.content) == whole[3:]
    after_header = await client.post("/chat", json=body(), headers={"Last-Event-ID": "5"})
    assert events_of(after_header.content) == whole[5:]
    past_end = await client.post("/chat?after=1000", json=body())
    assert past_end.status_code == 200
    assert past_end.content == b""


async def test_sse_by_query_and_by_accept(client: httpx.AsyncClient) -> None:
    ndjson = events_of((await client.post("/chat", json=body())).content)
    for response in (
        await client.post("/chat?format=sse", json=body()),
        await client.post("/chat", json=body(), headers={"Accept": "text/event-stream"}),
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.text.split("\n\n") if f]
        assert len(frames) == len(ndjson)
        for frame, event in zip(frames, ndjson, strict=True):
            fields = dict(line.split(": ", 1) for line in frame.split("\n"))
            assert fields["id"] == str(event["seq"])
            assert fields["event"] == event["type"]
            assert orjson.loads(fields["data"]) == event


async def test_different_message_for_the_same_turn_is_409(client: httpx.AsyncClient) -> None:
    await client.post("/chat", json=body())
    conflict = await client.post("/chat", json=body(message="something else"))
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"
    assert conflict.json()["status"] == 409
    assert await producer_calls(client, "demo:s1:0") == 1


async def test_turn_routes(client: httpx.AsyncClient) -> None:
    whole = (await client.post("/chat", json=body())).content
    status = await client.get(execution_url("demo:s1:0"))
    assert status.status_code == 200
    record = status.json()
    assert record["status"] == "completed"
    assert record["lastSeq"] == TOKENS + 2
    assert record["finalText"] == "".join(fake_reply("hello there", TOKENS))

    resumed = await client.get(execution_url("demo:s1:0", "/stream"), params={"after": "2"})
    assert resumed.headers["x-turn-mode"] == "replayed"
    assert events_of(resumed.content) == events_of(whole)[2:]

    cancel = await client.post(execution_url("demo:s1:0", "/cancel"), json={})
    assert cancel.status_code == 202
    assert cancel.json()["cancelRequested"] is False  # already finished: nothing to cancel

    not_json = await client.post(execution_url("demo:s1:0", "/cancel"), content=b"x")
    assert not_json.status_code == 415

    unknown = await client.get(execution_url("demo:nope:0", "/stream"))
    assert unknown.status_code == 204
    assert (await client.get(execution_url("demo:nope:0"))).status_code == 404
    assert (await client.get(execution_url("not-an-id"))).status_code == 400


async def test_session_ids_with_reserved_characters_are_kept_apart(
    client: httpx.AsyncClient,
) -> None:
    ids = {}
    for session in ("a:b{c}", "a%3Ab%7Bc%7D", "a/b", "ünï cödé", "a b"):
        response = await client.post("/chat", json=body(session=session))
        assert response.status_code == 200, response.text
        execution_id = response.headers["x-execution-id"]
        assert execution_id.count(":") == 2
        assert not set("{}") & set(execution_id)
        ids[session] = execution_id
        status = await client.get(execution_url(execution_id))
        assert status.status_code == 200
        assert status.json()["executionId"] == execution_id
    assert len(set(ids.values())) == len(ids)  # injective
    assert ids["a:b{c}"] == "demo:a%3Ab%7Bc%7D:0"


async def test_tenants_and_users_are_isolated(client: httpx.AsyncClient) -> None:
    alice = {"X-Demo-Tenant": "t1", "X-Demo-User": "alice"}
    bob = {"X-Demo-Tenant": "t1", "X-Demo-User": "bob"}
    other_tenant = {"X-Demo-Tenant": "t2", "X-Demo-User": "alice"}
    first = await client.post("/chat", json=body(), headers=alice)
    assert first.headers["x-turn-mode"] == "fresh"

    # Same tenant, another user: alice's turn is not there for bob, exactly as an unknown
    # one is not; his own POST of the same session is a run of his own, produced anew.
    assert (await client.get(execution_url("demo:s1:0"), headers=bob)).status_code == 404
    stream = await client.get(execution_url("demo:s1:0", "/stream"), headers=bob)
    assert stream.status_code == 204
    cancel = await client.post(execution_url("demo:s1:0", "/cancel"), json={}, headers=bob)
    assert cancel.status_code == 404
    his = await client.post("/chat", json=body(), headers=bob)
    assert (his.status_code, his.headers["x-turn-mode"]) == (200, "fresh")
    assert await producer_calls(client, "demo:s1:0", **bob) == 1
    again = await client.post("/chat", json=body(), headers=alice)
    assert again.headers["x-turn-mode"] == "replayed"  # hers is untouched

    # Another tenant: a different run under the same execution id, produced on its own.
    theirs = await client.post("/chat", json=body(), headers=other_tenant)
    assert theirs.headers["x-turn-mode"] == "fresh"
    assert await producer_calls(client, "demo:s1:0", **alice) == 1
    assert await producer_calls(client, "demo:s1:0", **other_tenant) == 1
    assert await producer_calls(client, "demo:s1:0") == 0  # default tenant: no such run


async def test_join_a_live_turn(slow_client: httpx.AsyncClient) -> None:
    client = slow_client
    first = asyncio.create_task(client.post("/chat", json=body()))
    await wait_until_live(client, "demo:s1:0")
    second = await client.post("/chat", json=body())
    assert second.headers["x-turn-mode"] == "joined"
    first_response = await first
    assert first_response.headers["x-turn-mode"] == "fresh"
    assert second.content == first_response.content
    assert_whole_log(events_of(second.content), "hello there", tokens=200)
    assert await producer_calls(client, "demo:s1:0") == 1


async def test_cancel_a_live_turn(slow_client: httpx.AsyncClient) -> None:
    client = slow_client
    turn = asyncio.create_task(client.post("/chat", json=body()))
    await wait_until_live(client, "demo:s1:0")
    cancel = await client.post(execution_url("demo:s1:0", "/cancel"), json={})
    assert cancel.status_code == 202
    assert cancel.json()["cancelRequested"] is True
    events = events_of((await turn).content)
    assert events[-1]["type"] == "session.run.cancelled"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len(events) < 200
    partial = "".join(e["delta"] for e in events if e["type"] == "text-delta")
    assert events[-1]["finalText"] == partial
    status = (await client.get(execution_url("demo:s1:0"))).json()
    assert status["status"] == "cancelled"


# -- problem documents, never a 5xx ----------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes, int, str | None]] = [
    ("malformed json", b'{"sessionId": "s1", ', 400, "body"),
    ("empty body", b"", 400, "body"),
    ("not an object", b"[1, 2]", 400, "body"),
    ("null", b"null", 400, "body"),
    ("invalid utf-8", b'{"sessionId": "\xff", "turnIndex": 0, "message": "m"}', 400, "body"),
    ("lone surrogate", b'{"sessionId": "\\ud800", "turnIndex": 0, "message": "m"}', 400, "body"),
    ("missing sessionId", orjson.dumps({"turnIndex": 0, "message": "m"}), 400, "sessionId"),
    ("sessionId not a string", orjson.dumps(body(session=7)), 400, "sessionId"),
    ("empty sessionId", orjson.dumps(body(session="")), 400, "sessionId"),
    ("sessionId with NUL", orjson.dumps(body(session="a\x00b")), 400, "sessionId"),
    ("sessionId with newline", orjson.dumps(body(session="a\nb")), 400, "sessionId"),
    ("sessionId with DEL", orjson.dumps(body(session="a\x7fb")), 400, "sessionId"),
    ("sessionId too long", orjson.dumps(body(session="s" * 257)), 400, "sessionId"),
    ("missing turnIndex", orjson.dumps({"sessionId": "s", "message": "m"}), 400, "turnIndex"),
    ("turnIndex a string", orjson.dumps(body(turn="1")), 400, "turnIndex"),
    ("turnIndex a bool", orjson.dumps(body(turn=True)), 400, "turnIndex"),
    ("turnIndex a float", orjson.dumps(body(turn=1.5)), 400, "turnIndex"),
    ("turnIndex negative", orjson.dumps(body(turn=-1)), 400, "turnIndex"),
    ("turnIndex over 2**53", orjson.dumps(body(turn=2**53)), 400, "turnIndex"),
    (
        "turnIndex huge",
        b'{"sessionId":"s","turnIndex":1' + b"0" * 40 + b',"message":"m"}',
        400,
        None,
    ),
    ("missing message", orjson.dumps({"sessionId": "s", "turnIndex": 0}), 400, "message"),
    ("message not a string", orjson.dumps(body(message=["m"])), 400, "message"),
    ("blank message", orjson.dumps(body(message="  \n ")), 400, "message"),
    ("message too long", orjson.dumps(body(message="m" * 100_001)), 413, "message"),
    ("body too large", orjson.dumps(body(message="m" * (1024 * 1024))), 413, "body"),
]


@pytest.mark.parametrize(
    ("content", "status", "field"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_bad_bodies_are_problem_documents(
    client: httpx.AsyncClient, content: bytes, status: int, field: str | None
) -> None:
    response = await client.post("/chat", content=content, headers=JSON)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"].startswith("https://turnstream.dev/problems/")
    if field is not None:
        assert problem["field"] == field
    assert (await client.get("/debug/producer-calls")).json()["total"] == 0


async def test_oversized_body_without_content_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"sessionId": "s1", "turnIndex": 0, "message": "'
        for _ in range(40):
            yield b"m" * 65536  # 2.5 MiB in all, never announced
        yield b'"}'

    response = await client.post("/chat", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["field"] == "body"


@pytest.mark.parametrize(
    ("url", "headers", "status", "field"),
    [
        ("/chat", {"Content-Type": "text/plain"}, 400, "Content-Type"),
        ("/chat?format=xml", JSON, 400, "format"),
        ("/chat?after=-1", JSON, 400, "after"),
        ("/chat?after=01", JSON, 400, "after"),
        ("/chat", {**JSON, "Last-Event-ID": "abc"}, 400, "Last-Event-ID"),
        ("/chat", {**JSON, "X-Demo-Tenant": ""}, 400, "X-Demo-Tenant"),
        ("/chat", {**JSON, "X-Demo-User": "x" * 300}, 400, "X-Demo-User"),
    ],
)
async def test_bad_requests_are_problem_documents(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], status: int, field: str
) -> None:
    response = await client.post(url, content=orjson.dumps(body()), headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field


async def test_turn_routes_refuse_a_bad_principal(client: httpx.AsyncClient) -> None:
    response = await client.get(execution_url("demo:s1:0"), headers={"X-Demo-Tenant": ""})
    assert response.status_code == 400
    assert response.json()["field"] == "X-Demo-Tenant"


async def test_odd_json_never_gives_a_5xx(client: httpx.AsyncClient) -> None:
    values: list[Any] = [None, True, 0, -0.0, 1e308, "", "x" * 300, [], {}, {"a": 1}, "\u2028"]
    for name in ("sessionId", "turnIndex", "message"):
        for value in values:
            document = body()
            document[name] = value
            response = await client.post("/chat", json=document)
            assert response.status_code < 500, (name, value, response.text)
    wrong_method = await client.get("/chat")
    assert wrong_method.status_code == 405


# -- lifespan ---------------------------------------------------------------------------------


async def test_lifespan_starts_and_stops_the_supervisor() -> None:
    app = create_demo_app(tokens=3, token_delay_ms=0)
    supervisor: Supervisor = app.state.supervisor
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: Any) -> None:
        await outbox.put(dict(message))

    # The lifespan runs in one task from startup to shutdown, as a server runs it.
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    )
    try:
        await inbox.put({"type": "lifespan.startup"})
        assert (await asyncio.wait_for(outbox.get(), 5))["type"] == "lifespan.startup.complete"
        assert supervisor.started
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
            response = await client.post("/chat", json=body())
        assert response.headers["x-turn-mode"] == "fresh"
        assert_whole_log(events_of(response.content), "hello there", tokens=3)
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(outbox.get(), 5))["type"] == "lifespan.shutdown.complete"
        await asyncio.wait_for(lifespan, 5)
    finally:
        lifespan.cancel()
    assert not supervisor.started


async def test_the_demo_starts_while_its_store_is_down(caplog: pytest.LogCaptureFixture) -> None:
    # A Redis outage must not turn restarting workers into a crash loop: the lifespan starts
    # (with a warning), turn requests are 503s with Retry-After, readiness says "not ready".
    app = create_demo_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", tokens=TOKENS)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: Any) -> None:
        await outbox.put(dict(message))

    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    )
    try:
        await inbox.put({"type": "lifespan.startup"})
        assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
        assert app.state.supervisor.started
        assert "the turn store is unreachable" in caplog.text
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
            answers = {
                "healthz": await client.get("/healthz"),
                "chat": await client.post("/chat", json=body()),
                "api chat": await client.post(
                    "/api/chat",
                    json={"id": "c1", "messages": [
                        {"role": "user", "parts": [{"type": "text", "text": "hi"}]}
                    ]},
                ),
                "api resume": await client.get("/api/chat/c1/stream"),
                "resume": await client.get(execution_url("demo:s1:0", "/stream")),
                "status": await client.get(execution_url("demo:s1:0")),
                "cancel": await client.post(execution_url("demo:s1:0", "/cancel"), json={}),
            }
            assert (await client.get("/")).status_code == 200  # the page needs no store
        for name, response in answers.items():
            assert response.status_code == 503, (name, response.text)
            assert response.headers["retry-after"] == "1", name
            assert response.json()["type"] == "https://turnstream.dev/problems/store-unavailable"
        assert app.state.producer_calls.total == 0
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.shutdown.complete"
        await asyncio.wait_for(lifespan, 5)
    finally:
        lifespan.cancel()


@pytest.mark.redis
async def test_demo_on_redis(redis_server: Any) -> None:
    app = create_demo_app(redis_url=redis_server.url, tokens=TOKENS, token_delay_ms=0)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
            await app.state.supervisor.start()  # no lifespan: readiness needs it running
            assert (await client.get("/healthz")).status_code == 200
            session = "redis-in-process"
            fresh = await client.post("/chat", json=body(session=session))
            assert fresh.headers["x-turn-mode"] == "fresh"
            assert_whole_log(events_of(fresh.content), "hello there")
            replay = await client.post("/chat", json=body(session=session))
            assert replay.headers["x-turn-mode"] == "replayed"
            assert replay.content == fresh.content
    finally:
        await app.state.supervisor.aclose()
        await app.state.store.aclose()


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve"],
        ["demo", "--port", "http"],
        ["demo", "--port", "70000"],
        ["demo", "--tokens", "-1"],
        ["demo", "--token-delay-ms", "1.5"],
        ["demo", "--lease-ms", "10"],
        ["demo", "--redis", "http://127.0.0.1:1"],
        ["demo", "--unknown"],
    ],
)
def test_cli_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from turnstream.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_runs_uvicorn_on_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from turnstream.__main__ import main

    configs: list[uvicorn.Config] = []

    class FakeServer:
        started = True

        def __init__(self, config: uvicorn.Config) -> None:
            configs.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    assert main(["demo"]) == 0
    argv = "demo --host 0.0.0.0 --port 9001 --tokens 3 --token-delay-ms 0 --lease-ms 500"
    assert main(argv.split()) == 0
    default, custom = configs
    assert (default.host, default.port) == ("127.0.0.1", 8000)
    assert (custom.host, custom.port) == ("0.0.0.0", 9001)
    assert isinstance(custom.app, Starlette)
    assert custom.app.state.supervisor.lease_ms == 500
    FakeServer.started = False  # uvicorn did not start (port taken, Redis unreachable)
    assert main(["demo"]) == 1
