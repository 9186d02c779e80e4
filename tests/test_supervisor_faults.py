"""A supervisor that never dies of someone else's error, and keeps its promises to hooks.

Regression tests: a raising ``wait_until`` or sweeper call once killed the supervisor's task
group (every turn then ended ``owner_lost``); persistence was cancelled by shutdown and never
ran for recovered runs; ids of two namespaces collided; handle-less orphans stayed running
forever; a per-request adapter instance was a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import anyio
import orjson
import pytest

from tests._helpers import WordProducer, collect, ndjson, text_of, wait_for
from tests._substrate import SteppedAdapter, SteppedSubstrate
from turnstream import (
    MemoryStore,
    RunKey,
    RunStatus,
    Supervisor,
    TurnCompletion,
    TurnContext,
    TurnHooks,
    TurnIdentity,
    canonical_input_hash,
    handle_chat_turn,
)

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", "proj:s1:0", "u1")
INPUT = {"message": "hi"}


def identity(turn: int) -> TurnIdentity:
    return TurnIdentity("t1", "proj", "s1", "u1", turn)



class Persisted:
    """A persistence hook that records what it was given (and may be slow or fail)."""

    def __init__(self, *, delay: float = 0.0, failures: int = 0) -> None:
        self.delay = delay
        self.failures = failures
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, completion: TurnCompletion, text: str) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("the database is down")
        self.calls.append((completion.execution_id, completion.status, text))


async def test_a_raising_wait_until_harms_no_other_turn(caplog: pytest.LogCaptureFixture) -> None:
    async def flush() -> None:
        pass

    def wait_until(awaitable: Awaitable[None]) -> None:
        raise RuntimeError("no background tasks here")

    hooks = TurnHooks(trace_flush=flush, wait_until=wait_until)
    producer = WordProducer(words=3)
    async with Supervisor(MemoryStore()) as supervisor:
        with caplog.at_level(logging.ERROR, logger="turnstream.supervisor"):
            for turn in range(3):
                result = await handle_chat_turn(
                    identity(turn), INPUT, supervisor=supervisor, produce=producer, hooks=hooks
                )
                events = ndjson(await collect(result))
                assert events[-1]["type"] == "session.run.completed", events
            await anyio.sleep(0.05)
        assert supervisor.started
    assert producer.calls == 3
    assert any("wait_until failed" in r.getMessage() for r in caplog.records)


async def test_a_broken_sweeper_call_harms_no_turn(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()

    async def broken(**kwargs: Any) -> list[RunKey]:
        raise RuntimeError("a bug in a store")

    store.lapsed_runs = broken  # type: ignore[method-assign]
    async with Supervisor(store, lease_ms=60, sweep_interval_ms=10) as supervisor:
        with caplog.at_level(logging.ERROR, logger="turnstream.supervisor"):
            await anyio.sleep(0.1)  # several sweeps fail
            result = await handle_chat_turn(
                IDENTITY, INPUT, supervisor=supervisor, produce=WordProducer(words=3, delay=0.05)
            )
            events = ndjson(await collect(result))
        assert supervisor.started
    assert events[-1]["type"] == "session.run.completed"
    assert any("sweeper failed" in r.getMessage() for r in caplog.records)


async def test_shutdown_waits_for_persistence_within_the_grace_period() -> None:
    persisted = Persisted(delay=0.3)
    store = MemoryStore()
    supervisor = Supervisor(
        store, shutdown_grace_s=5, hooks=TurnHooks(persist_assistant_message=persisted)
    )
    await supervisor.start()
    result = await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=WordProducer(3))
    await collect(result)
    await supervisor.aclose()  # the hook has 0.3 s of its 5 s left to run
    assert persisted.calls == [("proj:s1:0", "completed", "w0 w1 w2 ")]
    run = await store.get_run(KEY)
    assert run is not None and run.persist_pending is False


async def test_a_persistence_that_failed_is_retried_by_a_sweeper() -> None:
    store = MemoryStore()
    failing = Persisted(failures=3)  # every try of the owner fails
    retrying = Persisted()
    async with (
        Supervisor(
            store, hooks=TurnHooks(persist_assistant_message=failing), persist_after_ms=50
        ) as owner,
        Supervisor(
            store,
            hooks=TurnHooks(persist_assistant_message=retrying),
            persist_after_ms=50,
            sweep_interval_ms=20,
        ),
    ):
        await collect(
            await handle_chat_turn(IDENTITY, INPUT, supervisor=owner, produce=WordProducer(2))
        )

        async def persisted() -> bool:
            run = await store.get_run(KEY)
            return run is not None and not run.persist_pending

        await wait_for(persisted)
    assert failing.calls == []
    assert retrying.calls == [("proj:s1:0", "completed", "w0 w1 ")]


async def test_turns_take_the_supervisors_hooks_and_so_do_recovered_runs() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    persisted = Persisted()
    hooks = TurnHooks(persist_assistant_message=persisted)
    async with (
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as dying,
        Supervisor(
            store,
            lease_ms=2000,
            adapters=[SteppedAdapter(substrate)],
            hooks=hooks,
            sweep_interval_ms=20,
        ) as survivor,
    ):
        # A plain turn: no hooks= given, the supervisor's apply.
        await collect(
            await handle_chat_turn(identity(1), INPUT, supervisor=survivor, produce=WordProducer(1))
        )
        # A substrate turn whose owner dies; the sweeper re-attaches it with its own hooks.
        await handle_chat_turn(IDENTITY, INPUT, supervisor=dying, adapter=SteppedAdapter(substrate))
        with anyio.fail_after(5):
            while KEY.execution_id not in substrate.runs:
                await anyio.sleep(0.01)
        run = substrate.runs[KEY.execution_id]
        run.say("after ")
        store.expire_lease(KEY)  # the owner is gone (it never renews)

        async def resumed() -> bool:
            return survivor.owns(KEY)

        await wait_for(resumed)
        run.say("death")
        run.end()

        async def persisted_both() -> bool:
            return len(persisted.calls) == 2

        await wait_for(persisted_both)
        dying.shutdown_grace_s = 0
    assert sorted(persisted.calls) == [
        ("proj:s1:0", "completed", "after death"),
        ("proj:s1:1", "completed", "w0 "),
    ]


async def test_given_ids_and_generated_ids_never_collide() -> None:
    async def produce(context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        yield {"type": "text-delta", "delta": "A "}
        yield {"type": "text-delta", "delta": "B ", "eventId": "3"}  # a producer's own id
        yield {"type": "text-delta", "delta": "C "}  # the third event: generated id
        yield {"type": "text-delta", "delta": "D ", "eventId": "1.3"}

    async with Supervisor(MemoryStore()) as supervisor:
        events = ndjson(
            await collect(
                await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=produce)
            )
        )
    assert text_of(events) == "A B C D " == events[-1]["finalText"]
    assert [e["eventId"] for e in events[1:-1]] == ["1.1", "1/3", "1.3", "1/1.3"]


async def test_a_local_orphan_nobody_came_back_for_is_ended_by_the_sweeper() -> None:
    store = MemoryStore()
    producer = WordProducer(words=10, delay=0.02)
    producer.gate = anyio.Event()  # the owner's producer hangs: then the owner dies
    async with (
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as dying,
        Supervisor(store, lease_ms=2000, orphan_after_ms=200, sweep_interval_ms=20),
    ):
        await handle_chat_turn(IDENTITY, INPUT, supervisor=dying, produce=producer)

        async def two_logged() -> bool:
            run = await store.get_run(KEY)
            return run is not None and run.last_seq >= 3

        await wait_for(two_logged)
        store.expire_lease(KEY)

        async def ended() -> bool:
            run = await store.get_run(KEY)
            return run is not None and run.status.finished

        await wait_for(ended)
        record = await store.get_run(KEY)
        assert record is not None and record.status is RunStatus.FAILED
        lapsed_for = (record.finished_at_ms or 0) - record.created_at_ms
        assert lapsed_for >= 200  # not before its grace
        log = [e.payload() for e in await store.read(KEY)]
        producer.gate.set()
        dying.shutdown_grace_s = 0
    assert log[-2] == {
        "type": "error",
        "code": "owner_lost",
        "message": "the worker running this turn stopped",
        "retryable": True,
        "eventId": "ts:error:1",
        "seq": log[-2]["seq"],
    }
    assert log[-1]["type"] == "session.run.failed"
    assert log[-1]["finalText"] == "w0 w1 " == record.final_text
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    assert producer.calls == 1


async def test_an_adapter_built_per_request_works_and_resumes() -> None:
    store, substrate = MemoryStore(), SteppedSubstrate()
    async with (
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as dying,
        Supervisor(store, lease_ms=2000) as survivor,
    ):
        first = await handle_chat_turn(
            identity(1), INPUT, supervisor=survivor, adapter=SteppedAdapter(substrate)
        )
        with anyio.fail_after(5):
            while "proj:s1:1" not in substrate.runs:
                await anyio.sleep(0.01)
        substrate.runs["proj:s1:1"].end()
        assert ndjson(await collect(first))[-1]["type"] == "session.run.completed"

        await handle_chat_turn(IDENTITY, INPUT, supervisor=dying, adapter=SteppedAdapter(substrate))
        with anyio.fail_after(5):
            while KEY.execution_id not in substrate.runs:
                await anyio.sleep(0.01)
        substrate.runs[KEY.execution_id].say("x ")
        store.expire_lease(KEY)
        # Another new instance of the same adapter: a resume, not a restart and not a 500.
        again = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=survivor, adapter=SteppedAdapter(substrate)
        )
        assert again.mode == "resumed"
        substrate.runs[KEY.execution_id].end()
        events = ndjson(await collect(again))
        dying.shutdown_grace_s = 0
    assert events[-1]["type"] == "session.run.completed"
    assert substrate.starts == 2


@pytest.mark.parametrize("fmt", ["ndjson", "ai-sdk"])
async def test_a_turn_whose_first_owner_logged_nothing_starts_its_log_when_restarted(
    fmt: str,
) -> None:
    # The first owner died between its begin and its first event: its attempt left an empty
    # log. The restart then starts the log (session.run.started, attempt 2), not with a
    # session.run.restarted that no started precedes (an AI SDK client got no `start`).
    store = MemoryStore()
    begun = await store.begin(
        KEY, input_hash=canonical_input_hash(INPUT), user_id="u1", holder="dead", lease_ms=10
    )
    assert begun.lease is not None
    store.expire_lease(KEY)
    producer = WordProducer(words=2)
    async with Supervisor(store) as supervisor:
        result = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=supervisor, produce=producer, format=fmt
        )
        assert result.mode == "restarted"
        body = await collect(result)
        log = [e.payload() for e in await store.read(KEY)]
    assert [e["type"] for e in log] == [
        "session.run.started",
        "text-delta",
        "text-delta",
        "session.run.completed",
    ]
    assert log[0]["attempt"] == 2 and log[-1]["finalText"] == "w0 w1 "
    if fmt == "ai-sdk":
        chunks = [
            orjson.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")
        ]
        assert [c["type"] for c in chunks][:2] == ["start", "start-step"]
        assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "w0 w1 "
