"""Readers: stream a run's log to one client from its cursor — replay, then live.

A reader never holds the pump back and the pump never waits for a reader: in this process a
reader follows the pump's :class:`LiveRun`; elsewhere it blocks on the store. Cancelling a
reader (its client left) cancels nothing else.

A reader never waits silently on a store that does not answer: after the supervisor's
``outage_notice_s`` (plus one blocking read, for a reader blocked on the store) it raises
:class:`StoreUnavailable`, which the handler turns into an in-band ``store_unavailable``
error; the client resumes from its cursor once the store is back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio

from ._events import LoggedEvent
from ._exceptions import OwnerLost, StoreUnavailable
from ._live import LiveRun
from ._store import RunKey, RunRecord
from ._supervisor import Supervisor

__all__ = ["read_batches", "read_run"]

logger = logging.getLogger("turnstream.reader")

_PAGE = 512

T = TypeVar("T")


async def _bounded(call: Awaitable[T], limit_s: float, what: str) -> T:
    """``await call``, or :class:`StoreUnavailable` once ``limit_s`` passed without an answer
    (a black-holed store: the client's own socket timeouts may be far longer)."""
    with anyio.move_on_after(limit_s):
        return await call
    raise StoreUnavailable(f"the store did not answer ({what}) within {limit_s:g} s")


async def _wait_live(live: LiveRun, cursor: int, notice_s: float) -> None:
    """Wait for the pump's next batch; raise once its store outage lasted ``notice_s``."""
    while True:
        since = live.outage_since
        if since is None:
            await live.wait(cursor)
            if live.outage_since is None:
                return
            continue
        remaining = since + notice_s - anyio.current_time()
        if remaining <= 0:
            raise StoreUnavailable(f"the store has not answered the pump for {notice_s:g} s")
        with anyio.move_on_after(remaining):
            await live.wait(cursor)
            return


def _lapsed_long_enough(run: RunRecord, supervisor: Supervisor) -> bool:
    """Whether an owner's lease lapsed long enough ago to call the owner dead.

    An owner only cut off from the store (an outage just ended) renews within a heartbeat
    of the store's return: not worth ending the client's stream for.
    """
    if not run.observed_at_ms:
        return True  # a store that does not say when it looked
    grace_ms = min(supervisor.heartbeat_ms, 2_000)
    return run.observed_at_ms - run.lease_expires_at_ms >= grace_ms


async def read_run(
    supervisor: Supervisor, key: RunKey, *, after: int = 0
) -> AsyncIterator[LoggedEvent]:
    """Yield the run's events with ``seq > after`` one by one (see :func:`read_batches`)."""
    batches = read_batches(supervisor, key, after=after)
    try:
        async for batch in batches:
            for event in batch:
                yield event
    finally:
        await batches.aclose()  # type: ignore[attr-defined]


async def _without_superseded_terminals(
    supervisor: Supervisor, key: RunKey, events: list[LoggedEvent], notice_s: float
) -> list[LoggedEvent]:
    """``events`` without the terminal events that a later attempt superseded."""
    if any(event.terminal for event in events[:-1]):
        last = len(events) - 1
        events = [event for i, event in enumerate(events) if i == last or not event.terminal]
    if events[-1].terminal:
        # The last event read: the end of the log, unless a retry reopened the run (or is
        # about to log its first event after it). The record says: one read per stream end.
        run = await _bounded(supervisor.store.get_run(key), notice_s, "get_run")
        if run is not None and (not run.status.finished or run.last_seq > events[-1].seq):
            return events[:-1]
    return events


async def read_batches(
    supervisor: Supervisor, key: RunKey, *, after: int = 0
) -> AsyncIterator[list[LoggedEvent]]:
    """Yield the run's events with ``seq > after`` in order, ending after the terminal event,
    as batches: every event that is ready when the client is ready for more (one wake-up and
    one send per batch, never one per event).

    Ends early (without a terminal event) when the run is unknown or expired. Raises
    :class:`OwnerLost` when its owner died and the run cannot be re-attached (a local
    producer): the client retries the turn, which restarts it. Raises
    :class:`StoreUnavailable` when the store does not answer (see the module docstring).
    """
    store = supervisor.store
    notice_s = supervisor.outage_notice_s
    block_s = supervisor.follow_block_ms / 1000
    cursor = after
    while True:
        from_store = False
        live = supervisor.live_run(key)
        if live is not None and live.covers(cursor):
            events = live.events_after(cursor)
            if not events:
                if live.closed:
                    live = None  # the pump stopped: whatever comes next is in the store
                else:
                    await _wait_live(live, cursor, notice_s)
                    continue
        if live is None or not live.covers(cursor):
            from_store = True
            events = await _bounded(store.read(key, after=cursor, limit=_PAGE), notice_s, "read")
            if not events:
                fresh_live = supervisor.live_run(key)
                if fresh_live is not None and not fresh_live.closed and fresh_live.covers(cursor):
                    continue  # a pump started here meanwhile: follow it instead
                events = await _bounded(
                    store.follow(
                        key, after=cursor, block_ms=supervisor.follow_block_ms, limit=_PAGE
                    ),
                    block_s + notice_s,
                    "follow",
                )
            if not events:
                run = await _bounded(store.get_run(key), notice_s, "get_run")
                if run is None:
                    return  # unknown or expired
                if run.status.finished and run.last_seq <= cursor:
                    return  # a cursor at (or past) the end of a finished log
                if (
                    not run.status.finished
                    and not run.lease_live
                    and _lapsed_long_enough(run, supervisor)
                ):
                    if await supervisor.recover(key):
                        continue  # this worker (or another) re-attached: keep following
                    again = await _bounded(store.get_run(key), notice_s, "get_run")
                    if again is not None and (again.status.finished or again.lease_live):
                        continue  # it finished (or was taken) meanwhile: read on
                    # Nothing here can resume it: tell the client now rather than let it
                    # wait for a TTL.
                    logger.info("run %s has no live owner; ending reader", key.execution_id)
                    raise OwnerLost(f"the worker running {key.execution_id} stopped")
                continue
        last = events[-1]
        if from_store:
            # A retry of a failed turn appends a new attempt after the failed one's terminal
            # event, which then ends nothing: left out (a live pump's tail never holds one).
            events = await _without_superseded_terminals(supervisor, key, events, notice_s)
            if not events:
                cursor = last.seq
                continue
        yield events
        if events[-1].terminal:  # the log's last event: nothing can follow it in a batch
            return
        cursor = events[-1].seq
