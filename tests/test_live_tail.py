"""LiveRun keeps a bounded tail; readers behind it read the store and miss nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio

from tests._helpers import collect, ndjson, wait_for
from turnstream import LoggedEvent, MemoryStore, RunKey, Supervisor, TurnIdentity, handle_chat_turn
from turnstream._events import fast_logged_event
from turnstream._live import TAIL_EVENTS, LiveRun

KEY = RunKey("t1", "proj:s1:0", "u1")


def _events(first: int, n: int, size: int = 10) -> list[LoggedEvent]:
    return [
        fast_logged_event(seq, f"1.{seq}", "text-delta", b"{" + b"x" * (size - 2) + b"}")
        for seq in range(first, first + n)
    ]


def test_the_tail_is_bounded_in_events_and_stays_contiguous() -> None:
    live = LiveRun(KEY, first_seq=1, tail_events=100, tail_bytes=10**9)
    for first in range(1, 5001, 50):
        live.publish(_events(first, 50))
        assert live.last_seq == first + 49
        assert len(live.events_after(live.first_seq - 1)) <= 200
    held = live.events_after(live.first_seq - 1)
    assert [e.seq for e in held] == list(range(live.first_seq, 5001))
    assert not live.covers(0)  # seq 1 is gone from here: a reader from 0 reads the store
    assert live.covers(live.first_seq - 1)
    assert [e.seq for e in live.events_after(4990)] == list(range(4991, 5001))


def test_the_tail_is_bounded_in_bytes_but_keeps_the_newest_batch_whole() -> None:
    live = LiveRun(KEY, first_seq=1, tail_events=10**6, tail_bytes=1000)
    for seq in range(1, 31):
        live.publish(_events(seq, 1, size=100))  # 3,000 bytes in all: over twice the bound
        held = live.events_after(live.first_seq - 1)
        assert sum(len(e.data) for e in held) <= 2000
    held = live.events_after(live.first_seq - 1)
    assert held[-1].seq == 30 and live.first_seq == held[0].seq
    live.publish(_events(31, 1, size=5000))  # one event bigger than the whole bound
    assert [e.seq for e in live.events_after(live.first_seq - 1)] == [31]
    # A batch bigger than the bound stays whole: a reader that had read up to its start
    # (the one that keeps up) must find all of it here.
    live.publish(_events(32, 40, size=100))
    assert live.covers(31)
    assert [e.seq for e in live.events_after(31)] == list(range(32, 72))
    live.publish(_events(72, 1, size=100))
    assert not live.covers(31)  # the batch before the newest one is trimmed now
    assert live.last_seq == 72


async def test_a_late_joiner_of_a_long_live_turn_gets_every_event_once() -> None:
    store = MemoryStore()
    words = 4 * TAIL_EVENTS
    halfway = anyio.Event()
    go_on = anyio.Event()
    calls = 0

    async def produce(context: object) -> AsyncIterator[dict[str, Any]]:
        nonlocal calls
        calls += 1
        for i in range(words):
            if i == words // 2:
                halfway.set()
                await go_on.wait()  # the joiner comes in here, the tail long trimmed
            yield {"type": "text-delta", "delta": f"w{i} "}

    identity = TurnIdentity("t1", "proj", "s1", "u1", 0)
    owner: list[bytes] = []
    async with Supervisor(store) as supervisor:
        first = await handle_chat_turn(identity, {"m": 1}, supervisor=supervisor, produce=produce)
        async with anyio.create_task_group() as tg:

            async def read_owner() -> None:
                owner.append(await collect(first))

            tg.start_soon(read_owner)
            await halfway.wait()

            async def logged_half() -> bool:
                run = await store.get_run(KEY)
                return run is not None and run.last_seq == words // 2 + 1

            await wait_for(logged_half)
            live = supervisor.live_run(KEY)
            assert live is not None and not live.covers(0)
            joined = await handle_chat_turn(
                identity, {"m": 1}, supervisor=supervisor, produce=produce
            )
            assert joined.mode == "joined"
            go_on.set()
            late = ndjson(await collect(joined))
    expected = "".join(f"w{i} " for i in range(words))
    for log in (late, ndjson(owner[0])):
        assert [event["seq"] for event in log] == list(range(1, words + 3))
        assert log[-1]["finalText"] == expected
    assert calls == 1
