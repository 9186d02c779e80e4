"""In-process fan-out of a run's acknowledged events to the readers in this process.

The pump publishes each batch after the store acknowledged it (log before deliver), so local
readers follow a turn without a store round trip per event; readers elsewhere block on the
store instead.
"""

from __future__ import annotations

import asyncio

import anyio

from ._events import LoggedEvent
from ._store import RunKey

__all__ = ["LiveRun"]


class LiveRun:
    """The events a local pump has logged for one run, from ``first_seq`` on.

    Bounded by the turn's event limit: a run holds at most ``max_events_per_turn`` events.
    Readers never block the pump: they keep their own cursor into this list.
    """

    def __init__(self, key: RunKey, *, first_seq: int) -> None:
        self.key = key
        self.first_seq = first_seq
        self._events: list[LoggedEvent] = []
        # asyncio's own Event: anyio's costs a backend lookup per creation, and one is made
        # per published batch.
        self._changed = asyncio.Event()
        self.closed = False
        # Monotonic time since when the pump cannot reach the store (None: it can).
        self.outage_since: float | None = None

    def covers(self, cursor: int) -> bool:
        """Whether every event after ``cursor`` that this pump logs is held here."""
        return cursor + 1 >= self.first_seq

    @property
    def last_seq(self) -> int:
        return self._events[-1].seq if self._events else self.first_seq - 1

    def publish(self, events: list[LoggedEvent]) -> None:
        if not events:
            return
        self._events.extend(events)
        self._wake()

    def set_outage(self, failing: bool) -> None:
        """The pump's store calls started (or stopped) failing: readers may want to say so."""
        self.outage_since = anyio.current_time() if failing else None
        self._wake()

    def close(self) -> None:
        """The pump stopped (finished, lost its lease or was abandoned)."""
        self.closed = True
        self._wake()

    def events_after(self, cursor: int) -> list[LoggedEvent]:
        start = max(cursor + 1 - self.first_seq, 0)
        return self._events[start:]

    async def wait(self, cursor: int) -> None:
        """Return once there is an event after ``cursor``, the pump stopped, or its store
        outage state changed."""
        if not self.closed and self.last_seq <= cursor:
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
