"""handle_chat_turn end to end on a store (memory and a real Redis): modes, replay, join."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import orjson
import pytest

from tests._helpers import WordProducer, collect, ndjson, text_of
from turnstream import (
    MemoryStore,
    RunKey,
    Supervisor,
    TurnCompletion,
    TurnHooks,
    TurnIdentity,
    TurnStore,
    handle_chat_turn,
)

StoreFactory = Callable[[], TurnStore]
KEY = RunKey("t1", "proj:s1:0", "u1")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Builds stores that share one backend (two supervisors on one Redis = two workers)."""
    created: list[TurnStore] = []
    if request.param == "memory":
        shared = MemoryStore()

        def factory() -> TurnStore:
            return shared
    else:
        from turnstream.stores.redis import RedisStore

        url = request.getfixturevalue("redis_server").url
        prefix = f"t-{uuid.uuid4().hex[:8]}"

        def factory() -> TurnStore:
            store = RedisStore.from_url(url, prefix=prefix)
            created.append(store)
            return store

    yield factory
    for store in created:
        await store.aclose()


def identity(turn: int = 0, *, session: str = "s1", tenant: str = "t1") -> TurnIdentity:
    return TurnIdentity(tenant, "proj", session, "u1", turn)


async def test_fresh_turn_logs_started_deltas_completed(make_store: StoreFactory) -> None:
    producer = WordProducer(words=6)
    async with Supervisor(make_store(), lease_ms=2000) as sup:
        result = await handle_chat_turn(
            identity(), {"message": "hi"}, supervisor=sup, produce=producer
        )
        assert result.status == 200
        assert result.mode == "fresh"
        assert result.headers["X-Turn-Mode"] == "fresh"
        assert result.headers["X-Execution-Id"] == "proj:s1:0"
        assert result.media_type == "application/x-ndjson"
        events = ndjson(await collect(result))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "session.run.started"
    assert events[0]["executionId"] == "proj:s1:0"
    assert events[-1]["type"] == "session.run.completed"
    assert events[-1]["finalText"] == text_of(events) == producer.expected_text()
    assert len(events) == 6 + 2
    assert len({e["eventId"] for e in events}) == len(events)


async def test_resume_after_cursor_gets_exactly_the_rest(make_store: StoreFactory) -> None:
    producer = WordProducer(words=8, delay=0.01)
    async with Supervisor(make_store(), lease_ms=2000) as sup:
        first = await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        assert not isinstance(first.body, bytes)
        seen: list[dict[str, Any]] = []
        async for chunk in first.body:
            seen.extend(ndjson(chunk))
            if len(seen) >= 3:
                break
        await first.body.aclose()  # type: ignore[attr-defined]
        last = seen[-1]["seq"]
        resumed = await handle_chat_turn(
            identity(), {"m": 1}, supervisor=sup, produce=producer, last_event_id=str(last)
        )
        rest = ndjson(await collect(resumed))
    assert [e["seq"] for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1]["type"] == "session.run.completed"
    assert text_of(seen + rest) == producer.expected_text()
    assert producer.calls == 1


async def test_retry_of_finished_turn_replays_bytes_without_producing(
    make_store: StoreFactory,
) -> None:
    producer = WordProducer(words=5)
    async with Supervisor(make_store(), lease_ms=2000) as sup:
        original = await collect(
            await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        )
        replay = await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        assert replay.mode == "replayed"
        assert await collect(replay) == original
    # Another worker on the same store replays too, with zero producer calls of its own.
    other_producer = WordProducer(words=5)
    async with Supervisor(make_store(), lease_ms=2000) as other:
        replay = await handle_chat_turn(
            identity(), {"m": 1}, supervisor=other, produce=other_producer
        )
        assert replay.mode == "replayed"
        assert await collect(replay) == original
    assert producer.calls == 1
    assert other_producer.calls == 0


