"""The supervisor: fencing of a stale owner, restart of a producer, cancel, shutdown."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import anyio
import pytest

from tests._helpers import WordProducer, collect, ndjson, text_of, wait_for
from turnstream import (
    MemoryStore,
    NewEvent,
    RunKey,
    RunStatus,
    Supervisor,
    TurnIdentity,
    handle_chat_turn,
)

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", "proj:s1:0", "u1")



async def test_stale_owner_is_fenced_and_the_turn_restarts() -> None:
    store = MemoryStore()
    stale = WordProducer(words=5)
    stale.gate = anyio.Event()
    fresh = WordProducer(words=4)
    # A never renews (its heartbeat is far beyond its lease): it is the SIGSTOPped owner.
    async with Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as a, Supervisor(
        store, lease_ms=2000
    ) as b:
        first = await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=a, produce=stale)
        assert first.mode == "fresh"

        async def two_logged() -> bool:
            run = await store.get_run(KEY)
            return run is not None and run.last_seq >= 3

        await wait_for(two_logged)
        store.expire_lease(KEY)
        second = await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=b, produce=fresh)
        assert second.mode == "restarted"
        log = ndjson(await collect(second))
        stale.gate.set()  # the stale owner wakes up and tries to go on writing

        async def a_stopped() -> bool:
            return not a.owns(KEY)

        await wait_for(a_stopped)
        replay = ndjson(await collect(
            await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=b, produce=fresh)))
    types = [e["type"] for e in replay]
    assert types[0] == "session.run.started"
    restart_at = types.index("session.run.restarted")
    assert replay[restart_at]["attempt"] == 2
    after = replay[restart_at + 1 :]
    # Nothing of the stale attempt landed after the takeover.
    assert all(not e["eventId"].startswith("1.") for e in after)
    assert text_of(replay[:restart_at]) == "w0 w1 "
    assert text_of(after) == fresh.expected_text()
    assert replay[-1]["type"] == "session.run.completed"
    assert replay[-1]["finalText"] == fresh.expected_text()
    assert replay[-1]["attempt"] == 2
    assert [e["seq"] for e in replay] == list(range(1, len(replay) + 1))
    assert log == replay
    assert stale.calls == 1 and fresh.calls == 1


async def test_graceful_shutdown_releases_leases_for_an_immediate_takeover() -> None:
    store = MemoryStore()
    parked = WordProducer(words=5)
    parked.gate = anyio.Event()
    a = Supervisor(store, lease_ms=60_000, shutdown_grace_s=0.05)
    await a.start()
    result = await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=a, produce=parked)
    assert result.mode == "fresh"
    await a.aclose()
    run = await store.get_run(KEY)
    assert run is not None and not run.status.finished and not run.lease_live
    # With a 60 s lease, only the release lets another worker resume at once.
    again = WordProducer(words=2)
    async with Supervisor(store, lease_ms=60_000) as b:
        resumed = await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=b, produce=again)
        assert resumed.mode == "restarted"
        events = ndjson(await collect(resumed))
    assert events[-1]["finalText"] == again.expected_text()


async def test_shutdown_drains_running_turns_within_the_grace_period() -> None:
    store = MemoryStore()
    producer = WordProducer(words=5, delay=0.01)
    async with Supervisor(store, lease_ms=2000, shutdown_grace_s=5) as sup:
        await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=sup, produce=producer)
    run = await store.get_run(KEY)
    assert run is not None and run.status.value == "completed"
    assert run.final_text == producer.expected_text()


async def test_cancel_from_another_worker_reaches_the_owner_within_a_heartbeat() -> None:
    store = MemoryStore()
    producer = WordProducer(words=5)
    producer.gate = anyio.Event()
    async with Supervisor(store, lease_ms=150) as owner, Supervisor(store, lease_ms=150) as other:
        result = await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=owner, produce=producer)
        assert await other.cancel(KEY) is True
        assert not other.owns(KEY)
        with anyio.fail_after(5):
            events = ndjson(await collect(result))
    assert events[-1]["type"] == "session.run.cancelled"
    assert events[-1]["finalText"] == "w0 w1 "
    assert await other.cancel(KEY) is False  # finished: nothing to cancel


async def test_reader_of_a_dead_owners_run_does_not_wait_for_a_ttl() -> None:
    store = MemoryStore()
    producer = WordProducer(words=5)
    producer.gate = anyio.Event()
    dead = Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000)
    await dead.start()
    await handle_chat_turn(IDENTITY, {"m": 1}, supervisor=dead, produce=producer)
    async with Supervisor(store, lease_ms=100) as reader_side:
        from turnstream._framing import StreamFormat
        from turnstream._handler import stream_run

        joined = stream_run(reader_side, KEY, fmt=StreamFormat.NDJSON, after=0, mode="joined")
        with anyio.fail_after(5):  # a bound for a hang, not a timing assertion
            events = ndjson(await collect(joined))
    assert [e["type"] for e in events][:1] == ["session.run.started"]
    # No terminal event: an unlogged in-band error tells the client to retry the turn.
    assert events[-1] == {
        "type": "error",
        "code": "owner_lost",
        "message": "the worker running this turn stopped; retry the turn to restart it",
        "retryable": True,
    }
    assert events[-2]["type"] == "text-delta"
    producer.gate.set()
    dead.shutdown_grace_s = 0
    await dead.aclose()


async def test_a_renew_that_races_its_own_pumps_finish_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The heartbeat took its list of pumps, then the pump finished the run before the renew
    # reached the store: the store answers RunFinished, which is no error worth a traceback
    # (seen as "renewing the lease on … failed" in the SIGKILL end-to-end tests).
    store = MemoryStore()
    async with Supervisor(store, lease_ms=1000) as supervisor:
        begun = await supervisor.begin(KEY, input_hash="h", user_id="u1")
        assert begun.lease is not None
        terminal = NewEvent.build("ts:terminal", {"type": "session.run.completed"})
        await store.finish(
            KEY, begun.lease, status=RunStatus.COMPLETED, terminal=terminal, final_text=""
        )
        racing = SimpleNamespace(key=KEY, lease=begun.lease, finished=False, lost=False)
        with caplog.at_level(logging.WARNING, logger="turnstream.supervisor"):
            await supervisor._renew_all([racing])  # type: ignore[list-item]
    assert not racing.lost
    assert caplog.records == []


@pytest.mark.parametrize("name", ["heartbeat_ms", "follow_block_ms", "sweep_interval_ms"])
@pytest.mark.parametrize("value", [0, -5])
def test_a_loop_period_must_be_positive(name: str, value: int) -> None:
    # 0 made the heartbeat spin, and the other two quietly meant "the default".
    with pytest.raises(ValueError, match=name):
        Supervisor(MemoryStore(), **{name: value})
    assert getattr(Supervisor(MemoryStore(), **{name: 7}), name) == 7
