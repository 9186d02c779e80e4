"""Invariant 10 on the demo app: a run is visible only to its tenant and the user who started it.

Another tenant's (or another user's) execution id answers exactly like an unknown one — same
status, same body, same headers — on the resume, status and cancel routes, whether the turn
is live or finished; a cancel from them has no effect; and a POST by another tenant or user
for the same session/turn is a run of its own that never sees the first one's events.
Run on the memory store and on a real Redis (``redis_server``: a throwaway server).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from turnstream._demo import create_demo_app, fake_reply

TOKENS = 60
OWNER = {"X-Demo-Tenant": "acme", "X-Demo-User": "alice"}
OTHER_TENANT = {"X-Demo-Tenant": "globex", "X-Demo-User": "alice"}
OTHER_USER = {"X-Demo-Tenant": "acme", "X-Demo-User": "bob"}
INTRUDERS = {"other tenant": OTHER_TENANT, "other user": OTHER_USER}
# What may differ between two answers without telling anything about the run.
VOLATILE_HEADERS = {"date", "server"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    options: dict[str, Any] = {"tokens": TOKENS, "token_delay_ms": 10}
    if request.param == "redis":
        options["redis_url"] = request.getfixturevalue("redis_server").url
    app = create_demo_app(**options)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as c:
            yield c
    finally:
        await app.state.supervisor.aclose()
        if request.param == "redis":
            await app.state.store.aclose()


def session() -> str:
    # The Redis server is shared by the whole test session: every test uses fresh sessions.
    return f"iso-{uuid.uuid4().hex}"


def chat_body(session_id: str, message: str = "hello there") -> dict[str, Any]:
    return {"sessionId": session_id, "turnIndex": 0, "message": message}


def url(execution_id: str, tail: str = "") -> str:
    return "/turns/" + quote(execution_id, safe="") + tail


def events_of(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in content.splitlines()]


def assert_completed(content: bytes, message: str) -> None:
    events = events_of(content)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "session.run.started"
    assert events[-1]["type"] == "session.run.completed"
    deltas = [e["delta"] for e in events if e["type"] == "text-delta"]
    assert deltas == fake_reply(message, TOKENS)
    assert events[-1]["finalText"] == "".join(deltas)


def answer(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in VOLATILE_HEADERS}
    return response.status_code, response.content, headers


async def wait_until_live(client: httpx.AsyncClient, execution_id: str) -> None:
    for _ in range(500):  # bounded: 5 s
        response = await client.get(url(execution_id), headers=OWNER)
        if response.status_code == 200 and response.json()["lastSeq"] >= 2:
            assert response.json()["status"] == "running"
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the turn never went live")


async def probe(
    client: httpx.AsyncClient, execution_id: str, headers: dict[str, str]
) -> dict[str, tuple[int, bytes, dict[str, str]]]:
    """The intruder's answers on every turn route, each bounded (a 204 must not wait)."""
    requests = {
        "stream": client.get(url(execution_id, "/stream"), headers=headers),
        "stream after": client.get(
            url(execution_id, "/stream"), headers={**headers, "Last-Event-ID": "1"}
        ),
        "stream sse": client.get(url(execution_id, "/stream?format=sse"), headers=headers),
        "status": client.get(url(execution_id), headers=headers),
        "cancel": client.post(url(execution_id, "/cancel"), json={}, headers=headers),
    }
    answers = {}
    for name, pending in requests.items():
        answers[name] = answer(await asyncio.wait_for(pending, timeout=2))
    return answers


def assert_like_unknown(
    seen: dict[str, tuple[int, bytes, dict[str, str]]],
    unknown: dict[str, tuple[int, bytes, dict[str, str]]],
) -> None:
    assert seen == unknown
    assert seen["stream"][0] == 204
    assert seen["status"][0] == 404
    assert seen["cancel"][0] == 404


@pytest.mark.parametrize("intruder", INTRUDERS)
async def test_a_live_turn_answers_like_an_unknown_one(
    client: httpx.AsyncClient, intruder: str
) -> None:
    headers = INTRUDERS[intruder]
    sid = session()
    execution_id = f"demo:{sid}:0"
    turn = asyncio.create_task(client.post("/chat", json=chat_body(sid), headers=OWNER))
    await wait_until_live(client, execution_id)

    seen = await probe(client, execution_id, headers)
    unknown = await probe(client, f"demo:{session()}:0", headers)
    assert_like_unknown(seen, unknown)

    # The intruder's cancel had no effect: the owner's turn runs to its end.
    owner = await asyncio.wait_for(turn, timeout=10)
    assert owner.headers["x-turn-mode"] == "fresh"
    assert_completed(owner.content, "hello there")
    status = (await client.get(url(execution_id), headers=OWNER)).json()
    assert status["status"] == "completed"
    assert status["cancelRequested"] is False


