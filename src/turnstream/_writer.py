"""One process-wide writer: appends from every pump go through it, batched across runs.

While one round trip is in flight the next batch accumulates, so a busy process sends one
``append_batch`` per round trip instead of one append per event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from ._events import NewEvent
from ._exceptions import StoreError, TurnstreamError
from ._store import AppendRequest, Lease, RunKey, TurnStore

__all__ = ["LogWriter"]


@dataclass(eq=False)
class _Pending:
    key: RunKey
    lease: Lease
    events: Sequence[NewEvent]
    # asyncio's own Event: anyio's costs a backend lookup per creation (one per append).
    done: asyncio.Event = field(default_factory=asyncio.Event)
    seqs: list[int] | None = None
    error: BaseException | None = None


class LogWriter:
    def __init__(self, store: TurnStore, *, max_batch_events: int = 1024) -> None:
        self._store = store
        self._max_batch_events = max_batch_events
        self._queue: deque[_Pending] = deque()
        self._ready = asyncio.Event()
        self._running = False

    async def append(self, key: RunKey, lease: Lease, events: Sequence[NewEvent]) -> list[int]:
        """Queue events of one run; return their seqs once the store acknowledged them."""
        if not self._running:
            raise RuntimeError("the log writer is not running (is the supervisor started?)")
        pending = _Pending(key, lease, events)
        self._queue.append(pending)
        self._ready.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.seqs is not None
        return pending.seqs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while True:
                await self._ready.wait()
                self._ready = asyncio.Event()
                while self._queue:
                    await self._flush(self._take_batch())
        finally:
            self._running = False
            while self._queue:  # nobody will write these: wake their pumps with an error
                pending = self._queue.popleft()
                pending.error = StoreError("the log writer stopped")
                pending.done.set()

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        count = 0
        while self._queue and (not batch or count < self._max_batch_events):
            pending = self._queue.popleft()
            batch.append(pending)
            count += len(pending.events)
        return batch

    async def _flush(self, batch: list[_Pending]) -> None:
        # Requests of one run (same lease) merge into one, in order; each run stays atomic.
        groups: dict[tuple[RunKey, Lease], list[_Pending]] = {}
        for pending in batch:
            groups.setdefault((pending.key, pending.lease), []).append(pending)
        requests = [
            AppendRequest(key, lease, [event for p in group for event in p.events])
            for (key, lease), group in groups.items()
        ]
        try:
            # Not shielded: the writer is only cancelled when the supervisor's task group ends,
            # after every pump stopped, so no pump is left unsure of what landed (and a pump
            # that is cancelled itself writes nothing more, whatever landed).
            results = await self._store.append_batch(requests)
        except TurnstreamError as exc:
            for pending in batch:
                pending.error = exc
                pending.done.set()
            return
        except Exception as exc:  # a store bug must not kill the writer of every run
            error = StoreError(f"append failed: {exc!r}")
            error.__cause__ = exc
            for pending in batch:
                pending.error = error
                pending.done.set()
            return
        for group, result in zip(groups.values(), results, strict=True):
            offset = 0
            for pending in group:
                if isinstance(result, BaseException):
                    pending.error = result
                else:
                    pending.seqs = result[offset : offset + len(pending.events)]
                    offset += len(pending.events)
                pending.done.set()
