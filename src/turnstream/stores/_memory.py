"""An in-process store: the embedded default for the demo, tests and single-worker apps.

Every method runs without an ``await`` between its checks and its writes, so on one event loop
each is atomic exactly like a Lua script on Redis.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import orjson

from .._events import LoggedEvent, NewEvent, fast_logged_event
from .._exceptions import LeaseLost, RunFinished, TurnstreamError
from .._signal import Signal
from .._store import (
    AppendRequest,
    BeginOutcome,
    BeginResult,
    Lease,
    RenewRequest,
    RenewResult,
    RunKey,
    RunRecord,
    RunStatus,
)

__all__ = ["MemoryStore"]

DEFAULT_RETENTION_MS = 24 * 3600 * 1000
DEFAULT_RUNNING_TTL_MS = 24 * 3600 * 1000
DEFAULT_EVICT_INTERVAL_MS = 30_000


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Run:
    key: RunKey
    input_hash: str
    user_id: str
    created_at_ms: int
    status: RunStatus = RunStatus.RUNNING
    attempt: int = 1
    lease_holder: str | None = None
    lease_token: int = 0
    lease_expires_at_ms: int = 0
    cancel_requested: bool = False
    handle: Mapping[str, Any] | None = None
    final_text: str | None = None
    finished_at_ms: int | None = None
    finished_by: Lease | None = None
    expires_at_ms: int | None = None
    persist_pending: bool = False
    persist_due_at_ms: int = 0
    restarted_by: int = 0  # the fencing token of the lease that last restarted the run
    # (event_id, type, data) per entry, seq = position + 1. Plain tuples of str/bytes, which
    # the garbage collector stops tracking: a log of LoggedEvent objects made every full
    # collection walk each event a worker keeps (0.45 s of GC in a 100,000-event turn).
    log: list[tuple[str, str, bytes]] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    # Notified on every append and finish: blocked followers read again.
    changed: Signal = field(default_factory=Signal)


class MemoryStore:
    """A :class:`~turnstream.TurnStore` held in this process's memory.

    ``clock`` returns the store's time in ms since the epoch; tests pass a fake one to let
    leases lapse without sleeping.

    Expired runs (finished ones after ``retention_ms``, unfinished ones ``running_ttl_ms``
    after their last lease write) are dropped when touched, and all of them by a scan at
    most every ``evict_interval_ms``, run by whichever call comes first after that: memory
    is bounded by what was written within the TTLs, never by a run nobody asks for again.
    """

    # An append costs no round trip here, so the process-wide writer sends each one at once
    # instead of waiting a loop iteration for others to batch with (see turnstream._writer).
    local_appends: ClassVar[bool] = True

    def __init__(
        self,
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        running_ttl_ms: int = DEFAULT_RUNNING_TTL_MS,
        evict_interval_ms: int = DEFAULT_EVICT_INTERVAL_MS,
        clock: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        if retention_ms < 0:
            raise ValueError("retention_ms must not be negative")
        if running_ttl_ms <= 0:
            raise ValueError("running_ttl_ms must be positive")
        if evict_interval_ms <= 0:
            raise ValueError("evict_interval_ms must be positive")
        self.retention_ms = retention_ms
        self.running_ttl_ms = running_ttl_ms
        self.evict_interval_ms = evict_interval_ms
        self._clock = clock
        self._runs: dict[RunKey, _Run] = {}
        self._closed = False
        self._next_eviction_ms = clock() + evict_interval_ms

    @property
    def held_runs(self) -> int:
        """How many runs this store holds in memory right now (expired ones included until
        the next eviction scan)."""
        return len(self._runs)

    # -- helpers ---------------------------------------------------------------------------

    def _evict_due(self, now: int) -> None:
        if now < self._next_eviction_ms:
            return
        self._next_eviction_ms = now + self.evict_interval_ms
        expired = [
            key
            for key, run in self._runs.items()
            if run.expires_at_ms is not None and run.expires_at_ms <= now
        ]
        for key in expired:
            del self._runs[key]

    def _get(self, key: RunKey) -> _Run | None:
        now = self._clock()
        self._evict_due(now)
        run = self._runs.get(key)
        if run is not None and run.expires_at_ms is not None and run.expires_at_ms <= now:
            del self._runs[key]
            return None
        return run

    def _touch(self, run: _Run, now: int) -> None:
        """A lease write on an unfinished run: it lives ``running_ttl_ms`` from now."""
        run.expires_at_ms = now + self.running_ttl_ms

    def _fenced(self, key: RunKey, lease: Lease) -> _Run:
        run = self._get(key)
        if run is not None and run.status.finished and run.finished_by == lease:
            raise RunFinished(f"run {key.execution_id} is finished")
        if run is None or run.lease_holder != lease.holder or run.lease_token != lease.token:
            raise LeaseLost(f"lease on {key.execution_id} is not held by {lease.holder}")
        return run

    def _record(self, run: _Run) -> RunRecord:
        now = self._clock()
        return RunRecord(
            key=run.key,
            status=run.status,
            input_hash=run.input_hash,
            user_id=run.user_id,
            attempt=run.attempt,
            last_seq=len(run.log),
            lease_holder=run.lease_holder,
            lease_token=run.lease_token,
            lease_expires_at_ms=run.lease_expires_at_ms,
            lease_live=run.lease_holder is not None and run.lease_expires_at_ms > now,
            cancel_requested=run.cancel_requested,
            handle=orjson.loads(orjson.dumps(run.handle)) if run.handle is not None else None,
            final_text=run.final_text,
            created_at_ms=run.created_at_ms,
            finished_at_ms=run.finished_at_ms,
            persist_pending=run.persist_pending,
            observed_at_ms=now,
        )

    def _join_or_take_over(
        self, run: _Run, *, holder: str, lease_ms: int, now: int
    ) -> BeginResult:
        """What begin and claim share: replay a finished run, join a live one, else lease it
        to ``holder`` with a new fencing token."""
        if run.status.finished:
            return BeginResult(BeginOutcome.COMPLETED, self._record(run), None)
        if run.lease_holder is not None and run.lease_expires_at_ms > now:
            return BeginResult(BeginOutcome.LIVE, self._record(run), None)
        run.lease_holder = holder
        run.lease_token += 1
        run.lease_expires_at_ms = now + lease_ms
        self._touch(run, now)
        return BeginResult(
            BeginOutcome.TAKEOVER, self._record(run), Lease(holder, run.lease_token)
        )

    def _wake(self, run: _Run) -> None:
        run.changed.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")

    # -- protocol --------------------------------------------------------------------------

    async def begin(
        self,
        key: RunKey,
        *,
        input_hash: str,
        user_id: str,
        holder: str,
        lease_ms: int,
        reopen_failed: bool = False,
    ) -> BeginResult:
        self._check_open()
        now = self._clock()
        run = self._get(key)
        if run is None:
            run = _Run(key=key, input_hash=input_hash, user_id=user_id, created_at_ms=now)
            run.lease_holder, run.lease_token = holder, 1
            run.lease_expires_at_ms = now + lease_ms
            self._touch(run, now)
            self._runs[key] = run
            return BeginResult(BeginOutcome.FRESH, self._record(run), Lease(holder, 1))
        if run.input_hash != input_hash:
            return BeginResult(BeginOutcome.MISMATCH, self._record(run), None)
        if reopen_failed and run.status is RunStatus.FAILED:
            # A retry of a failed turn: running again, its log kept (see TurnStore.begin).
            run.status = RunStatus.RUNNING
            run.final_text = run.finished_at_ms = run.finished_by = None
            run.persist_pending, run.persist_due_at_ms = False, 0
            run.cancel_requested = False
        return self._join_or_take_over(run, holder=holder, lease_ms=lease_ms, now=now)

    def _append_now(self, key: RunKey, lease: Lease, events: Sequence[NewEvent]) -> list[int]:
        for event in events:
            if event.terminal:
                raise ValueError("terminal events are written by finish(), not append()")
        run = self._fenced(key, lease)
        seqs: list[int] = []
        appended = False
        for event in events:
            seq = run.ids.get(event.event_id)
            if seq is None:
                seq = len(run.log) + 1
                run.log.append((event.event_id, event.type, event.data))
                run.ids[event.event_id] = seq
                appended = True
            seqs.append(seq)
        if appended:
            self._wake(run)
        return seqs

    async def append(self, key: RunKey, lease: Lease, events: Sequence[NewEvent]) -> list[int]:
        self._check_open()
        return self._append_now(key, lease, events)

    async def append_batch(
        self, requests: Sequence[AppendRequest]
    ) -> list[list[int] | TurnstreamError]:
        self._check_open()
        results: list[list[int] | TurnstreamError] = []
        for request in requests:
            try:
                results.append(self._append_now(request.key, request.lease, request.events))
            except TurnstreamError as exc:
                results.append(exc)
        return results

    async def read(self, key: RunKey, *, after: int = 0, limit: int = 512) -> list[LoggedEvent]:
        self._check_open()
        run = self._get(key)
        if run is None:
            return []
        start = max(after, 0)
        return [
            fast_logged_event(seq, *entry)
            for seq, entry in enumerate(run.log[start : start + limit], start + 1)
        ]

    async def follow(
        self, key: RunKey, *, after: int, block_ms: int, limit: int = 512
    ) -> list[LoggedEvent]:
        self._check_open()
        events = await self.read(key, after=after, limit=limit)
        if events or block_ms <= 0:
            return events
        run = self._get(key)
        if run is None or run.status.finished:
            return events
        with anyio.move_on_after(block_ms / 1000):
            await run.changed.wait()
        return await self.read(key, after=after, limit=limit)

    def _renew_now(self, key: RunKey, lease: Lease, lease_ms: int) -> RenewResult:
        run = self._fenced(key, lease)
        now = self._clock()
        run.lease_expires_at_ms = now + lease_ms
        self._touch(run, now)
        return RenewResult(cancel_requested=run.cancel_requested)

    async def renew(self, key: RunKey, lease: Lease, *, lease_ms: int) -> RenewResult:
        self._check_open()
        return self._renew_now(key, lease, lease_ms)

    async def renew_batch(
        self, requests: Sequence[RenewRequest], *, lease_ms: int
    ) -> list[RenewResult | TurnstreamError]:
        self._check_open()
        results: list[RenewResult | TurnstreamError] = []
        for request in requests:
            try:
                results.append(self._renew_now(request.key, request.lease, lease_ms))
            except TurnstreamError as exc:
                results.append(exc)
        return results

    async def set_handle(self, key: RunKey, lease: Lease, handle: Mapping[str, Any]) -> None:
        self._check_open()
        # A serialised copy, like Redis keeps: the caller's dict may change afterwards, and a
        # handle that is not JSON must fail here rather than at takeover time.
        data = orjson.dumps(dict(handle))
        run = self._fenced(key, lease)
        run.handle = orjson.loads(data)

    async def restart(self, key: RunKey, lease: Lease) -> int:
        self._check_open()
        run = self._fenced(key, lease)
        if run.restarted_by != lease.token:  # once per lease: a retry answers the same
            run.restarted_by = lease.token
            run.attempt += 1
        return run.attempt

    async def request_cancel(self, key: RunKey) -> bool:
        self._check_open()
        run = self._get(key)
        if run is None or run.status.finished:
            return False
        run.cancel_requested = True
        return True

    async def finish(
        self,
        key: RunKey,
        lease: Lease,
        *,
        status: RunStatus,
        terminal: NewEvent,
        final_text: str | None,
        persist_after_ms: int | None = None,
    ) -> int:
        self._check_open()
        if not status.finished or not terminal.terminal:
            raise ValueError("finish() takes a terminal status and a terminal event")
        run = self._get(key)
        if run is not None and run.status.finished and run.finished_by == lease:
            return len(run.log)  # a retried finish: same answer, nothing written
        run = self._fenced(key, lease)
        now = self._clock()
        seq = len(run.log) + 1
        run.log.append((terminal.event_id, terminal.type, terminal.data))
        run.status = status
        run.final_text = final_text
        run.finished_at_ms = now
        run.finished_by = lease
        run.lease_holder = None
        run.lease_expires_at_ms = 0
        run.expires_at_ms = now + self.retention_ms
        run.ids.clear()  # nothing is appended after the terminal event
        if persist_after_ms is not None:
            run.persist_pending = True
            run.persist_due_at_ms = now + persist_after_ms
        self._wake(run)
        return seq

    async def claim_persist(
        self, key: RunKey, *, holder: str, lease_ms: int
    ) -> RunRecord | None:
        self._check_open()
        run = self._get(key)
        now = self._clock()
        if run is None or not run.status.finished or not run.persist_pending:
            return None
        if run.persist_due_at_ms > now:
            return None
        run.persist_due_at_ms = now + lease_ms
        return self._record(run)

    async def mark_persisted(self, key: RunKey) -> None:
        self._check_open()
        run = self._get(key)
        if run is not None:
            run.persist_pending = False

    async def pending_persists(self, *, limit: int = 100) -> list[RunKey]:
        self._check_open()
        if limit <= 0:
            return []
        now = self._clock()
        due = [
            run
            for key in list(self._runs)
            if (run := self._get(key)) is not None
            and run.persist_pending
            and run.persist_due_at_ms <= now
        ]
        return [run.key for run in heapq.nsmallest(limit, due, key=lambda r: r.persist_due_at_ms)]

    async def release(self, key: RunKey, lease: Lease) -> None:
        self._check_open()
        run = self._get(key)
        if run is None or run.lease_holder != lease.holder or run.lease_token != lease.token:
            return
        # Now, not 0: a local run's orphan grace (lapsed_runs) counts from the release.
        run.lease_expires_at_ms = self._clock()
        self._wake(run)

    async def claim(self, key: RunKey, *, holder: str, lease_ms: int) -> BeginResult | None:
        self._check_open()
        now = self._clock()
        run = self._get(key)
        if run is None:
            return None
        return self._join_or_take_over(run, holder=holder, lease_ms=lease_ms, now=now)

    async def lapsed_runs(
        self, *, limit: int = 100, local_after_ms: int | None = None
    ) -> list[RunKey]:
        self._check_open()
        if limit <= 0:
            return []
        now = self._clock()
        reconnectable: list[_Run] = []
        local: list[_Run] = []
        for key in list(self._runs):  # _get drops expired runs as it goes
            run = self._get(key)
            if run is None or run.status.finished:
                continue
            if run.lease_holder is not None and run.lease_expires_at_ms > now:
                continue
            if run.handle is not None:
                reconnectable.append(run)
            elif local_after_ms is not None and run.lease_expires_at_ms <= now - local_after_ms:
                local.append(run)
        # Exact, unlike RedisStore's index. nsmallest is stable: ties in creation order.
        by_expiry = lambda run: run.lease_expires_at_ms  # noqa: E731
        oldest = heapq.nsmallest(limit, reconnectable, key=by_expiry)
        oldest += heapq.nsmallest(limit - len(oldest), local, key=by_expiry)
        return [run.key for run in oldest]

    async def get_run(self, key: RunKey) -> RunRecord | None:
        self._check_open()
        run = self._get(key)
        return None if run is None else self._record(run)

    async def ping(self) -> None:
        self._check_open()

    async def aclose(self) -> None:
        self._closed = True

    # -- testing aids ----------------------------------------------------------------------

    def expire_lease(self, key: RunKey) -> None:
        """Make a run's lease lapse now, as if its owner died (tests and chaos drills)."""
        run = self._get(key)
        if run is not None:
            run.lease_expires_at_ms = self._clock() - 1