@pytest.mark.parametrize("intruder", INTRUDERS)
async def test_a_finished_turn_answers_like_an_unknown_one(
    client: httpx.AsyncClient, intruder: str
) -> None:
    headers = INTRUDERS[intruder]
    sid = session()
    execution_id = f"demo:{sid}:0"
    owner = await client.post("/chat", json=chat_body(sid), headers=OWNER)
    assert_completed(owner.content, "hello there")

    seen = await probe(client, execution_id, headers)
    unknown = await probe(client, f"demo:{session()}:0", headers)
    assert_like_unknown(seen, unknown)

    # The owner still sees the whole turn.
    replay = await client.get(url(execution_id, "/stream"), headers=OWNER)
    assert replay.status_code == 200
    assert replay.content == owner.content


@pytest.mark.parametrize("message", ["hello there", "something else entirely"])
async def test_another_tenant_posting_the_same_turn_gets_a_run_of_its_own(
    client: httpx.AsyncClient, message: str
) -> None:
    sid = session()
    execution_id = f"demo:{sid}:0"
    first = asyncio.create_task(client.post("/chat", json=chat_body(sid), headers=OWNER))
    await wait_until_live(client, execution_id)

    theirs = await asyncio.wait_for(
        client.post("/chat", json=chat_body(sid, message), headers=OTHER_TENANT), timeout=10
    )
    # Not "joined": the same execution id names a different run in another tenant.
    assert theirs.headers["x-turn-mode"] == "fresh"
    assert theirs.headers["x-execution-id"] == execution_id
    assert_completed(theirs.content, message)

    mine = await asyncio.wait_for(first, timeout=10)
    assert_completed(mine.content, "hello there")
    # Each run started its own producer once, and each status shows only its own text.
    for headers, text_of in ((OWNER, "hello there"), (OTHER_TENANT, message)):
        calls = await client.get(
            "/debug/producer-calls", params={"executionId": execution_id}, headers=headers
        )
        assert calls.json()["calls"] == 1
        status = (await client.get(url(execution_id), headers=headers)).json()
        assert status["finalText"] == "".join(fake_reply(text_of, TOKENS))
    # A replay in the other tenant is its own log, byte for byte.
    again = await client.post("/chat", json=chat_body(sid, message), headers=OTHER_TENANT)
    assert again.headers["x-turn-mode"] == "replayed"
    assert again.content == theirs.content


@pytest.mark.parametrize("live", [True, False], ids=["live", "finished"])
async def test_another_user_posting_the_same_turn_gets_a_run_of_their_own(
    client: httpx.AsyncClient, live: bool
) -> None:
    # Same tenant, same session and turn, another user: the user is part of what names a
    # run, so bob gets a fresh run of his own — neither alice's answer (joined or replayed)
    # nor a 409 that would tell him her turn exists.
    sid = session()
    execution_id = f"demo:{sid}:0"
    first = asyncio.create_task(client.post("/chat", json=chat_body(sid), headers=OWNER))
    if live:
        await wait_until_live(client, execution_id)
    else:
        await first
    his = await asyncio.wait_for(
        client.post("/chat", json=chat_body(sid, "something else"), headers=OTHER_USER),
        timeout=10,
    )
    assert (his.status_code, his.headers["x-turn-mode"]) == (200, "fresh")
    assert his.headers["x-execution-id"] == execution_id  # the same name, another run
    assert_completed(his.content, "something else")
    assert "hello" not in his.text  # nothing of alice's run
    mine = await asyncio.wait_for(first, timeout=10)
    assert mine.headers["x-turn-mode"] == "fresh"
    assert_completed(mine.content, "hello there")
    for headers in (OWNER, OTHER_USER):
        calls = await client.get(
            "/debug/producer-calls", params={"executionId": execution_id}, headers=headers
        )
        assert calls.json()["calls"] == 1
