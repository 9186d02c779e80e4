"""``Supervisor(access=…)``: a turn belongs to its user (default) or to its tenant (shared).

The rest of the "user" side — another user's id answering byte for byte like an unknown one,
live and finished, on every route — is tests/test_isolation.py, on the demo.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from tests._chat_app import chat_app
from tests._helpers import WordProducer, ndjson, text_of
from turnstream import (
    MemoryStore,
    Principal,
    RunKey,
    Supervisor,
)

ALICE = {"X-User": "alice"}
BOB = {"X-User": "bob"}


def authorize(request: Request) -> Principal:
    return Principal("acme", request.headers["x-user"])


@pytest.fixture(params=["user", "tenant"])
async def env(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[httpx.AsyncClient, Supervisor, WordProducer]]:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000, access=request.param)
    producer = WordProducer(words=4)

    app = chat_app(supervisor, authorize, producer)
    async with supervisor, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client, supervisor, producer


def turn(message: str = "hi") -> dict[str, Any]:
    return {"sessionId": "s1", "turnIndex": 0, "message": message}


async def test_two_users_equal_session_ids(
    env: tuple[httpx.AsyncClient, Supervisor, WordProducer],
) -> None:
    client, supervisor, producer = env
    first = await client.post("/chat", json=turn(), headers=ALICE)
    assert first.headers["x-turn-mode"] == "fresh"
    second = await client.post("/chat", json=turn(), headers=BOB)
    status = await client.get("/turns/chat:s1:0", headers=BOB)
    if supervisor.access == "user":
        # Two runs under one execution id, one per user; each user sees their own.
        assert second.headers["x-turn-mode"] == "fresh"
        assert producer.calls == 2
        assert status.json()["status"] == "completed"
        alice = await supervisor.store.get_run(RunKey("acme", "chat:s1:0", "alice"))
        bob = await supervisor.store.get_run(RunKey("acme", "chat:s1:0", "bob"))
        assert alice is not None and bob is not None and alice.key != bob.key
        assert await supervisor.store.get_run(RunKey("acme", "chat:s1:0")) is None
    else:
        # A shared session: bob's POST of the same turn replays alice's, no second call.
        assert second.headers["x-turn-mode"] == "replayed"
        assert second.content == first.content
        assert producer.calls == 1
        assert status.json()["finalText"] == producer.expected_text()
        assert await supervisor.store.get_run(RunKey("acme", "chat:s1:0")) is not None


async def test_what_another_user_may_do_with_a_turn(
    env: tuple[httpx.AsyncClient, Supervisor, WordProducer],
) -> None:
    client, supervisor, producer = env
    await client.post("/chat", json=turn(), headers=ALICE)
    status = await client.get("/turns/chat:s1:0", headers=BOB)
    stream = await client.get("/turns/chat:s1:0/stream", headers=BOB)
    cancel = await client.post("/turns/chat:s1:0/cancel", json={}, headers=BOB)
    conflict = await client.post("/chat", json=turn("other words"), headers=BOB)
    if supervisor.access == "user":
        assert status.status_code == 404
        assert stream.status_code == 204
        assert cancel.status_code == 404
        assert conflict.headers["x-turn-mode"] == "fresh"  # his own run, never a 409
    else:
        assert status.status_code == 200
        assert text_of(ndjson(stream.content)) == producer.expected_text()
        assert cancel.status_code == 202
        assert conflict.status_code == 409  # one shared turn, another input


async def test_the_same_user_with_another_input_is_still_a_conflict(
    env: tuple[httpx.AsyncClient, Supervisor, WordProducer],
) -> None:
    client, _, _ = env
    await client.post("/chat", json=turn(), headers=ALICE)
    conflict = await client.post("/chat", json=turn("other words"), headers=ALICE)
    assert conflict.status_code == 409


def test_access_is_user_or_tenant() -> None:
    assert Supervisor(MemoryStore()).access == "user"
    with pytest.raises(ValueError, match="access"):
        Supervisor(MemoryStore(), access="everyone")  # type: ignore[arg-type]
