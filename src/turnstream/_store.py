"""The store protocol: one durable record and log per run, every write atomic and fenced.

Two implementations: :class:`~turnstream.MemoryStore` (embedded, tests, demo) and
:class:`~turnstream.RedisStore` (production). Both pass ``turnstream.testing``'s store
conformance suite.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from ._events import LoggedEvent, NewEvent
from ._exceptions import TurnstreamError

__all__ = [
    "AppendRequest",
    "BeginOutcome",
    "BeginResult",
    "Lease",
    "RenewRequest",
    "RenewResult",
    "RunKey",
    "RunRecord",
    "RunStatus",
    "TurnStore",
]


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not RunStatus.RUNNING


class BeginOutcome(enum.StrEnum):
    """The five outcomes of :meth:`TurnStore.begin` (docs/lifecycle.md, turn modes)."""

    FRESH = "fresh"  # no run yet: created, lease taken
    COMPLETED = "completed"  # run finished: replay
    LIVE = "live"  # unfinished, lease held by a live owner: join
    TAKEOVER = "takeover"  # unfinished, lease lapsed: lease taken with a new fencing token
    MISMATCH = "mismatch"  # same execution id, different input hash: 409


@dataclass(frozen=True, slots=True)
class RunKey:
    """Names one run: its tenant, its user (unless the tenant's sessions are shared) and its
    execution id.

    With ``Supervisor(access="user")`` (the default) a run belongs to the user who started
    it: the user is part of its name, so two users' equal session ids are two runs, and
    another user asking for it finds nothing. With ``access="tenant"`` the user is left out
    (``user_id=None``): the tenant's users share sessions.
    """

    tenant_id: str
    execution_id: str
    user_id: str | None = None

    @property
    def tag(self) -> str:
        """``<tenant>/<execution id>`` or ``<tenant>@<user>/<execution id>``: the Redis hash
        tag body, unique per run.

        Tenant and user are encoded strictly (no ``/``, no ``@``), so the first ``/`` ends
        them whatever the execution id holds; a derived execution id never holds ``{`` or
        ``}`` (see ``derive_execution_id``).
        """
        tenant = quote(self.tenant_id, safe="-._~")
        if self.user_id is None:
            return f"{tenant}/{self.execution_id}"
        return f"{tenant}@{quote(self.user_id, safe='-._~')}/{self.execution_id}"


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to write to a run: ``holder`` plus a fencing ``token`` (both compared)."""

    holder: str
    token: int


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A snapshot of a run's durable record (times in the store's clock, ms since the epoch)."""

    key: RunKey
    status: RunStatus
    input_hash: str
    user_id: str
    attempt: int
    last_seq: int
    lease_holder: str | None
    lease_token: int
    lease_expires_at_ms: int
    lease_live: bool  # judged by the store's clock when the snapshot was taken
    cancel_requested: bool
    handle: Mapping[str, Any] | None
    final_text: str | None
    created_at_ms: int
    finished_at_ms: int | None
    # Finished with a persistence hook that has not confirmed yet (see ``mark_persisted``).
    persist_pending: bool = False
    # The store's clock when the snapshot was taken (0 when a store does not say); not part
    # of what the record says about the run, so two snapshots of one state compare equal.
    observed_at_ms: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BeginResult:
    outcome: BeginOutcome
    run: RunRecord
    lease: Lease | None  # set for FRESH and TAKEOVER: the caller now owns the run


@dataclass(frozen=True, slots=True)
class RenewResult:
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class RenewRequest:
    key: RunKey
    lease: Lease


@dataclass(frozen=True, slots=True)
class AppendRequest:
    key: RunKey
    lease: Lease
    events: Sequence[NewEvent]


class TurnStore(Protocol):
    """Durable runs and their logs. Every write is atomic; every run write is fenced by a lease.

    ``retention_ms`` (a constructor setting of each store) is how long a finished run is kept;
    ``running_ttl_ms`` how long an unfinished run is kept after its last lease write (begin,
    claim, renew), so a run nobody finishes cannot stay forever.
    """

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
        """Atomically classify a turn request and, when FRESH or TAKEOVER, lease it.

        A TAKEOVER increments the fencing token; from then on the previous holder's writes
        raise :class:`LeaseLost`. A request with another ``input_hash`` is a MISMATCH and never
        touches the lease. ``user_id`` records who started the run (the first begin's) and is
        not compared: a user's run has its user in its key already, and a run of a tenant's
        shared sessions (``key.user_id is None``) is every one of its users' alike.

        ``reopen_failed=True`` (a retry of a failed turn): a run that ended FAILED is leased
        again like a TAKEOVER — status back to RUNNING, a new fencing token, the checkpoint,
        the finish and any pending persistence cleared, the cancel flag lowered, the running
        TTL again — and its log is kept: the new attempt appends after the failed terminal
        event (readers skip a terminal that has events after it). It is passed only when
        true, so a store that predates it still serves every other request.
        """
        ...

    async def append(self, key: RunKey, lease: Lease, events: Sequence[NewEvent]) -> list[int]:
        """Append events in order; return their seqs.

        An ``eventId`` already in the log is not written again: its existing seq is returned.
        Raises :class:`LeaseLost` if ``lease`` is not the current one (nothing is written),
        :class:`RunFinished` if the run already has its terminal event, ``ValueError`` for a
        terminal event (use :meth:`finish`).
        """
        ...

    async def append_batch(
        self, requests: Sequence[AppendRequest]
    ) -> list[list[int] | TurnstreamError]:
        """Several appends, possibly to different runs, in one round trip where the store can.

        Each request is atomic on its own and fails on its own: the result for a request is
        its seqs or the error it would have raised.
        """
        ...

    async def read(self, key: RunKey, *, after: int = 0, limit: int = 512) -> list[LoggedEvent]:
        """Logged events with ``seq > after``, oldest first, at most ``limit``."""
        ...

    async def follow(
        self, key: RunKey, *, after: int, block_ms: int, limit: int = 512
    ) -> list[LoggedEvent]:
        """Like :meth:`read`, but wait up to ``block_ms`` for an event when none is there yet."""
        ...

    async def renew(self, key: RunKey, lease: Lease, *, lease_ms: int) -> RenewResult:
        """Extend the lease to now + ``lease_ms``; report whether a cancel was requested.

        The fence compares the lease's holder and token, not its expiry: a lease that lapsed
        while nobody took the run over is renewed like a live one (its holder was only cut off
        from the store); after a takeover it raises :class:`LeaseLost`.
        """
        ...

    async def renew_batch(
        self, requests: Sequence[RenewRequest], *, lease_ms: int
    ) -> list[RenewResult | TurnstreamError]:
        """Several renews in one round trip where the store can; each fails on its own."""
        ...

    async def set_handle(self, key: RunKey, lease: Lease, handle: Mapping[str, Any]) -> None:
        """Persist the run handle a fresh supervisor re-attaches by (fenced)."""
        ...

    async def restart(self, key: RunKey, lease: Lease) -> int:
        """Start a new attempt of the run (fenced); return the new attempt number.

        At most once per lease: a repeated call with the same lease (a retry after a lost
        reply) returns the attempt the first one began instead of counting another.
        """
        ...

    async def request_cancel(self, key: RunKey) -> bool:
        """Raise the run's cancel flag; True if the run exists and is unfinished."""
        ...

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
        """Atomically checkpoint the final text, append the terminal event, release the lease
        and start the retention clock. Return the terminal event's seq.

        With ``persist_after_ms`` the run is marked ``persist_pending``: its owner is about to
        run the persistence hook, and :meth:`claim_persist` lets another worker retry it once
        that many ms passed without :meth:`mark_persisted`.

        Retrying a finish with the same lease returns the same seq.
        """
        ...

    async def claim_persist(
        self, key: RunKey, *, holder: str, lease_ms: int
    ) -> RunRecord | None:
        """Take the persistence of a finished run whose owner did not confirm it in time.

        The record when the run is finished, ``persist_pending`` and due (then it is not due
        again for ``lease_ms``, so concurrent sweepers do not all persist it); else None.
        """
        ...

    async def mark_persisted(self, key: RunKey) -> None:
        """The persistence hook of a finished run succeeded: clear ``persist_pending``."""
        ...

    async def pending_persists(self, *, limit: int = 100) -> list[RunKey]:
        """Finished runs whose persistence is pending and due, oldest due first (best effort:
        callers confirm with :meth:`claim_persist`)."""
        ...

    async def release(self, key: RunKey, lease: Lease) -> None:
        """Let the lease lapse now (graceful shutdown) so another worker can take over at once.

        A lease that is no longer current is ignored.
        """
        ...

    async def claim(self, key: RunKey, *, holder: str, lease_ms: int) -> BeginResult | None:
        """Take over a run whose lease lapsed, without an input (the sweeper, a resume GET).

        None when there is no such run; COMPLETED when it finished; LIVE while its lease is
        held; TAKEOVER (lease given to ``holder`` with a new fencing token) when it lapsed.
        Never creates a run.
        """
        ...

    async def lapsed_runs(
        self, *, limit: int = 100, local_after_ms: int | None = None
    ) -> list[RunKey]:
        """Unfinished runs whose lease lapsed: those with a run handle (what the orphan
        sweeper can re-attach to) as soon as it lapsed, oldest expiry first; with
        ``local_after_ms``, then also those without one (a local producer's, which nothing
        can re-attach) once lapsed that long, so the sweeper can finish them.

        Best effort (on Redis an index beside the runs, which are the truth): a key may be
        stale, so callers confirm with :meth:`claim`.
        """
        ...

    async def get_run(self, key: RunKey) -> RunRecord | None:
        """The run's record, or None when there is none (or it expired)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
