"""The process-wide writer: an idle writer's append is sent by the appender itself; what
arrives while a batch is in flight goes out together as the next batch; a cancelled appender
loses nobody else's events. And the Signal it (and the outbox, the live tail) wakes with."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import anyio
import pytest

from turnstream import Lease, MemoryStore, RunKey
from turnstream._events import NewEvent, fast_new_event
from turnstream._signal import Signal
from turnstream._store import AppendRequest, TurnstreamError
from turnstream._writer import LogWriter


def _event(run: str, n: int) -> NewEvent:
    return fast_new_event(f"{run}.{n}", "text-delta", b'{"type":"text-delta"}', None)


class GatedStore(MemoryStore):
    """A memory store whose appends record their task and can be held at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[asyncio.Task[object] | None, list[str]]] = []
        self.gate: asyncio.Event | None = None

    async def append_batch(
        self, requests: Sequence[AppendRequest]
    ) -> list[list[int] | TurnstreamError]:
        self.calls.append(
            (asyncio.current_task(), [e.event_id for r in requests for e in r.events])
        )
        if self.gate is not None:
            await self.gate.wait()
        return await super().append_batch(requests)


async def _runs(store: MemoryStore, n: int) -> list[tuple[RunKey, Lease]]:
    runs = []
    for i in range(n):
        key = RunKey("t", f"p:s{i}:0")
        result = await store.begin(key, input_hash="h", user_id="u", holder="w", lease_ms=60_000)
        assert result.lease is not None
        runs.append((key, result.lease))
    return runs


def _appender(
    writer: LogWriter,
    runs: list[tuple[RunKey, Lease]],
    results: dict[int, list[int]],
    *,
    events: int = 1,
) -> Callable[[int], Awaitable[None]]:
    """``append(i)``: events ``r<i>.1``… of run ``i``; their seqs land in ``results[i]``."""

    async def append(i: int) -> None:
        key, lease = runs[i]
        batch = [_event(f"r{i}", n) for n in range(1, events + 1)]
        results[i] = await writer.append(key, lease, batch)

    return append


async def test_an_append_to_an_idle_writer_is_sent_by_the_appender_itself() -> None:
    store = GatedStore()
    [(key, lease)] = await _runs(store, 1)
    writer = LogWriter(store)
    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        assert await writer.append(key, lease, [_event("a", 1), _event("a", 2)]) == [1, 2]
        tg.cancel_scope.cancel()
    assert store.calls == [(asyncio.current_task(), ["a.1", "a.2"])]


async def test_appends_that_arrive_during_a_flush_go_out_as_one_next_batch() -> None:
    store = GatedStore()
    runs = await _runs(store, 6)
    writer = LogWriter(store)
    results: dict[int, list[int]] = {}
    append = _appender(writer, runs, results, events=2)

    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        store.gate = asyncio.Event()
        tg.start_soon(append, 0)
        while not store.calls:
            await asyncio.sleep(0)
        for i in range(1, 6):  # while r0's batch is in flight
            tg.start_soon(append, i)
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(store.calls) == 1
        store.gate.set()
        while len(results) < 6:
            await asyncio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert [ids for _, ids in store.calls] == [
        ["r0.1", "r0.2"],
        [f"r{i}.{n}" for i in range(1, 6) for n in (1, 2)],
    ]
    assert results == {i: [1, 2] for i in range(6)}


class RemoteGatedStore(GatedStore):
    local_appends = False  # as a networked store: an append is a round trip


async def test_appends_woken_together_share_one_round_trip_on_a_remote_store() -> None:
    # Paced tokens of many turns wake in the same loop iteration: on a store where each
    # append_batch is a round trip they must go out as one, not one per turn — sent by the
    # writer's task, not by the appender.
    store = RemoteGatedStore()
    runs = await _runs(store, 5)
    writer = LogWriter(store)
    results: dict[int, list[int]] = {}
    append = _appender(writer, runs, results)

    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        for i in range(5):
            tg.start_soon(append, i)
        while len(results) < 5:
            await asyncio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert [ids for _, ids in store.calls] == [[f"r{i}.1" for i in range(5)]]
    assert results == {i: [1] for i in range(5)}


async def test_a_sender_cancelled_mid_flight_holds_nobody_else_up() -> None:
    store = GatedStore()
    runs = await _runs(store, 3)
    writer = LogWriter(store)
    results: dict[int, list[int]] = {}
    append = _appender(writer, runs, results)

    async with anyio.create_task_group() as tg:
        await tg.start(writer.run)
        store.gate = asyncio.Event()
        # r0 sends its batch; r1 and r2 queue behind it; r0 is cancelled mid-flight: the
        # writer's task must still send theirs.
        leader_scope = anyio.CancelScope()
        tg.start_soon(lambda: _in(leader_scope, append(0)))
        while not store.calls:
            await asyncio.sleep(0)
        tg.start_soon(append, 1)
        tg.start_soon(append, 2)
        for _ in range(10):
            await asyncio.sleep(0)
        leader_scope.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        store.gate.set()
        while len(results) < 2:
            await asyncio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert results == {1: [1], 2: [1]}
    for i in (1, 2):
        assert [e.event_id for e in await store.read(runs[i][0])] == [f"r{i}.1"]


async def test_a_cancelled_sender_hands_the_others_of_its_batch_back() -> None:
    # A sender's batch holds other pumps' events when they were queued for the writer's task
    # and it had not run yet. Set up by hand: r1 and r2 queue while the writer counts as busy
    # and its task is not started; then r0 sends all three, and is cancelled mid-flight.
    store = GatedStore()
    runs = await _runs(store, 3)
    writer = LogWriter(store)
    results: dict[int, list[int]] = {}
    append = _appender(writer, runs, results)

    async with anyio.create_task_group() as tg:
        writer._running, writer._busy = True, True  # as if its task ran, busy sending
        tg.start_soon(append, 1)
        tg.start_soon(append, 2)
        for _ in range(5):
            await asyncio.sleep(0)
        writer._busy = False
        store.gate = asyncio.Event()
        sender = anyio.CancelScope()
        tg.start_soon(lambda: _in(sender, append(0)))
        while not store.calls:
            await asyncio.sleep(0)
        assert store.calls[0][1] == ["r1.1", "r2.1", "r0.1"]  # r0 sends them all
        sender.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        await tg.start(writer.run)  # the writer's task finds r1 and r2 handed back
        store.gate.set()
        while len(results) < 2:
            await asyncio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert results == {1: [1], 2: [1]}
    assert [ids for _, ids in store.calls] == [["r1.1", "r2.1", "r0.1"], ["r1.1", "r2.1"]]
    assert await store.read(runs[0][0]) == []


async def _in(scope: anyio.CancelScope, call: Awaitable[None]) -> None:
    with scope:
        await call


async def test_signal_wakes_every_waiter_and_forgets_cancelled_ones() -> None:
    signal = Signal()
    signal.notify_all()  # nobody waits: nothing happens, nothing is latched
    woken: list[int] = []

    async def waiter(i: int) -> None:
        await signal.wait()
        woken.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
        scope = anyio.CancelScope()
        tg.start_soon(lambda: _cancelled_waiter(signal, scope))
        for _ in range(3):
            await asyncio.sleep(0)
        scope.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(signal._waiters) == 3  # the cancelled one left no future behind
        signal.notify_all()
    assert sorted(woken) == [0, 1, 2]
    assert signal._waiters == []


async def _cancelled_waiter(signal: Signal, scope: anyio.CancelScope) -> None:
    with scope:
        await signal.wait()
        pytest.fail("a cancelled wait must not return")
