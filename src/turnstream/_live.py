"""In-process fan-out of a run's acknowledged events to the readers in this process.

The pump publishes each batch after the store acknowledged it (log before deliver), so local
readers follow a turn without a store round trip per event; readers elsewhere block on the
store instead.
"""

from __future__ import annotations

import anyio

from ._events import LoggedEvent
from ._signal import Signal
from ._store import RunKey

__all__ = ["LiveRun"]


# How much of a run a LiveRun keeps: the newest batch whole, and the events before it up to
# these bounds — what readers that keep up need. A reader further behind (a late joiner, a
# slow client) reads the store, which has every event it acknowledged. Trimmed once twice
# over a bound, so trimming costs O(1) per event. Small, because every event held is an
# object each full garbage collection walks: 1,000 paced turns holding their whole 100-event
# logs here made gen-2 pauses of 80-140 ms.
TAIL_EVENTS = 32
TAIL_BYTES = 64 * 1024


class LiveRun:
    """The most recent events a local pump has logged for one run: ``first_seq`` on.

    A bounded tail: the newest published batch whole (the pump caps a batch at 1,024 events
    and 1 MiB), plus up to about :data:`TAIL_EVENTS` events and :data:`TAIL_BYTES` bytes
    before it. A whole 100,000-event turn is not kept here for late joiners, who read the
    store. Readers never block the pump: they keep their own cursor.
    """

    def __init__(
        self,
        key: RunKey,
        *,
        first_seq: int,
        tail_events: int = TAIL_EVENTS,
        tail_bytes: int = TAIL_BYTES,
    ) -> None:
        self.key = key
        self.first_seq = first_seq
        self._last_seq = first_seq - 1
        self._tail_events = tail_events
        self._tail_bytes = tail_bytes
        self._events: list[LoggedEvent] = []
        self._bytes = 0  # len(data) of the events held
        self._changed = Signal()  # once per published batch: see _signal.py
        self.closed = False
        # Monotonic time since when the pump cannot reach the store (None: it can).
        self.outage_since: float | None = None

    def covers(self, cursor: int) -> bool:
        """Whether every event after ``cursor`` that this pump logs is held here."""
        return cursor + 1 >= self.first_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def publish(self, events: list[LoggedEvent]) -> None:
        """Add acknowledged events, the next seqs after :attr:`last_seq`, in order."""
        if not events:
            return
        self._events.extend(events)
        self._bytes += sum(len(event.data) for event in events)
        self._last_seq = events[-1].seq
        if len(self._events) > 2 * self._tail_events or self._bytes > 2 * self._tail_bytes:
            self._trim(keep=len(events))
        self._wake()

    def _trim(self, *, keep: int) -> None:
        # Never into the newest batch: a reader that had read everything before it (the one
        # that keeps up) finds all of it here, however big it is.
        events = self._events
        last_droppable = len(events) - keep
        drop = min(max(len(events) - self._tail_events, 0), last_droppable)
        dropped = sum(len(event.data) for event in events[:drop])
        # Then whole events until under the byte bound.
        while drop < last_droppable and self._bytes - dropped > self._tail_bytes:
            dropped += len(events[drop].data)
            drop += 1
        del events[:drop]
        self._bytes -= dropped
        self.first_seq += drop

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
        self._changed.notify_all()