async def test_sse_framing_uses_seq_as_id(make_store: StoreFactory) -> None:
    async with Supervisor(make_store(), lease_ms=2000) as sup:
        result = await handle_chat_turn(
            identity(), {"m": 1}, supervisor=sup, produce=WordProducer(words=2), format="sse"
        )
        assert result.media_type == "text/event-stream"
        body = await collect(result)
    frames = [f for f in body.decode().split("\n\n") if f]
    for index, frame in enumerate(frames, start=1):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        assert lines["id"] == str(index)
        assert orjson.loads(lines["data"])["seq"] == index
        assert orjson.loads(lines["data"])["type"] == lines["event"]


async def test_twenty_simultaneous_requests_start_the_producer_once(
    make_store: StoreFactory,
) -> None:
    producer = WordProducer(words=10, delay=0.005)
    async with Supervisor(make_store(), lease_ms=2000) as a, Supervisor(
        make_store(), lease_ms=2000
    ) as b:
        bodies: list[bytes] = []
        modes: list[str | None] = []

        async def one(i: int) -> None:
            sup = a if i % 2 else b
            result = await handle_chat_turn(
                identity(), {"m": "same"}, supervisor=sup, produce=producer
            )
            modes.append(result.mode)
            bodies.append(await collect(result))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
    assert producer.calls == 1
    assert modes.count("fresh") == 1
    assert set(modes) <= {"fresh", "joined", "replayed"}
    assert len(set(bodies)) == 1
    events = ndjson(bodies[0])
    assert events[-1]["finalText"] == producer.expected_text()


async def test_different_input_for_the_same_turn_is_409(make_store: StoreFactory) -> None:
    async with Supervisor(make_store(), lease_ms=2000) as sup:
        await collect(
            await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=WordProducer())
        )
        conflict = await handle_chat_turn(
            identity(), {"m": 2}, supervisor=sup, produce=WordProducer()
        )
    assert conflict.status == 409
    assert conflict.media_type == "application/problem+json"
    assert isinstance(conflict.body, bytes)
    problem = orjson.loads(conflict.body)
    assert problem["status"] == 409 and problem["title"]


async def test_other_tenant_same_execution_id_is_a_separate_turn(make_store: StoreFactory) -> None:
    p1, p2 = WordProducer(words=2), WordProducer(words=3)
    async with Supervisor(make_store(), lease_ms=2000) as sup:
        one = ndjson(await collect(await handle_chat_turn(
            identity(tenant="a"), {"m": 1}, supervisor=sup, produce=p1)))
        two = ndjson(await collect(await handle_chat_turn(
            identity(tenant="b"), {"m": 2}, supervisor=sup, produce=p2)))
    assert one[-1]["finalText"] == p1.expected_text()
    assert two[-1]["finalText"] == p2.expected_text()


async def test_producer_error_is_in_band_and_keeps_partial_text() -> None:
    producer = WordProducer(words=5, fail_after=2)
    async with Supervisor(MemoryStore(), lease_ms=2000) as sup:
        result = await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        assert result.status == 200
        events = ndjson(await collect(result))
    types = [e["type"] for e in events]
    assert types[-2:] == ["error", "session.run.failed"]
    assert events[-2]["code"] == "producer_error"
    assert "the model broke" not in events[-2]["message"]  # no internals on the wire
    assert events[-1]["finalText"] == "w0 w1 "
    assert types.count("session.run.failed") == 1


@pytest.mark.parametrize(
    ("bad_event", "code"),
    [
        ({"type": "x", "seq": 3}, "invalid_event"),
        ({"delta": "no type"}, "invalid_event"),
        ("not a dict", "invalid_event"),
        ({"type": "x", "blob": "y" * 300_000}, "event_too_large"),
        ({"type": "session.run.completed", "finalText": "forged"}, "invalid_event"),
        ({"type": "x", "v": {1, 2}}, "invalid_event"),
    ],
)
async def test_bad_producer_events_fail_the_turn_in_band(bad_event: Any, code: str) -> None:
    async def producer(context: Any) -> AsyncIterator[Any]:
        yield {"type": "text-delta", "delta": "ok "}
        yield bad_event

    async with Supervisor(MemoryStore(), lease_ms=2000) as sup:
        events = ndjson(await collect(
            await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)))
    assert [e["type"] for e in events][-2:] == ["error", "session.run.failed"]
    assert events[-2]["code"] == code
    assert events[-1]["finalText"] == "ok "


