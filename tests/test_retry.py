"""Retrying a failed turn: posting it again starts a new attempt when its error was
retryable (or ``retry=True``), in the same log after the failed attempt; otherwise it replays
the failure. On the memory store and a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest

from tests._helpers import collect, ndjson, text_of
from turnstream import (
    MemoryStore,
    RedisStore,
    RunKey,
    Supervisor,
    TurnContext,
    TurnIdentity,
    handle_chat_turn,
)
from turnstream._framing import StreamFormat
from turnstream._handler import stream_run


class Flaky:
    """Fails its first ``failures`` attempts (retryably unless ``fatal``), then answers."""

    def __init__(self, failures: int = 1, *, fatal: bool = False, gate: bool = False) -> None:
        self.failures = failures
        self.fatal = fatal
        self.calls: list[int] = []
        self.gate = anyio.Event() if gate else None

    async def __call__(self, ctx: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        self.calls.append(ctx.attempt)
        yield {"type": "text-delta", "delta": f"try {ctx.attempt} "}
        if len(self.calls) <= self.failures:
            if self.fatal:
                yield {"type": ""}  # an invalid event: invalid_event, not retryable
            raise RuntimeError("the model broke")  # producer_error, retryable
        if self.gate is not None:
            await self.gate.wait()
        yield {"type": "text-delta", "delta": "done"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def supervisor(request: pytest.FixtureRequest) -> AsyncIterator[Supervisor]:
    if request.param == "redis":
        store: Any = RedisStore.from_url(request.getfixturevalue("redis_server").url)
    else:
        store = MemoryStore()
    async with Supervisor(store, lease_ms=2000) as s:
        yield s
    if request.param == "redis":
        await store.aclose()


class Turn:
    """One turn of a test (the Redis server is the session's: each test has its own id)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.identity = TurnIdentity("t1", "proj", f"s-{uuid.uuid4().hex}", "u1", 0)
        self.key = RunKey("t1", self.identity.execution_id, "u1")

    async def post(self, producer: Flaky, **kwargs: Any) -> tuple[str, list[Any]]:
        result = await handle_chat_turn(
            self.identity, {"message": "hi"}, supervisor=self.supervisor, produce=producer,
            **kwargs,
        )  # fmt: skip
        with anyio.fail_after(10):
            return result.mode, ndjson(await collect(result))


@pytest.fixture
def turn(supervisor: Supervisor) -> Turn:
    return Turn(supervisor)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_a_retryable_failure_is_retried_in_the_same_log(turn: Turn) -> None:
    producer = Flaky()
    mode, failed = await turn.post(producer)
    assert mode == "fresh"
    assert types(failed) == ["session.run.started", "text-delta", "error", "session.run.failed"]
    assert failed[2]["retryable"] is True

    mode, retried = await turn.post(producer)
    assert mode == "restarted"
    # The failed attempt, its error, then the new attempt; the superseded terminal is left
    # out, so the stream ends with the new attempt's end only (a seq gap where it was).
    assert types(retried) == [
        "session.run.started", "text-delta", "error",
        "session.run.restarted", "text-delta", "text-delta", "session.run.completed",
    ]  # fmt: skip
    assert [e["seq"] for e in retried] == [1, 2, 3, 5, 6, 7, 8]
    assert retried[3]["attempt"] == 2
    assert retried[-1]["finalText"] == "try 2 done" == text_of(retried[4:])
    assert retried[-1]["eventId"] == "ts:terminal:2"  # not the failed attempt's id
    assert producer.calls == [1, 2]

    mode, replayed = await turn.post(producer)
    assert (mode, replayed) == ("replayed", retried)
    assert producer.calls == [1, 2]
    record = await turn.supervisor.store.get_run(turn.key)
    assert record is not None
    assert (record.status.value, record.attempt, record.final_text) == (
        "completed",
        2,
        "try 2 done",
    )


async def test_a_client_that_saw_the_failure_resumes_after_it(turn: Turn) -> None:
    producer = Flaky()
    _, failed = await turn.post(producer)
    await turn.post(producer)
    resumed = stream_run(
        turn.supervisor, turn.key, fmt=StreamFormat.NDJSON, after=failed[-1]["seq"], mode="joined"
    )
    events = ndjson(await collect(resumed))
    assert types(events) == [
        "session.run.restarted", "text-delta", "text-delta", "session.run.completed"
    ]  # fmt: skip


@pytest.mark.parametrize(("fatal", "retry", "retried"), [
    (True, None, False),  # invalid_event: the same input would fail the same way
    (True, True, True),  # the app forces it
    (False, False, False),  # the app forbids it
])  # fmt: skip
async def test_when_a_failure_is_retried(
    turn: Turn, fatal: bool, retry: bool | None, retried: bool
) -> None:
    producer = Flaky(fatal=fatal)
    _, failed = await turn.post(producer)
    assert failed[-2]["retryable"] is not fatal
    mode, events = await turn.post(producer, retry=retry)
    if retried:
        assert mode == "restarted"
        assert events[-1]["type"] == "session.run.completed"
        assert producer.calls == [1, 2]
    else:
        assert (mode, events) == ("replayed", failed)
        assert producer.calls == [1]


async def test_two_tabs_retrying_at_once_start_one_attempt(turn: Turn) -> None:
    producer = Flaky(gate=True)
    await turn.post(producer)
    first = asyncio.create_task(turn.post(producer))
    with anyio.fail_after(5):
        while len(producer.calls) < 2:
            await anyio.sleep(0.01)
    second = asyncio.create_task(turn.post(producer))
    await anyio.sleep(0.05)
    assert producer.gate is not None
    producer.gate.set()
    (mode_one, one), (mode_two, two) = await first, await second
    assert (mode_one, mode_two) == ("restarted", "joined")
    assert one == two
    assert producer.calls == [1, 2]


async def test_the_ai_sdk_stream_of_a_retry_shows_the_new_attempt_only(turn: Turn) -> None:
    producer = Flaky()
    await turn.post(producer)
    result = await handle_chat_turn(
        turn.identity, {"message": "hi"}, supervisor=turn.supervisor, produce=producer,
        format="ai-sdk",
    )  # fmt: skip
    body = (await collect(result)).decode()
    assert "try 2 done" not in body  # deltas are separate chunks
    assert '"delta":"try 2 "' in body and '"delta":"done"' in body
    assert "try 1" not in body and "the model broke" not in body
    assert body.rstrip().endswith("data: [DONE]")
