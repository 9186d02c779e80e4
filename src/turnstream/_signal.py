"""Signal: wake every task waiting right now — the hot path's one synchronisation primitive.

The pump, the writer, the outbox and the live tail wake a waiter once per batch, which on a
paced turn is once per event. ``asyncio.Event`` cost more there than the rest of the work:
every new Event binds its loop on its first ``wait`` under a process-wide
``threading.Lock`` (``_LoopBoundMixin._get_loop``), 14 % of a paced worker's samples; anyio's
Event costs a backend lookup on top. A Signal is a list of futures of the running loop: a
``wait`` makes one future, a ``notify_all`` resolves them all, and nothing has to be replaced
after a wake-up. It has no state: a ``notify_all`` with nobody waiting does nothing, so a
waiter checks its condition before it waits (single-threaded asyncio makes that race-free).
"""

from __future__ import annotations

import asyncio

__all__ = ["Signal"]


class Signal:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        """Until the next :meth:`notify_all` (check the condition first: it is not latched)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            # Cancelled: leave no dead future behind for a signal nobody notifies for a while.
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass  # notified already
            raise

    def notify_all(self) -> None:
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