async def test_hooks_run_once_and_never_on_replay() -> None:
    persisted: list[tuple[str, str]] = []
    completed: list[TurnCompletion] = []
    seen_seqs: list[int] = []

    async def persist(completion: TurnCompletion, text: str) -> None:
        persisted.append((completion.execution_id, text))

    async def on_complete(completion: TurnCompletion) -> None:
        completed.append(completion)
        raise RuntimeError("hook errors are swallowed")

    async def on_event(event: Any) -> None:
        seen_seqs.append(event.seq)
        if event.seq == 2:
            raise RuntimeError("swallowed too")

    producer = WordProducer(words=3)
    hooks = TurnHooks(
        produce=producer,
        persist_assistant_message=persist,
        on_turn_complete=on_complete,
        on_event=on_event,
        transform_final_text=str.upper,
    )
    async with Supervisor(MemoryStore(), lease_ms=2000) as sup:
        events = ndjson(await collect(
            await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, hooks=hooks)))
        await collect(await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, hooks=hooks))
    # aclose() drained the post hooks.
    assert persisted == [("proj:s1:0", producer.expected_text().upper())]
    assert events[-1]["finalText"] == producer.expected_text()  # the log is untouched
    assert len(completed) == 1 and completed[0].status == "completed"
    assert seen_seqs == [e["seq"] for e in events]


async def test_client_disconnect_cancels_only_its_reader() -> None:
    store = MemoryStore()
    producer = WordProducer(words=10, delay=0.01)
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        assert not isinstance(result.body, bytes)
        async for _ in result.body:
            break
        await result.body.aclose()  # type: ignore[attr-defined]
        replay = ndjson(await collect(
            await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)))
    assert replay[-1]["type"] == "session.run.completed"
    assert replay[-1]["finalText"] == producer.expected_text()
    assert producer.calls == 1


async def test_slow_reader_does_not_hold_the_pump_back() -> None:
    store = MemoryStore()
    producer = WordProducer(words=50)
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        assert not isinstance(result.body, bytes)
        iterator = result.body.__aiter__()
        await iterator.__anext__()
        # The reader is parked after one event; the turn still finishes.
        with anyio.fail_after(5):
            while (run := await store.get_run(KEY)) is None or not run.status.finished:
                await anyio.sleep(0.01)
        rest = ndjson(b"".join([chunk async for chunk in iterator]))
    assert rest[-1]["seq"] == 52


async def test_cancel_checkpoints_partial_text() -> None:
    store = MemoryStore()
    producer = WordProducer(words=5)
    producer.gate = anyio.Event()  # parks the producer after two words
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(identity(), {"m": 1}, supervisor=sup, produce=producer)
        assert not isinstance(result.body, bytes)
        iterator = result.body.__aiter__()
        got: list[dict[str, object]] = []
        while len(got) < 3:  # started, w0, w1: in one chunk or several (batches)
            got += ndjson(await iterator.__anext__())
        assert await sup.cancel(KEY) is True
        got += ndjson(b"".join([chunk async for chunk in iterator]))
    assert got[-1]["type"] == "session.run.cancelled"
    assert got[-1]["finalText"] == "w0 w1 "
    assert producer.closed == 1
    run = await store.get_run(KEY)
    assert run is not None and run.status.value == "cancelled" and run.final_text == "w0 w1 "


async def test_too_many_events_fails_the_turn() -> None:
    from turnstream import Limits

    limits = Limits(max_events_per_turn=3)
    async with Supervisor(MemoryStore(), lease_ms=2000, limits=limits) as sup:
        events = ndjson(await collect(await handle_chat_turn(
            identity(), {"m": 1}, supervisor=sup, produce=WordProducer(words=10))))
    assert events[-2]["code"] == "too_many_events"
    assert events[-1]["finalText"] == "w0 w1 w2 "
