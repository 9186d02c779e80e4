"""The pump driving a reconnect adapter: handles, re-attach, takeover, sweeper, cancel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from tests._helpers import collect, ndjson, text_of, wait_for
from tests._substrate import SteppedAdapter, SteppedRun, SteppedSubstrate
from turnstream import MemoryStore, RunKey, Supervisor, TurnIdentity, handle_chat_turn
from turnstream._framing import StreamFormat
from turnstream._handler import stream_run

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", "proj:s1:0", "u1")
INPUT = {"message": "hi"}



def logged_at_least(store: MemoryStore, seq: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        run = await store.get_run(KEY)
        return run is not None and run.last_seq >= seq

    return check


async def started_run(substrate: SteppedSubstrate) -> SteppedRun:
    with anyio.fail_after(5):
        while KEY.execution_id not in substrate.runs:
            await anyio.sleep(0.005)
    return substrate.runs[KEY.execution_id]


async def test_adapter_turn_logs_substrate_ids_scoped_by_attempt_and_persists_the_handle() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    adapter = SteppedAdapter(substrate)
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(IDENTITY, INPUT, supervisor=sup, adapter=adapter)
        assert result.mode == "fresh"
        run = await started_run(substrate)
        run.say("Hello ", "world")
        run.end()
        events = ndjson(await collect(result))
    # The substrate's own id, behind its attempt: "1/e0" can never meet the id an event of
    # another attempt or namespace gets.
    assert [e["eventId"] for e in events] == ["ts:started", "1/e0", "1/e1", "1/e2", "ts:terminal"]
    assert events[-1]["finalText"] == "Hello world" == run.text
    record = await store.get_run(KEY)
    assert record is not None
    assert record.handle == {"kind": "stepped", "runId": "proj:s1:0", "data": {}}
    assert substrate.starts == 1


async def test_a_broken_substrate_stream_is_re_attached_without_gap_or_duplicate() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=sup, adapter=SteppedAdapter(substrate)
        )
        run = await started_run(substrate)
        run.break_after = 2
        run.say("a ", "b ", "c ", "d ")
        run.end()
        events = ndjson(await collect(result))
    assert text_of(events) == "a b c d " == events[-1]["finalText"]
    assert substrate.starts == 1
    assert substrate.attaches == ["e2"]  # after the last event it had seen (e1, e2 sent)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_takeover_by_another_worker_re_attaches_after_the_last_logged_event() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    adapter_a, adapter_b = SteppedAdapter(substrate), SteppedAdapter(substrate)
    # Worker A never renews its lease: it is the SIGSTOPped / dead owner.
    async with Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as a, Supervisor(
        store, lease_ms=2000, adapters=[adapter_b]
    ) as b:
        await handle_chat_turn(IDENTITY, INPUT, supervisor=a, adapter=adapter_a)
        run = await started_run(substrate)
        run.say("one ", "two ")
        await wait_for(logged_at_least(store, 4))
        store.expire_lease(KEY)
        resumed = await handle_chat_turn(IDENTITY, INPUT, supervisor=b, adapter=adapter_b)
        assert resumed.mode == "resumed"
        run.say("three")
        run.end()
        events = ndjson(await collect(resumed))

        async def a_stopped() -> bool:
            return not a.owns(KEY)

        await wait_for(a_stopped)
    assert text_of(events) == "one two three" == events[-1]["finalText"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["eventId"] for e in events}) == len(events)
    assert "session.run.restarted" not in [e["type"] for e in events]
    assert substrate.starts == 1
    assert substrate.attaches[-1] == "e2"


async def test_the_sweeper_recovers_an_orphan_with_no_request() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    dead = Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000)
    await dead.start()
    await handle_chat_turn(IDENTITY, INPUT, supervisor=dead, adapter=SteppedAdapter(substrate))
    run = await started_run(substrate)
    run.say("x ")
    await wait_for(logged_at_least(store, 3))
    async with Supervisor(
        store, lease_ms=200, adapters=[SteppedAdapter(substrate)], sweep_interval_ms=20
    ) as sweeper:

        async def recovered() -> bool:
            return sweeper.owns(KEY)

        await wait_for(recovered)
        run.say("y")
        run.end()

        async def finished() -> bool:
            record = await store.get_run(KEY)
            return record is not None and record.status.finished

        await wait_for(finished)
    record = await store.get_run(KEY)
    assert record is not None and record.final_text == "x y"
    assert substrate.starts == 1
    dead.shutdown_grace_s = 0
    await dead.aclose()


async def test_a_reader_on_a_dead_owners_run_re_attaches_through_its_worker() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    dead = Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000)
    await dead.start()
    await handle_chat_turn(IDENTITY, INPUT, supervisor=dead, adapter=SteppedAdapter(substrate))
    run = await started_run(substrate)
    run.say("p ")
    await wait_for(logged_at_least(store, 3))
    # This worker has no sweeper work to do (huge interval): only its reader can recover.
    async with Supervisor(
        store, lease_ms=200, adapters=[SteppedAdapter(substrate)], sweep_interval_ms=10_000_000
    ) as other:
        joined = stream_run(other, KEY, fmt=StreamFormat.NDJSON, after=2, mode="joined")

        async def finish_later() -> None:
            await wait_for(lambda: _owned(other))
            run.say("q")
            run.end()

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_later)
            with anyio.fail_after(10):
                events = ndjson(await collect(joined))
    assert [e["seq"] for e in events] == list(range(3, 3 + len(events)))
    assert events[-1]["finalText"] == "p q"
    dead.shutdown_grace_s = 0
    await dead.aclose()


async def _owned(supervisor: Supervisor) -> bool:
    return supervisor.owns(KEY)


async def test_cancel_calls_the_adapter_and_checkpoints_partial_text() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=sup, adapter=SteppedAdapter(substrate)
        )
        run = await started_run(substrate)
        run.say("partial ")
        await wait_for(logged_at_least(store, 3))
        assert await sup.cancel(KEY)
        events = ndjson(await collect(result))
    assert events[-1]["type"] == "session.run.cancelled"
    assert events[-1]["finalText"] == "partial "
    assert substrate.cancels >= 1
    assert run.state == "cancelled"


@pytest.mark.parametrize(
    ("state", "terminal", "code"),
    [("failed", "session.run.failed", "sandbox_crashed"),
     ("cancelled", "session.run.cancelled", None)],
)
async def test_substrate_outcomes_end_the_turn(state: str, terminal: str, code: Any) -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=sup, adapter=SteppedAdapter(substrate)
        )
        run = await started_run(substrate)
        run.say("so far ")
        run.end(state)
        events = ndjson(await collect(result))
    assert events[-1]["type"] == terminal
    assert events[-1]["finalText"] == "so far "
    if code is not None:
        assert events[-2]["type"] == "error" and events[-2]["code"] == code


async def test_takeover_before_a_handle_was_logged_restarts_with_scoped_ids() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()

    class NoHandleYet(SteppedAdapter):
        """Dies (parks forever) before yielding its first event: no handle is persisted."""

        async def start(self, request: Any) -> Any:
            await anyio.sleep_forever()
            yield  # pragma: no cover

    async with Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as a, Supervisor(
        store, lease_ms=2000
    ) as b:
        await handle_chat_turn(IDENTITY, INPUT, supervisor=a, adapter=NoHandleYet(substrate))
        await wait_for(logged_at_least(store, 1))
        store.expire_lease(KEY)
        adapter = SteppedAdapter(substrate)
        again = await handle_chat_turn(IDENTITY, INPUT, supervisor=b, adapter=adapter)
        assert again.mode == "restarted"
        run = await started_run(substrate)
        run.say("fresh")
        run.end()
        events = ndjson(await collect(again))
        a.shutdown_grace_s = 0
    assert [e["type"] for e in events][:2] == ["session.run.started", "session.run.restarted"]
    assert [e["eventId"] for e in events][2:-1] == ["2/e0", "2/e1"]
    assert events[-1]["finalText"] == "fresh"
