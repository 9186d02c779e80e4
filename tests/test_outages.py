"""Store outages under a live turn: ride them out, or end the turn properly — never abandon it.

Regression tests for turns that a worker used to give up on when its store failed three calls
in a row (a Redis restart, lost replies, a stall): the run stayed ``running`` with no terminal
event and the next retry called the model a second time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from tests._flaky import FlakyStore
from tests._helpers import WordProducer, collect, ndjson, text_of, wait_for
from turnstream import (
    MemoryStore,
    RunKey,
    RunStatus,
    Supervisor,
    TurnIdentity,
    TurnStore,
    handle_chat_turn,
)

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", "proj:s1:0", "u1")
INPUT = {"message": "hi"}



def logged_at_least(store: TurnStore, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        run = await store.get_run(KEY)
        return run is not None and run.last_seq >= n

    return check


def assert_whole_log(events: list[dict[str, object]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["eventId"] for e in events}) == len(events)
    assert events[0]["type"] == "session.run.started"
    terminals = [
        e
        for e in events
        if str(e["type"]).startswith("session.run.")
        and e["type"] in ("session.run.completed", "session.run.failed", "session.run.cancelled")
    ]
    assert terminals == [events[-1]]


async def test_an_outage_longer_than_the_lease_loses_nothing_and_calls_the_model_once() -> None:
    memory = MemoryStore()
    store = FlakyStore(memory)
    producer = WordProducer(words=30, delay=0.02)
    async with Supervisor(store, lease_ms=300, store_retry_s=10) as supervisor:  # type: ignore[arg-type]
        result = await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=producer)
        await wait_for(logged_at_least(memory, 5))
        store.down = True  # appends and renewals fail; the lease lapses in the store
        await anyio.sleep(0.8)
        run = await memory.get_run(KEY)
        assert run is not None and not run.lease_live and run.status is RunStatus.RUNNING
        store.down = False
        with anyio.fail_after(10):
            events = ndjson(await collect(result))
        replay = ndjson(
            await collect(
                await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=producer)
            )
        )
    assert store.failures["append_batch"] > 0 and store.failures["renew_batch"] > 0
    assert_whole_log(events)
    assert events[-1]["type"] == "session.run.completed"
    assert text_of(events) == producer.expected_text() == events[-1]["finalText"]
    assert replay == events
    assert producer.calls == 1


async def test_lost_replies_of_every_write_neither_duplicate_nor_end_the_turn() -> None:
    memory = MemoryStore()
    store = FlakyStore(memory)
    producer = WordProducer(words=12, delay=0.01)
    # Each of these lands, then its reply is lost: the pump must resend, not re-log.
    store.lose_replies.update({"append_batch": 4, "finish": 2, "renew_batch": 2})
    async with Supervisor(store, lease_ms=300) as supervisor:  # type: ignore[arg-type]
        result = await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=producer)
        with anyio.fail_after(10):
            events = ndjson(await collect(result))
    assert store.failures["append_batch"] == 4 and store.failures["finish"] == 2
    assert_whole_log(events)
    assert events[-1]["type"] == "session.run.completed"
    assert text_of(events) == producer.expected_text()
    assert ndjson(b"".join(e.to_json() + b"\n" for e in await memory.read(KEY))) == events
    assert producer.calls == 1


async def test_an_outage_past_the_retry_budget_ends_the_turn_once_the_store_is_back() -> None:
    memory = MemoryStore()
    store = FlakyStore(memory)
    producer = WordProducer(words=50, delay=0.02)
    async with Supervisor(
        store,  # type: ignore[arg-type]
        lease_ms=300,
        store_retry_s=0.3,
        outage_notice_s=0.4,
    ) as supervisor:
        result = await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=producer)
        await wait_for(logged_at_least(memory, 5))
        store.down = True
        started = anyio.current_time()
        with anyio.fail_after(5):
            events = ndjson(await collect(result))
        noticed_after = anyio.current_time() - started
        # The local reader said so in-band, within its notice, and ended (not logged: no seq).
        assert events[-1] == {
            "type": "error",
            "code": "store_unavailable",
            "message": "the turn's log cannot be read right now; resume later",
            "retryable": True,
        }
        assert noticed_after < 2.0
        await anyio.sleep(0.5)
        run = await memory.get_run(KEY)
        assert run is not None and run.status is RunStatus.RUNNING  # nothing could be written
        store.down = False

        async def finished() -> bool:
            run = await memory.get_run(KEY)
            return run is not None and run.status.finished

        await wait_for(finished)
        # retry=False: read the failure back (by default this retryable one would start a
        # new attempt, tests/test_retry.py).
        replay = ndjson(
            await collect(
                await handle_chat_turn(
                    IDENTITY, INPUT, supervisor=supervisor, produce=producer, retry=False
                )
            )
        )
    assert_whole_log(replay)
    assert replay[-2]["type"] == "error" and replay[-2]["code"] == "store_unavailable"
    assert replay[-2]["retryable"] is True
    assert replay[-1]["type"] == "session.run.failed"
    assert replay[-1]["finalText"] == text_of(replay)  # the checkpoint is the fold of the log
    assert events[:-1] == replay[: len(events) - 1]  # what the reader saw was logged
    assert producer.calls == 1
    assert producer.closed == 1  # the model call was stopped, not left running


async def test_a_reader_on_a_black_holed_store_says_so_in_band() -> None:
    # A reader in another process: it blocks on the store, whose answers never come.
    memory = MemoryStore()
    store = FlakyStore(memory)
    producer = WordProducer(words=200, delay=0.02)
    async with (
        Supervisor(memory, lease_ms=2000) as owner,
        Supervisor(
            store,  # type: ignore[arg-type]
            lease_ms=2000,
            follow_block_ms=200,
            outage_notice_s=0.3,
        ) as elsewhere,
    ):
        await handle_chat_turn(IDENTITY, INPUT, supervisor=owner, produce=producer)
        await wait_for(logged_at_least(memory, 3))
        joined = await handle_chat_turn(IDENTITY, INPUT, supervisor=elsewhere, produce=producer)
        assert joined.mode == "joined"
        assert not isinstance(joined.body, bytes)
        frames = joined.body.__aiter__()
        first = await frames.__anext__()
        assert b'"seq":1' in first
        store.black_hole = True
        started = anyio.current_time()
        rest = [chunk async for chunk in frames]
        waited = anyio.current_time() - started
        store.black_hole = False
        owner.shutdown_grace_s = 0
    assert b'"code":"store_unavailable"' in rest[-1]
    assert waited < 0.2 + 0.3 + 1.0  # one block + the notice, with slack for a slow machine


async def test_a_turn_request_while_the_store_is_down_is_a_503_problem() -> None:
    store = FlakyStore(MemoryStore())
    async with Supervisor(store) as supervisor:  # type: ignore[arg-type]
        store.down = True
        result = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=supervisor, produce=WordProducer()
        )
        store.down = False
    assert result.status == 503
    assert result.media_type == "application/problem+json"
    assert result.headers["retry-after"] == "1"
