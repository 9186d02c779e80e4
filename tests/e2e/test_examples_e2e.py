"""One scenario against every shipped app, each a real uvicorn process on a loopback port:
the Starlette, FastAPI and Django (ASGI) examples, the demo on memory and the demo on a
throwaway Redis (plus two demo workers sharing that Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse

from turnstream._demo import fake_reply

from ._server import ServerProcess, demo_argv, running, uvicorn_argv

pytestmark = pytest.mark.e2e

DEMO_TOKENS = 20
MESSAGE = "resumable streams should survive a dropped connection without any duplicate words"


@dataclass
class Target:
    """A running app and what the scenario needs to know about it."""

    name: str
    server: ServerProcess
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.base_url

    def expected_deltas(self, message: str) -> list[str]:
        if self.name.startswith("demo"):
            return fake_reply(message, DEMO_TOKENS)
        return [word + " " for word in f"You said: {message}".split()]

    async def producer_calls(self, client: httpx.AsyncClient, execution_id: str = "") -> Any:
        response = await client.get(
            self.url + "/debug/producer-calls",
            params={"executionId": execution_id},
            headers=self.headers,
        )
        assert response.status_code == 200, response.text
        return response.json()


def chat_body(session: str, message: str = MESSAGE) -> dict[str, Any]:
    return {"sessionId": session, "turnIndex": 0, "message": message}


def new_session() -> str:
    return "e2e-" + uuid.uuid4().hex[:12]


def events_of(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in content.splitlines()]


def turn_url(target: Target, execution_id: str, tail: str = "") -> str:
    return f"{target.url}/turns/{quote(execution_id, safe='')}{tail}"


def assert_whole_log(target: Target, events: list[dict[str, Any]], message: str = MESSAGE) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "session.run.started"
    assert events[-1]["type"] == "session.run.completed"
    assert [e["type"] for e in events[1:-1]] == ["text-delta"] * (len(events) - 2)
    deltas = [e["delta"] for e in events[1:-1]]
    assert deltas == target.expected_deltas(message)
    assert events[-1]["finalText"] == "".join(deltas)


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_demos(redis_server: Any) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    argv = demo_argv("--redis", redis_server.url, tokens=DEMO_TOKENS)
    with running("demo-redis-a", argv) as a, running("demo-redis-b", argv) as b:
        yield a, b


@pytest.fixture(
    scope="module",
    params=[
        "starlette",
        "fastapi",
        "django",
        "demo",
        pytest.param("demo-redis", marks=pytest.mark.redis),
    ],
)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    name: str = request.param
    example_headers = {"X-User-Id": "ada"}
    if name == "demo-redis":
        worker_a, _ = request.getfixturevalue("redis_demos")
        yield Target(name, worker_a)
        return
    if name == "demo":
        argv = demo_argv(tokens=DEMO_TOKENS)
        headers: dict[str, str] = {}
    elif name == "django":
        argv = uvicorn_argv("examples.django_app.asgi:application")
        headers = example_headers
    else:
        argv = uvicorn_argv(f"examples.{name}_app:app")
        headers = example_headers
    with running(name, argv) as server:
        yield Target(name, server, headers)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as c:
        yield c


# -- the scenario -----------------------------------------------------------------------------


async def test_fresh_turn(target: Target, client: httpx.AsyncClient) -> None:
    session = new_session()
    response = await client.post(
        target.url + "/chat", json=chat_body(session), headers=target.headers
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-turn-mode"] == "fresh"
    assert response.headers["content-type"] == "application/x-ndjson"
    execution_id = response.headers["x-execution-id"]
    assert session in execution_id
    events = events_of(response.content)
    assert_whole_log(target, events)
    assert events[0]["executionId"] == execution_id
    assert (await target.producer_calls(client, execution_id))["calls"] == 1


async def test_drop_mid_stream_then_resume(target: Target, client: httpx.AsyncClient) -> None:
    session = new_session()
    head: list[dict[str, Any]] = []
    async with client.stream(
        "POST", target.url + "/chat", json=chat_body(session), headers=target.headers
    ) as response:
        assert response.headers["x-turn-mode"] == "fresh"
        execution_id = response.headers["x-execution-id"]
        async for line in response.aiter_lines():
            head.append(orjson.loads(line))
            if len(head) == 4:
                break
    # Leaving the block closed the connection mid-turn; the turn goes on without us.
    assert head[-1]["type"] == "text-delta"
    last_seq = head[-1]["seq"]

    rest = await client.get(
        turn_url(target, execution_id, "/stream"),
        headers={**target.headers, "Last-Event-ID": str(last_seq)},
    )
    assert rest.status_code == 200, rest.text
    assert rest.headers["x-turn-mode"] in {"joined", "replayed"}
    tail = events_of(rest.content)
    assert tail[0]["seq"] == last_seq + 1  # no duplicate, no gap
    assert_whole_log(target, head + tail)
    assert (await target.producer_calls(client, execution_id))["calls"] == 1


async def test_retry_of_a_finished_turn_replays(target: Target, client: httpx.AsyncClient) -> None:
    session = new_session()
    url = target.url + "/chat"
    fresh = await client.post(url, json=chat_body(session), headers=target.headers)
    execution_id = fresh.headers["x-execution-id"]
    before = await target.producer_calls(client, execution_id)
    assert before["calls"] == 1

    replay = await client.post(url, json=chat_body(session), headers=target.headers)
    assert replay.status_code == 200
    assert replay.headers["x-turn-mode"] == "replayed"
    assert replay.headers["x-execution-id"] == execution_id
    assert replay.content == fresh.content  # byte for byte
    after = await target.producer_calls(client, execution_id)
    assert after == before  # the producer did not run again, for this turn or any other


async def test_second_post_while_live_joins(target: Target, client: httpx.AsyncClient) -> None:
    session = new_session()
    url = target.url + "/chat"
    async with client.stream("POST", url, json=chat_body(session), headers=target.headers) as first:
        assert first.headers["x-turn-mode"] == "fresh"
        lines = first.aiter_lines()
        started = orjson.loads(await anext(lines))
        assert started["type"] == "session.run.started"
        # The first stream is open and its turn still running: the retry joins it.
        second = await client.post(url, json=chat_body(session), headers=target.headers)
        rest = [line async for line in lines]
    assert second.headers["x-turn-mode"] == "joined"
    first_events = [started, *(orjson.loads(line) for line in rest)]
    second_events = events_of(second.content)
    assert second_events == first_events
    assert_whole_log(target, second_events)
    execution_id = started["executionId"]
    assert (await target.producer_calls(client, execution_id))["calls"] == 1


async def test_different_message_for_the_same_turn_is_409(
    target: Target, client: httpx.AsyncClient
) -> None:
    session = new_session()
    url = target.url + "/chat"
    fresh = await client.post(url, json=chat_body(session), headers=target.headers)
    assert fresh.status_code == 200
    conflict = await client.post(
        url, json=chat_body(session, "an entirely different message"), headers=target.headers
    )
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"
    problem = conflict.json()
    assert problem["status"] == 409
    assert problem["title"]
    execution_id = fresh.headers["x-execution-id"]
    assert (await target.producer_calls(client, execution_id))["calls"] == 1


async def test_sse(target: Target, client: httpx.AsyncClient) -> None:
    session = new_session()
    events: list[dict[str, Any]] = []
    async with aconnect_sse(
        client,
        "POST",
        target.url + "/chat?format=sse",
        json=chat_body(session),
        headers=target.headers,
    ) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["x-turn-mode"] == "fresh"
        async for sse in source.aiter_sse():
            event = orjson.loads(sse.data)
            assert sse.id == str(event["seq"])
            assert sse.event == event["type"]
            events.append(event)
    assert_whole_log(target, events)

    # The same turn resumed over SSE from a browser-style Last-Event-ID.
    execution_id = events[0]["executionId"]
    async with aconnect_sse(
        client,
        "GET",
        turn_url(target, execution_id, "/stream"),
        headers={**target.headers, "Last-Event-ID": "5"},
    ) as source:
        resumed = [orjson.loads(sse.data) async for sse in source.aiter_sse()]
    assert resumed == events[5:]


# -- several workers, one Redis ---------------------------------------------------------------


@pytest.mark.redis
async def test_turn_finished_on_one_worker_replays_on_another(
    redis_demos: tuple[ServerProcess, ServerProcess], client: httpx.AsyncClient
) -> None:
    a, b = redis_demos
    session = new_session()
    fresh = await client.post(a.base_url + "/chat", json=chat_body(session))
    assert fresh.headers["x-turn-mode"] == "fresh"
    execution_id = fresh.headers["x-execution-id"]
    calls_on_b = (await client.get(b.base_url + "/debug/producer-calls")).json()["total"]

    replay = await client.post(b.base_url + "/chat", json=chat_body(session))
    assert replay.headers["x-turn-mode"] == "replayed"
    assert replay.content == fresh.content
    after_on_b = (await client.get(b.base_url + "/debug/producer-calls")).json()["total"]
    assert after_on_b == calls_on_b  # zero producer calls on B
    status = await client.get(b.base_url + "/turns/" + quote(execution_id, safe=""))
    assert status.json()["status"] == "completed"


@pytest.mark.redis
async def test_simultaneous_identical_posts_start_one_producer(
    redis_demos: tuple[ServerProcess, ServerProcess],
) -> None:
    workers = redis_demos
    session = new_session()
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as client:

        async def total_calls() -> int:
            counts = [
                (await client.get(w.base_url + "/debug/producer-calls")).json()["total"]
                for w in workers
            ]
            return sum(counts)

        async def post(i: int) -> httpx.Response:
            worker = workers[i % 2]
            return await client.post(worker.base_url + "/chat", json=chat_body(session))

        before = await total_calls()
        responses = await asyncio.gather(*(post(i) for i in range(20)))
        after = await total_calls()

    assert after - before == 1
    assert all(r.status_code == 200 for r in responses)
    modes = sorted(r.headers["x-turn-mode"] for r in responses)
    assert modes.count("fresh") == 1
    assert set(modes) <= {"fresh", "joined", "replayed"}
    bodies = {r.content for r in responses}
    assert len(bodies) == 1  # all twenty got the same whole log
    demo = Target("demo-redis", workers[0])
    assert_whole_log(demo, events_of(bodies.pop()))
