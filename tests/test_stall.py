"""The stall watch: a producer or substrate silent for ``stall_timeout_s`` does not hang a turn.

A local producer is stopped and the turn fails in-band (``error`` ``stalled``, retryable,
then ``session.run.failed`` with the text so far); a substrate is re-attached once after its
last event first. Silence that turnstream itself causes (a full outbox while the store is
slow) is not a stall.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import pytest

from tests._helpers import WordProducer, collect, ndjson, text_of
from turnstream import (
    Limits,
    MemoryStore,
    RunKey,
    Supervisor,
    TurnContext,
    TurnIdentity,
    TurnstreamError,
    handle_chat_turn,
)
from turnstream._store import AppendRequest
from turnstream.testing import FakeSubstrate

LEASE_MS = 90  # heartbeat every 30 ms: the watch looks that often
STALL_S = 0.25


def identity(session: str = "s1") -> TurnIdentity:
    return TurnIdentity("t1", "proj", session, "u1", 0)


async def silent_after_one(context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
    yield {"type": "text-delta", "delta": "half "}
    await anyio.sleep(3600)  # a model call that hangs without failing
    yield {"type": "text-delta", "delta": "never"}


async def run_turn(supervisor: Supervisor, **kwargs: Any) -> list[dict[str, Any]]:
    result = await handle_chat_turn(identity(), {"message": "hi"}, supervisor=supervisor, **kwargs)
    with anyio.fail_after(10):
        return ndjson(await collect(result))


async def test_a_silent_producer_fails_the_turn_stalled() -> None:
    async with Supervisor(MemoryStore(), lease_ms=LEASE_MS, stall_timeout_s=STALL_S) as s:
        started = anyio.current_time()
        events = await run_turn(s, produce=silent_after_one)
        took = anyio.current_time() - started
    assert [e["type"] for e in events] == [
        "session.run.started",
        "text-delta",
        "error",
        "session.run.failed",
    ]
    error = events[2]
    assert error["code"] == "stalled"
    assert error["retryable"] is True
    assert "0.25 s" in error["message"]
    assert events[-1]["finalText"] == "half "  # the text so far is the turn's
    assert took >= STALL_S


async def test_a_slow_producer_that_keeps_talking_is_not_stalled() -> None:
    producer = WordProducer(words=8, delay=STALL_S / 3)  # 8 x 83 ms: longer than the timeout
    async with Supervisor(MemoryStore(), lease_ms=LEASE_MS, stall_timeout_s=STALL_S) as s:
        events = await run_turn(s, produce=producer)
    assert events[-1]["type"] == "session.run.completed"
    assert text_of(events) == producer.expected_text()


class SlowStore(MemoryStore):
    """Appends that take longer than the stall timeout: the producer waits on us."""

    async def append_batch(
        self, requests: Sequence[AppendRequest]
    ) -> list[list[int] | TurnstreamError]:
        if any(e.type == "text-delta" for r in requests for e in r.events):
            await asyncio.sleep(STALL_S * 2)
        return await super().append_batch(requests)


async def test_a_producer_held_back_by_a_full_outbox_is_not_stalled() -> None:
    producer = WordProducer(words=4)
    limits = Limits(producer_buffer=1)  # the producer waits for room after every event
    async with Supervisor(
        SlowStore(), lease_ms=LEASE_MS, stall_timeout_s=STALL_S, limits=limits
    ) as s:
        events = await run_turn(s, produce=producer)
    assert events[-1]["type"] == "session.run.completed", events
    assert text_of(events) == producer.expected_text()


async def test_no_stall_watch_when_it_is_off() -> None:
    async with Supervisor(MemoryStore(), lease_ms=LEASE_MS, stall_timeout_s=None) as s:
        result = await handle_chat_turn(
            identity(), {"message": "hi"}, supervisor=s, produce=silent_after_one
        )
        body = aiter(result.body)  # type: ignore[arg-type]
        with anyio.fail_after(5):
            assert b"session.run.started" in await anext(body)
            assert b"half" in await anext(body)
        with anyio.move_on_after(STALL_S * 3) as waited:
            await anext(body)
        assert waited.cancelled_caught  # still waiting on the producer: nothing gave up
        await body.aclose()  # type: ignore[attr-defined]
        assert await s.cancel(RunKey("t1", identity().execution_id, "u1"))  # ends it for the drain


async def test_a_silent_substrate_is_reattached_once_then_resumes() -> None:
    substrate = FakeSubstrate(tokens=4, manual=True)  # only execution.started is out
    adapter = substrate.adapter()
    async with Supervisor(
        MemoryStore(), lease_ms=LEASE_MS, stall_timeout_s=STALL_S, adapters=[adapter]
    ) as s:
        result = await handle_chat_turn(
            identity(), {"message": "hello"}, supervisor=s, adapter=adapter
        )

        async def release_after_the_reattach() -> None:
            while substrate.attach_calls == 0:
                await anyio.sleep(0.01)
            substrate.release(identity().execution_id)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_after_the_reattach)
                events = ndjson(await collect(result))
    assert substrate.attach_calls == 1
    assert substrate.runs_started == 1  # re-attached, not started again
    assert events[-1]["type"] == "session.run.completed"
    assert text_of(events) == substrate.expected_text("hello")  # every delta once


async def test_a_substrate_silent_after_the_reattach_fails_the_turn_stalled() -> None:
    substrate = FakeSubstrate(tokens=4, manual=True)
    adapter = substrate.adapter()
    async with Supervisor(
        MemoryStore(), lease_ms=LEASE_MS, stall_timeout_s=STALL_S, adapters=[adapter]
    ) as s:
        events = await run_turn(s, adapter=adapter)
    assert substrate.attach_calls == 1  # one re-attach, then it gives up
    assert [e["type"] for e in events][-2:] == ["error", "session.run.failed"]
    assert events[-2]["code"] == "stalled"
    assert "substrate" in events[-2]["message"]


@pytest.mark.parametrize("bad", [0, -1.0])
def test_stall_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="stall_timeout_s"):
        Supervisor(MemoryStore(), stall_timeout_s=bad)
