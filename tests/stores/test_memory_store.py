"""MemoryStore's own quirks: eviction of expired runs it is never asked about again."""

from __future__ import annotations

import pytest

from turnstream._events import NewEvent
from turnstream._identity import derive_execution_id
from turnstream._store import BeginOutcome, Lease, RunKey, RunStatus
from turnstream.stores import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def key(n: int) -> RunKey:
    return RunKey("t", derive_execution_id("p", f"s{n}", 0))


async def own(store: MemoryStore, run: RunKey) -> Lease:
    result = await store.begin(run, input_hash="h", user_id="u", holder="w", lease_ms=1_000)
    assert result.outcome is BeginOutcome.FRESH and result.lease is not None
    return result.lease


async def test_expired_runs_are_evicted_without_being_touched() -> None:
    clock = Clock()
    store = MemoryStore(retention_ms=10, running_ttl_ms=5_000, evict_interval_ms=1_000, clock=clock)
    for n in range(50):
        lease = await own(store, key(n))
        terminal = NewEvent.build("end", {"type": "session.run.completed"})
        await store.finish(
            key(n), lease, status=RunStatus.COMPLETED, terminal=terminal, final_text=""
        )
    abandoned = [key(100 + n) for n in range(50)]
    for run in abandoned:
        await own(store, run)  # begun, never renewed or finished: its owner vanished
    assert store.held_runs == 100
    clock.now += 1_000
    await store.get_run(key(999))  # any call runs the due scan
    assert store.held_runs == 50  # the finished ones, past their retention
    clock.now += 5_000
    await store.ping()
    await store.get_run(key(999))
    assert store.held_runs == 0  # the abandoned ones, past their running TTL


async def test_lease_writes_keep_an_unfinished_run() -> None:
    clock = Clock()
    store = MemoryStore(running_ttl_ms=5_000, evict_interval_ms=1_000, clock=clock)
    run = key(1)
    lease = await own(store, run)
    for _ in range(4):
        clock.now += 4_000
        await store.renew(run, lease, lease_ms=1_000)
    record = await store.get_run(run)
    assert record is not None and record.status is RunStatus.RUNNING
    clock.now += 5_001
    assert await store.get_run(run) is None


@pytest.mark.parametrize(
    "settings",
    [{"retention_ms": -1}, {"running_ttl_ms": 0}, {"evict_interval_ms": 0}],
)
def test_bad_settings_are_refused(settings: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MemoryStore(**settings)
