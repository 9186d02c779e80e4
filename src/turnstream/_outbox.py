"""The outbox: what a producer ran ahead of the log, bounded in bytes and in events.

The producer puts events in; the pump's logger takes out everything that is there as one
batch. While a batch is in flight (or the store is away and the pump retries) the producer
keeps running until the bound, so the next batch is whatever accumulated meanwhile:
coalescing without timers. Waking costs one future per wait (a :class:`Signal`), never one
per event.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from ._events import NewEvent
from ._signal import Signal

__all__ = ["Outbox"]

End = TypeVar("End")


class Outbox(Generic[End]):
    """A single-producer, single-consumer queue of events with an end marker.

    ``close(end)`` tells the consumer how the producer ended (``end`` is handed back by
    :attr:`end` once every event before it was taken).
    """

    def __init__(self, *, max_bytes: int, max_events: int) -> None:
        if max_bytes < 1 or max_events < 1:
            raise ValueError("an outbox needs room for at least one event")
        self.max_bytes = max_bytes
        self.max_events = max_events
        self._items: deque[NewEvent] = deque()
        self._bytes = 0
        self._closed = False
        self.end: End | None = None
        self._readable = Signal()
        self._writable = Signal()
        # The producer waits for room (the log is behind or away): it is not silent, the
        # stall watchdog must not count this against it.
        self.put_waiting = False

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _full_for(self, event: NewEvent) -> bool:
        # An event bigger than the whole bound still goes in alone, or it could never go.
        return bool(self._items) and (
            len(self._items) >= self.max_events or self._bytes + len(event.data) > self.max_bytes
        )

    async def put(self, event: NewEvent) -> None:
        """Add ``event``; wait while the outbox is full (the log is behind or away)."""
        if self._closed:
            return  # discarded: the turn ends without what comes now
        if self._full_for(event):
            self.put_waiting = True
            try:
                while self._full_for(event):
                    await self._writable.wait()
                    if self._closed:
                        return
            finally:
                self.put_waiting = False
        self._items.append(event)
        self._bytes += len(event.data)
        self._readable.notify_all()

    def close(self, end: End | None = None) -> None:
        """The producer is done; ``end`` says how (None: it simply ran out)."""
        self._closed = True
        self.end = end
        self._readable.notify_all()

    def discard(self) -> None:
        """Drop what was not taken and close: the turn ends without it (a cancel)."""
        self._items.clear()
        self._bytes = 0
        self.close()
        self._writable.notify_all()

    async def take(self, *, max_events: int, max_bytes: int) -> list[NewEvent]:
        """Every event there is, up to the caps (at least one); ``[]`` once closed and empty."""
        while not self._items and not self._closed:
            await self._readable.wait()
        batch: list[NewEvent] = []
        size = 0
        while self._items and len(batch) < max_events:
            event = self._items[0]
            if batch and size + len(event.data) > max_bytes:
                break
            self._items.popleft()
            batch.append(event)
            size += len(event.data)
        self._bytes -= size
        if batch:
            self._writable.notify_all()
        return batch
