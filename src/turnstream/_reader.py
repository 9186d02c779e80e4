"""Readers: stream a run's log to one client from its cursor — replay, then live.

A reader never holds the pump back and the pump never waits for a reader: in this process a
reader follows the pump's :class:`LiveRun`; elsewhere it blocks on the store. Cancelling a
reader (its client left) cancels nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ._events import LoggedEvent
from ._exceptions import OwnerLost
from ._store import RunKey
from ._supervisor import Supervisor

__all__ = ["read_run"]

logger = logging.getLogger("turnstream.reader")

_PAGE = 512


async def read_run(
    supervisor: Supervisor, key: RunKey, *, after: int = 0
) -> AsyncIterator[LoggedEvent]:
    """Yield the run's events with ``seq > after`` in order, ending after the terminal event.

    Ends early (without a terminal event) when the run is unknown or expired. Raises
    :class:`OwnerLost` when its owner died and the run cannot be re-attached (a local
    producer): the client retries the turn, which restarts it.
    """
    store = supervisor.store
    cursor = after
    while True:
        live = supervisor.live_run(key)
        if live is not None and live.covers(cursor):
            events = live.events_after(cursor)
            if not events:
                if live.closed:
                    live = None  # the pump stopped: whatever comes next is in the store
                else:
                    await live.wait(cursor)
                    continue
        if live is None or not live.covers(cursor):
            events = await store.read(key, after=cursor, limit=_PAGE)
            if not events:
                fresh_live = supervisor.live_run(key)
                if fresh_live is not None and not fresh_live.closed and fresh_live.covers(cursor):
                    continue  # a pump started here meanwhile: follow it instead
                events = await store.follow(
                    key, after=cursor, block_ms=supervisor.follow_block_ms, limit=_PAGE
                )
            if not events:
                run = await store.get_run(key)
                if run is None:
                    return  # unknown or expired
                if run.status.finished and run.last_seq <= cursor:
                    return  # a cursor at (or past) the end of a finished log
                if not run.status.finished and not run.lease_live:
                    if await supervisor.recover(key):
                        continue  # this worker (or another) re-attached: keep following
                    # Nothing here can resume it: tell the client now rather than let it
                    # wait for a TTL.
                    logger.info("run %s has no live owner; ending reader", key.execution_id)
                    raise OwnerLost(f"the worker running {key.execution_id} stopped")
                continue
        for event in events:
            yield event
            cursor = event.seq
            if event.terminal:
                return
