"""The store conformance suite: what every :class:`~turnstream.TurnStore` must do, as tests.

One suite, every backend (memory, fakeredis, a real Redis server, and stores written
elsewhere). Subclass :class:`StoreConformance` in a ``test_*.py`` module under a name pytest
collects (``Test…``) and give it a ``store`` fixture; see the class docstring.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, NoReturn

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .. import _events
from .._events import LoggedEvent, NewEvent
from .._exceptions import LeaseLost, RunFinished, TurnstreamError
from .._identity import derive_execution_id
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
    TurnStore,
)

__all__ = ["StoreConformance"]

_TERMINAL_TYPE = {
    RunStatus.COMPLETED: _events.COMPLETED,
    RunStatus.FAILED: _events.FAILED,
    RunStatus.CANCELLED: _events.CANCELLED,
}

# A small alphabet so the property test draws many repeats.
_PROPERTY_EVENT_IDS = [f"evt-{n}" for n in range(6)]


def _delta(event_id: str, text: str | None = None) -> NewEvent:
    return NewEvent.build(
        event_id, {"type": _events.TEXT_DELTA, "delta": f"<{event_id}>" if text is None else text}
    )


def _terminal(status: RunStatus, event_id: str = "terminal") -> NewEvent:
    return NewEvent.build(event_id, {"type": _TERMINAL_TYPE[status]})


def _summary(events: Sequence[LoggedEvent]) -> list[tuple[int, str]]:
    """``(seq, eventId)`` pairs: what an assertion message should show of a log."""
    return [(event.seq, event.event_id) for event in events]


class StoreConformance:
    """The store conformance tests. Subclass it and provide a ``store`` fixture::

        class TestMyStore(StoreConformance):
            @pytest.fixture
            async def store(self) -> AsyncIterator[TurnStore]:
                store = MyStore(...)
                yield store
                await store.aclose()

    ``store`` must be function-scoped in effect: every test takes runs under fresh random
    keys, so a store shared between tests works too, but it must be usable on the running
    test's event loop. The tests are ``async def``: run them with pytest-asyncio
    (``asyncio_mode = "auto"``, or mark the subclass ``@pytest.mark.asyncio``).

    Two hooks make time pass for stores whose clock the tests cannot move:

    * :meth:`advance_clock` lets ``ms`` of the store's clock go by (default: sleep, which
      is right for a store on wall-clock time such as Redis).
    * :meth:`lapse_lease` makes a lease lapse as if its owner died, without releasing it
      (default: renew it for 1 ms, then :meth:`advance_clock` past that).

    Override either for a store with a fake clock or a chaos hook (``MemoryStore`` has
    ``expire_lease``) to keep the suite free of sleeps. With the defaults the suite sleeps
    about a second in all. A lease lapsed by :meth:`lapse_lease` must show in
    :meth:`~turnstream.TurnStore.lapsed_runs` like one whose owner died (a hook that edits a
    run behind the back of the store's own index would hide it).

    The :meth:`~turnstream.TurnStore.lapsed_runs` tests look only for their own runs in its
    answer, so a store shared between tests works here too, as long as it does not hold
    more than 100,000 lapsed runs.
    """

    #: Leases the suite takes when it does not want them to lapse during a test.
    lease_ms: ClassVar[int] = 30_000
    #: How far past a 1 ms lease :meth:`lapse_lease` waits by default (clock granularity).
    lapse_margin_ms: ClassVar[int] = 25

    # -- what a subclass provides ---------------------------------------------------------

    @pytest.fixture
    def store(self) -> NoReturn:
        pytest.fail(
            "StoreConformance needs a `store` fixture: override it in your subclass", pytrace=False
        )

    async def advance_clock(self, store: TurnStore, ms: int) -> None:
        """Let ``ms`` milliseconds of ``store``'s clock pass."""
        await anyio.sleep(ms / 1000)

    async def lapse_lease(self, store: TurnStore, key: RunKey, lease: Lease) -> None:
        """Make ``lease`` (the current lease of ``key``) lapse, as if its owner died."""
        # renew() sets the expiry to now + lease_ms, so it can shorten a lease as well.
        await store.renew(key, lease, lease_ms=1)
        await self.advance_clock(store, 1 + self.lapse_margin_ms)

    # -- helpers --------------------------------------------------------------------------

    def new_key(self, tenant_id: str | None = None) -> RunKey:
        """A run key no other test uses, so a store shared between tests works too."""
        unique = uuid.uuid4().hex
        return RunKey(
            tenant_id=tenant_id if tenant_id is not None else f"tenant-{unique[:8]}",
            execution_id=derive_execution_id("project", f"session {unique}", 3),
        )

    async def begin(
        self,
        store: TurnStore,
        key: RunKey,
        holder: str = "worker-a",
        *,
        input_hash: str = "hash-1",
        lease_ms: int | None = None,
        user_id: str = "user-1",
        reopen_failed: bool = False,
    ) -> BeginResult:
        extra = {"reopen_failed": True} if reopen_failed else {}
        return await store.begin(
            key,
            input_hash=input_hash,
            user_id=user_id,
            holder=holder,
            lease_ms=self.lease_ms if lease_ms is None else lease_ms,
            **extra,
        )

    async def own(
        self, store: TurnStore, key: RunKey, holder: str = "worker-a", *, input_hash: str = "hash-1"
    ) -> Lease:
        """Begin a fresh run and return its lease."""
        result = await self.begin(store, key, holder, input_hash=input_hash)
        assert result.outcome is BeginOutcome.FRESH, result
        assert result.lease is not None
        return result.lease

    async def own_reconnectable(
        self, store: TurnStore, key: RunKey, holder: str = "worker-a"
    ) -> Lease:
        """Begin a fresh run with a run handle (what the orphan sweeper can re-attach)."""
        lease = await self.own(store, key, holder)
        await store.set_handle(key, lease, {"kind": "k", "runId": key.execution_id, "data": {}})
        return lease

    async def take_over(
        self, store: TurnStore, key: RunKey, lease: Lease, holder: str = "worker-b"
    ) -> Lease:
        """Let ``lease`` lapse and take the run over as ``holder``; return the new lease."""
        await self.lapse_lease(store, key, lease)
        result = await self.begin(store, key, holder)
        assert result.outcome is BeginOutcome.TAKEOVER, result
        assert result.lease is not None
        return result.lease

    async def run_record(self, store: TurnStore, key: RunKey) -> RunRecord:
        record = await store.get_run(key)
        assert record is not None, f"no run record for {key}"
        return record

    async def log(self, store: TurnStore, key: RunKey) -> list[LoggedEvent]:
        return await store.read(key, after=0, limit=100_000)

    async def claim(
        self,
        store: TurnStore,
        key: RunKey,
        holder: str = "worker-b",
        *,
        lease_ms: int | None = None,
    ) -> BeginResult | None:
        return await store.claim(
            key, holder=holder, lease_ms=self.lease_ms if lease_ms is None else lease_ms
        )

    async def lapsed_among(self, store: TurnStore, keys: Sequence[RunKey]) -> list[RunKey]:
        """Those of ``keys`` that ``lapsed_runs`` lists, in its order (the store may hold more)."""
        wanted = set(keys)
        return [key for key in await store.lapsed_runs(limit=100_000) if key in wanted]

    # -- begin ----------------------------------------------------------------------------

    async def test_begin_fresh_creates_the_run_and_leases_it(self, store: TurnStore) -> None:
        key = self.new_key()
        result = await store.begin(
            key, input_hash="hash-1", user_id="user-1", holder="worker-a", lease_ms=self.lease_ms
        )
        assert result.outcome is BeginOutcome.FRESH
        assert result.lease == Lease("worker-a", 1)
        run = result.run
        assert run.key == key
        assert run.status is RunStatus.RUNNING
        assert run.input_hash == "hash-1"
        assert run.user_id == "user-1"
        assert run.attempt == 1
        assert run.last_seq == 0
        assert (run.lease_holder, run.lease_token) == ("worker-a", 1)
        assert run.lease_live is True
        # Both times come from the one `now` of the begin: this catches seconds-vs-ms too.
        assert abs(run.lease_expires_at_ms - run.created_at_ms - self.lease_ms) <= 1_000, run
        assert run.cancel_requested is False
        assert run.handle is None
        assert run.final_text is None
        assert run.finished_at_ms is None
        assert await store.get_run(key) == run

    async def test_get_run_of_an_unknown_run_is_none(self, store: TurnStore) -> None:
        assert await store.get_run(self.new_key()) is None

    async def test_ping(self, store: TurnStore) -> None:
        await store.ping()

    async def test_begin_live_while_the_lease_is_held(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key, "worker-a")
        await store.append(key, lease, [_delta("e1")])
        before = await self.run_record(store, key)
        for holder in ("worker-b", "worker-a"):
            result = await self.begin(store, key, holder)
            assert result.outcome is BeginOutcome.LIVE, (holder, result)
            assert result.lease is None
            assert (result.run.lease_holder, result.run.lease_token) == ("worker-a", 1)
            assert result.run.lease_live is True
            assert result.run.status is RunStatus.RUNNING
            assert result.run.last_seq == 1
        after = await self.run_record(store, key)
        # Joining must not touch the lease.
        assert (after.lease_holder, after.lease_token, after.lease_expires_at_ms) == (
            before.lease_holder,
            before.lease_token,
            before.lease_expires_at_ms,
        )
        assert await store.append(key, lease, [_delta("e2")]) == [2]

    async def test_begin_takeover_after_the_lease_lapses(self, store: TurnStore) -> None:
        key = self.new_key()
        old = await self.own(store, key, "worker-a")
        await store.append(key, old, [_delta("e1"), _delta("e2")])
        await self.lapse_lease(store, key, old)
        lapsed = await self.run_record(store, key)
        assert lapsed.lease_live is False
        assert lapsed.status is RunStatus.RUNNING

        result = await self.begin(store, key, "worker-b")
        assert result.outcome is BeginOutcome.TAKEOVER
        assert result.lease is not None
        new = result.lease
        assert new.holder == "worker-b"
        assert new.token > old.token
        run = result.run
        assert (run.lease_holder, run.lease_token) == ("worker-b", new.token)
        assert run.lease_live is True
        assert run.status is RunStatus.RUNNING
        assert run.last_seq == 2
        assert run.attempt == 1  # a takeover resumes the attempt; restart() starts a new one
        assert run.input_hash == "hash-1"
        assert run.created_at_ms == lapsed.created_at_ms

        # The new holder writes; the next request joins the new holder.
        assert await store.append(key, new, [_delta("e3")]) == [3]
        joined = await self.begin(store, key, "worker-c")
        assert joined.outcome is BeginOutcome.LIVE
        assert joined.run.lease_holder == "worker-b"

    async def test_begin_completed_after_finish(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])
        seq = await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="done",
        )
        for holder in ("worker-a", "worker-b"):
            result = await self.begin(store, key, holder)
            assert result.outcome is BeginOutcome.COMPLETED, (holder, result)
            assert result.lease is None
            assert result.run.status is RunStatus.COMPLETED
            assert result.run.final_text == "done"
            assert result.run.last_seq == seq == 2
            assert result.run.lease_live is False
        # Replaying never reopens the run.
        with pytest.raises((RunFinished, LeaseLost)):
            await store.append(key, lease, [_delta("e2")])

    async def test_begin_mismatch_on_a_different_input_hash(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key, input_hash="hash-1")
        live = await self.begin(store, key, "worker-b", input_hash="hash-2")
        assert live.outcome is BeginOutcome.MISMATCH
        assert live.lease is None
        assert live.run.input_hash == "hash-1"

        # Even when the lease has lapsed, a mismatch must not take the run over.
        await self.lapse_lease(store, key, lease)
        lapsed = await self.begin(store, key, "worker-b", input_hash="hash-2")
        assert lapsed.outcome is BeginOutcome.MISMATCH
        assert lapsed.lease is None
        record = await self.run_record(store, key)
        assert (record.lease_holder, record.lease_token) == ("worker-a", lease.token)
        assert record.input_hash == "hash-1"
        # …and the run can still be taken over with the right input.
        assert (await self.begin(store, key, "worker-c")).outcome is BeginOutcome.TAKEOVER

    async def test_begin_by_another_user_shares_the_run_and_keeps_who_started_it(
        self, store: TurnStore
    ) -> None:
        # Under one key, another user's begin is the same turn (a tenant's shared session);
        # a user's own runs are kept apart by their keys (RunKey.user_id), not by begin.
        key = self.new_key()
        lease = await self.own(store, key)
        live = await self.begin(store, key, "worker-b", user_id="user-2")
        assert (live.outcome, live.lease) == (BeginOutcome.LIVE, None)
        await self.lapse_lease(store, key, lease)
        taken = await self.begin(store, key, "worker-b", user_id="user-2")
        assert taken.outcome is BeginOutcome.TAKEOVER
        record = await self.run_record(store, key)
        assert record.lease_holder == "worker-b"
        assert record.user_id == "user-1"  # who started it
        other = await self.begin(store, key, "worker-c", user_id="user-2", input_hash="other")
        assert (other.outcome, other.lease) == (BeginOutcome.MISMATCH, None)

    async def test_begin_mismatch_on_a_finished_run(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key, input_hash="hash-1")
        await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="x",
        )
        result = await self.begin(store, key, "worker-b", input_hash="hash-2")
        assert result.outcome is BeginOutcome.MISMATCH
        assert result.lease is None
        assert result.run.input_hash == "hash-1"
        assert result.run.status is RunStatus.COMPLETED

    async def test_concurrent_begins_lease_a_fresh_run_once(self, store: TurnStore) -> None:
        key = self.new_key()
        results: dict[str, BeginResult] = {}

        async def request(holder: str) -> None:
            results[holder] = await self.begin(store, key, holder)

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(request, f"worker-{n}")
        fresh = [h for h, r in results.items() if r.outcome is BeginOutcome.FRESH]
        live = [h for h, r in results.items() if r.outcome is BeginOutcome.LIVE]
        assert len(fresh) == 1, results
        assert len(live) == 5, results
        owner = fresh[0]
        assert all(results[h].run.lease_holder == owner for h in live), results
        assert (await self.run_record(store, key)).lease_holder == owner

    async def test_concurrent_begins_take_a_lapsed_run_over_once(self, store: TurnStore) -> None:
        key = self.new_key()
        old = await self.own(store, key, "worker-dead")
        await self.lapse_lease(store, key, old)
        results: dict[str, BeginResult] = {}

        async def request(holder: str) -> None:
            results[holder] = await self.begin(store, key, holder)

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(request, f"worker-{n}")
        takeovers = [r for r in results.values() if r.outcome is BeginOutcome.TAKEOVER]
        assert len(takeovers) == 1, results
        assert sum(r.outcome is BeginOutcome.LIVE for r in results.values()) == 5, results
        winner = takeovers[0].lease
        assert winner is not None
        record = await self.run_record(store, key)
        assert (record.lease_holder, record.lease_token) == (winner.holder, winner.token)

    # -- append ---------------------------------------------------------------------------

    async def test_append_assigns_contiguous_seqs_from_one(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        assert await store.append(key, lease, [_delta("e1")]) == [1]
        assert await store.append(key, lease, [_delta("e2"), _delta("e3"), _delta("e4")]) == [
            2,
            3,
            4,
        ]
        assert await store.append(key, lease, []) == []
        assert await store.append(key, lease, [_delta("e5")]) == [5]
        log = await self.log(store, key)
        assert _summary(log) == [(n, f"e{n}") for n in range(1, 6)]
        assert (await self.run_record(store, key)).last_seq == 5

    async def test_append_dedups_an_event_id_across_calls(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        assert await store.append(key, lease, [_delta("e1"), _delta("e2")]) == [1, 2]
        # A retried write (even with different bytes) is a no-op returning the existing seqs.
        assert await store.append(key, lease, [_delta("e1", "changed")]) == [1]
        assert await store.append(key, lease, [_delta("e2"), _delta("e3"), _delta("e1")]) == [
            2,
            3,
            1,
        ]
        log = await self.log(store, key)
        assert _summary(log) == [(1, "e1"), (2, "e2"), (3, "e3")]
        assert log[0].data == _delta("e1").data
        assert (await self.run_record(store, key)).last_seq == 3

    async def test_append_of_thousands_in_one_call_dedups_across_and_within_it(
        self, store: TurnStore
    ) -> None:
        # Past any chunking a store does inside one call (the Redis script works in chunks
        # of 1,000 ids): duplicates across the chunk boundaries and against earlier calls.
        key = self.new_key()
        lease = await self.own(store, key)
        first = [_delta(f"e{n}") for n in range(1, 1501)]
        assert await store.append(key, lease, first) == list(range(1, 1501))
        again = [_delta(f"e{n}") for n in range(1001, 3501)] + [_delta("e2"), _delta("e3000")]
        seqs = await store.append(key, lease, again)
        assert seqs == [*range(1001, 3501), 2, 3000]
        log = await self.log(store, key)
        assert _summary(log) == [(n, f"e{n}") for n in range(1, 3501)]
        assert (await self.run_record(store, key)).last_seq == 3500

    async def test_append_dedups_an_event_id_within_one_batch(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        seqs = await store.append(
            key, lease, [_delta("a"), _delta("b"), _delta("a", "again"), _delta("c"), _delta("b")]
        )
        assert seqs == [1, 2, 1, 3, 2]
        log = await self.log(store, key)
        assert _summary(log) == [(1, "a"), (2, "b"), (3, "c")]
        assert log[0].data == _delta("a").data  # the first one written wins

    async def test_events_read_back_byte_identical(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        events = [
            NewEvent.build(
                "unicode", {"type": "text-delta", "delta": 'héllo 🌍 "quoted" \\ \n\t\u2028'}
            ),
            NewEvent.build(
                "nested",
                {
                    "type": "tool-call",
                    "args": {"list": [1, 2.5, None, True, False, -7], "empty": {}, "s": ""},
                    "big": 2**53 - 1,
                },
            ),
            NewEvent.build("large", {"type": "text-delta", "delta": "x" * 100_000}),
            # Bytes another serialiser wrote (spaces, escapes, key order): kept verbatim, never
            # parsed and dumped again.
            NewEvent(
                event_id="raw",
                type="custom",
                data=b'{"type":"custom", "z" : 1,"a":"\\u00e9\\/","eventId":"raw"}',
            ),
        ]
        assert await store.append(key, lease, events) == [1, 2, 3, 4]
        log = await self.log(store, key)
        assert len(log) == len(events)
        for seq, (logged, sent) in enumerate(zip(log, events, strict=True), start=1):
            assert logged.seq == seq
            assert logged.event_id == sent.event_id
            assert logged.type == sent.type
            assert logged.data == sent.data
            assert logged.to_json().startswith(b'{"seq":%d,"type":' % seq)
            assert orjson.loads(logged.to_json()) == {"seq": seq, **orjson.loads(sent.data)}
            assert logged.terminal is False

    async def test_append_rejects_a_terminal_event_and_writes_nothing(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])
        for status in _TERMINAL_TYPE:
            with pytest.raises(ValueError):
                await store.append(key, lease, [_terminal(status)])
            # The whole batch is refused, not just the terminal event.
            with pytest.raises(ValueError):
                await store.append(key, lease, [_delta("e2"), _terminal(status)])
        assert _summary(await self.log(store, key)) == [(1, "e1")]
        assert (await self.run_record(store, key)).status is RunStatus.RUNNING
        assert await store.append(key, lease, [_delta("e2")]) == [2]

    async def test_a_writer_taken_over_gets_lease_lost_and_nothing_lands(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        stale = await self.own(store, key, "worker-a")
        assert await store.append(key, stale, [_delta("e1"), _delta("e2")]) == [1, 2]
        await store.set_handle(key, stale, {"kind": "test", "runId": "old"})
        current = await self.take_over(store, key, stale, "worker-b")

        with pytest.raises(LeaseLost):
            await store.append(key, stale, [_delta("e3", "from the dead writer")])
        with pytest.raises(LeaseLost):  # fenced before deduped: even a known id is refused
            await store.append(key, stale, [_delta("e1")])
        with pytest.raises(LeaseLost):
            await store.set_handle(key, stale, {"kind": "test", "runId": "stale"})
        with pytest.raises(LeaseLost):
            await store.restart(key, stale)
        with pytest.raises(LeaseLost):
            await store.renew(key, stale, lease_ms=self.lease_ms)
        with pytest.raises(LeaseLost):
            await store.finish(
                key,
                stale,
                status=RunStatus.FAILED,
                terminal=_terminal(RunStatus.FAILED),
                final_text="stale",
            )
        [batch] = await store.append_batch([AppendRequest(key, stale, [_delta("e4")])])
        assert isinstance(batch, LeaseLost), batch

        # Nothing of the stale writer landed: not the events, not their ids, not the record.
        assert _summary(await self.log(store, key)) == [(1, "e1"), (2, "e2")]
        record = await self.run_record(store, key)
        assert record.status is RunStatus.RUNNING
        assert record.last_seq == 2
        assert record.attempt == 1
        assert record.handle == {"kind": "test", "runId": "old"}
        assert record.final_text is None
        assert (record.lease_holder, record.lease_token) == ("worker-b", current.token)
        # The ids the stale writer tried are fresh for the new holder.
        assert await store.append(key, current, [_delta("e3", "new"), _delta("e4")]) == [3, 4]
        log = await self.log(store, key)
        assert log[2].data == _delta("e3", "new").data

    async def test_the_full_lease_value_is_compared(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key, "worker-a")
        for wrong in (
            Lease("worker-a", lease.token + 1),  # right holder, a token never issued
            Lease("worker-b", lease.token),  # right token, another holder
        ):
            with pytest.raises(LeaseLost):
                await store.append(key, wrong, [_delta("e1")])
            with pytest.raises(LeaseLost):
                await store.renew(key, wrong, lease_ms=self.lease_ms)
        # A worker restarted under the same holder name took over: its old token is stale.
        current = await self.take_over(store, key, lease, "worker-a")
        assert current.holder == lease.holder
        assert current.token != lease.token
        with pytest.raises(LeaseLost):
            await store.append(key, lease, [_delta("e1")])
        assert await self.log(store, key) == []
        assert await store.append(key, current, [_delta("e1")]) == [1]

    async def test_append_to_an_unknown_run_raises_lease_lost(self, store: TurnStore) -> None:
        key = self.new_key()
        with pytest.raises(LeaseLost):
            await store.append(key, Lease("worker-a", 1), [_delta("e1")])
        assert await store.get_run(key) is None
        assert await store.read(key) == []

    async def test_append_after_finish_raises_run_finished(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])
        await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="t",
        )
        # The writer that finished the run is told so (not that it lost its lease)…
        with pytest.raises(RunFinished):
            await store.append(key, lease, [_delta("e2")])
        with pytest.raises(RunFinished):  # …even for an id the log already holds
            await store.append(key, lease, [_delta("e1")])
        [batch] = await store.append_batch([AppendRequest(key, lease, [_delta("e3")])])
        assert isinstance(batch, RunFinished), batch
        # …and no other fenced write of it lands either.
        with pytest.raises((RunFinished, LeaseLost)):
            await store.set_handle(key, lease, {"kind": "late"})
        with pytest.raises((RunFinished, LeaseLost)):
            await store.restart(key, lease)
        with pytest.raises((RunFinished, LeaseLost)):
            await store.renew(key, lease, lease_ms=self.lease_ms)
        log = await self.log(store, key)
        assert _summary(log) == [(1, "e1"), (2, "terminal")]
        record = await self.run_record(store, key)
        assert record.handle is None
        assert record.attempt == 1
        assert record.lease_live is False

    # -- append_batch ---------------------------------------------------------------------

    async def test_append_batch_serves_mixed_runs_in_order(self, store: TurnStore) -> None:
        one, two = self.new_key(), self.new_key()
        lease_one = await self.own(store, one, "worker-a")
        lease_two = await self.own(store, two, "worker-b")
        assert await store.append_batch([]) == []
        results = await store.append_batch(
            [
                AppendRequest(one, lease_one, [_delta("a"), _delta("b")]),
                AppendRequest(two, lease_two, [_delta("x")]),
                AppendRequest(one, lease_one, [_delta("b"), _delta("c")]),
                AppendRequest(two, lease_two, [_delta("y"), _delta("x")]),
                AppendRequest(one, lease_one, []),
            ]
        )
        assert results == [[1, 2], [1], [2, 3], [2, 1], []]
        assert _summary(await self.log(store, one)) == [(1, "a"), (2, "b"), (3, "c")]
        assert _summary(await self.log(store, two)) == [(1, "x"), (2, "y")]

    async def test_append_batch_failures_are_per_request(self, store: TurnStore) -> None:
        ok, taken, finished = self.new_key(), self.new_key(), self.new_key()
        lease_ok = await self.own(store, ok)
        stale = await self.own(store, taken, "worker-a")
        current = await self.take_over(store, taken, stale, "worker-b")
        lease_finished = await self.own(store, finished)
        await store.finish(
            finished,
            lease_finished,
            status=RunStatus.CANCELLED,
            terminal=_terminal(RunStatus.CANCELLED),
            final_text=None,
        )
        results = await store.append_batch(
            [
                AppendRequest(ok, lease_ok, [_delta("e1")]),
                AppendRequest(taken, stale, [_delta("s1")]),
                AppendRequest(ok, lease_ok, [_delta("e2")]),
                AppendRequest(finished, lease_finished, [_delta("f1")]),
                AppendRequest(taken, current, [_delta("c1")]),
                AppendRequest(ok, lease_ok, [_delta("e1"), _delta("e3")]),
            ]
        )
        assert len(results) == 6
        assert results[0] == [1]
        assert isinstance(results[1], LeaseLost), results
        assert results[2] == [2]
        assert isinstance(results[3], RunFinished), results
        assert results[4] == [1]
        assert results[5] == [1, 3]
        assert all(isinstance(r, list | TurnstreamError) for r in results)
        assert _summary(await self.log(store, ok)) == [(1, "e1"), (2, "e2"), (3, "e3")]
        assert _summary(await self.log(store, taken)) == [(1, "c1")]
        assert _summary(await self.log(store, finished)) == [(1, "terminal")]

    # -- read -----------------------------------------------------------------------------

    async def test_read_windows(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta(f"e{n}") for n in range(1, 11)])

        async def seqs(after: int, limit: int = 512) -> list[int]:
            return [event.seq for event in await store.read(key, after=after, limit=limit)]

        assert await seqs(0) == list(range(1, 11))
        assert [e.seq for e in await store.read(key)] == list(range(1, 11))
        assert await seqs(3, 4) == [4, 5, 6, 7]
        assert await seqs(0, 1) == [1]
        assert await seqs(8, 10) == [9, 10]
        assert await seqs(9) == [10]
        assert await seqs(10) == []
        assert await seqs(50) == []
        events = await store.read(key, after=4, limit=2)
        assert [(e.event_id, e.data) for e in events] == [
            ("e5", _delta("e5").data),
            ("e6", _delta("e6").data),
        ]

    async def test_read_has_a_default_limit_of_512(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta(f"e{n}") for n in range(1, 521)])
        first = await store.read(key)
        assert [e.seq for e in first] == list(range(1, 513))
        assert [e.seq for e in await store.read(key, after=first[-1].seq)] == list(range(513, 521))

    async def test_read_of_an_unknown_run_is_empty(self, store: TurnStore) -> None:
        assert await store.read(self.new_key()) == []
        assert await store.read(self.new_key(), after=5, limit=10) == []

    # -- follow ---------------------------------------------------------------------------

    async def test_follow_returns_at_once_when_events_exist(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1"), _delta("e2"), _delta("e3")])
        started = anyio.current_time()
        with anyio.fail_after(5):
            events = await store.follow(key, after=1, block_ms=10_000)
            assert _summary(events) == [(2, "e2"), (3, "e3")]
            limited = await store.follow(key, after=0, block_ms=10_000, limit=2)
            assert _summary(limited) == [(1, "e1"), (2, "e2")]
        assert anyio.current_time() - started < 2.0

    @staticmethod
    async def follow_across(
        store: TurnStore, key: RunKey, after: int, action: Callable[[], Awaitable[object]]
    ) -> tuple[list[LoggedEvent], float]:
        """Follow ``key`` after ``after`` while ``action`` runs once the follower blocks; return
        what it got and how long after the action it returned."""
        followed: list[LoggedEvent] = []
        returned_at: list[float] = []

        async def reader() -> None:
            followed.extend(await store.follow(key, after=after, block_ms=10_000))
            returned_at.append(anyio.current_time())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.2)  # let the reader block
                assert returned_at == [], f"follow returned {followed} before the action"
                acted_at = anyio.current_time()
                await action()
        return followed, returned_at[0] - acted_at

    async def test_follow_blocks_until_an_event_is_appended(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])

        async def append() -> None:
            assert await store.append(key, lease, [_delta("e2")]) == [2]

        followed, delay = await self.follow_across(store, key, 1, append)
        assert _summary(followed) == [(2, "e2")]
        assert followed[0].data == _delta("e2").data
        assert delay < 3.0  # woken by the append, not by the block timeout

    async def test_follow_times_out_with_nothing(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])
        started = anyio.current_time()
        with anyio.fail_after(10):
            events = await store.follow(key, after=1, block_ms=250)
        elapsed = anyio.current_time() - started
        assert events == []
        assert 0.2 <= elapsed < 5.0, elapsed

    async def test_follow_of_a_finished_run_returns_the_terminal_event(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])
        terminal = _terminal(RunStatus.COMPLETED)
        await store.finish(
            key, lease, status=RunStatus.COMPLETED, terminal=terminal, final_text="t"
        )
        started = anyio.current_time()
        with anyio.fail_after(5):
            events = await store.follow(key, after=1, block_ms=10_000)
        assert anyio.current_time() - started < 2.0
        assert _summary(events) == [(2, "terminal")]
        assert events[0].terminal
        assert events[0].data == terminal.data

    async def test_follow_wakes_when_the_run_finishes(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])

        async def finish() -> None:
            await store.finish(
                key,
                lease,
                status=RunStatus.FAILED,
                terminal=_terminal(RunStatus.FAILED),
                final_text=None,
            )

        followed, delay = await self.follow_across(store, key, 1, finish)
        assert _summary(followed) == [(2, "terminal")]
        assert followed[0].type == _events.FAILED
        assert delay < 3.0

    # -- renew ----------------------------------------------------------------------------

    async def test_renew_extends_the_lease(self, store: TurnStore) -> None:
        key = self.new_key()
        result = await self.begin(store, key, "worker-a", lease_ms=300)
        assert result.lease is not None
        lease = result.lease
        before = await self.run_record(store, key)
        renewed = await store.renew(key, lease, lease_ms=self.lease_ms)
        assert renewed.cancel_requested is False
        after = await self.run_record(store, key)
        assert after.lease_expires_at_ms - before.lease_expires_at_ms >= self.lease_ms - 300 - 1_000
        assert (after.lease_holder, after.lease_token) == ("worker-a", lease.token)
        assert after.lease_live is True
        # Past the original expiry the run is still held: the next request joins it.
        await self.advance_clock(store, 450)
        joined = await self.begin(store, key, "worker-b")
        assert joined.outcome is BeginOutcome.LIVE, joined
        assert await store.append(key, lease, [_delta("e1")]) == [1]

    async def test_renew_reports_a_requested_cancel(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        assert (await store.renew(key, lease, lease_ms=self.lease_ms)).cancel_requested is False
        assert await store.request_cancel(key) is True
        assert (await store.renew(key, lease, lease_ms=self.lease_ms)).cancel_requested is True
        # The flag stays up: every later heartbeat sees it.
        assert (await store.renew(key, lease, lease_ms=self.lease_ms)).cancel_requested is True

    async def test_renew_with_a_stale_lease_raises_lease_lost(self, store: TurnStore) -> None:
        key = self.new_key()
        stale = await self.own(store, key, "worker-a")
        current = await self.take_over(store, key, stale, "worker-b")
        before = await self.run_record(store, key)
        with pytest.raises(LeaseLost):
            await store.renew(key, stale, lease_ms=self.lease_ms * 10)
        after = await self.run_record(store, key)
        assert (after.lease_holder, after.lease_token) == ("worker-b", current.token)
        assert after.lease_expires_at_ms == before.lease_expires_at_ms

    # -- handle and restart ---------------------------------------------------------------

    async def test_set_handle_round_trips(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        handle: dict[str, Any] = {
            "kind": "orchestrator",
            "runId": "run-42",
            "cursor": {"after": "evt-9", "n": 3},
            "flags": [True, False, None, 2.5, "ü🌍"],
            "empty": {},
        }
        await store.set_handle(key, lease, handle)
        record = await self.run_record(store, key)
        assert record.handle is not None
        assert dict(record.handle) == handle
        replaced = {"kind": "orchestrator", "runId": "run-43"}
        await store.set_handle(key, lease, replaced)
        record = await self.run_record(store, key)
        assert record.handle is not None
        assert dict(record.handle) == replaced
        # What a fresh supervisor re-attaches by: the takeover hands it over.
        await self.lapse_lease(store, key, lease)
        takeover = await self.begin(store, key, "worker-b")
        assert takeover.outcome is BeginOutcome.TAKEOVER
        assert takeover.run.handle is not None
        assert dict(takeover.run.handle) == replaced

    async def test_restart_starts_a_new_attempt(self, store: TurnStore) -> None:
        key = self.new_key()
        stale = await self.own(store, key, "worker-a")
        assert await store.restart(key, stale) == 2
        assert (await self.run_record(store, key)).attempt == 2
        current = await self.take_over(store, key, stale, "worker-b")
        assert (await self.run_record(store, key)).attempt == 2  # takeover keeps the attempt
        with pytest.raises(LeaseLost):
            await store.restart(key, stale)
        assert (await self.run_record(store, key)).attempt == 2
        assert await store.restart(key, current) == 3
        record = await self.run_record(store, key)
        assert record.attempt == 3
        assert record.status is RunStatus.RUNNING

    async def test_restart_counts_once_per_lease(self, store: TurnStore) -> None:
        # A pump that retries its restart after a lost reply must not skip an attempt.
        key = self.new_key()
        lease = await self.own(store, key)
        assert await store.restart(key, lease) == 2
        assert await store.restart(key, lease) == 2
        assert (await self.run_record(store, key)).attempt == 2
        current = await self.take_over(store, key, lease)
        assert await store.restart(key, current) == 3
        assert await store.restart(key, current) == 3

    # -- request_cancel -------------------------------------------------------------------

    async def test_request_cancel_of_an_unfinished_run(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        assert (await self.run_record(store, key)).cancel_requested is False
        assert await store.request_cancel(key) is True
        assert await store.request_cancel(key) is True  # idempotent
        record = await self.run_record(store, key)
        assert record.cancel_requested is True
        assert record.status is RunStatus.RUNNING  # the pump ends the run, not the request
        assert await store.append(key, lease, [_delta("e1")]) == [1]
        # A run whose owner died can still be cancelled.
        other = self.new_key()
        dead = await self.own(store, other)
        await self.lapse_lease(store, other, dead)
        assert await store.request_cancel(other) is True
        assert (await self.run_record(store, other)).cancel_requested is True

    async def test_request_cancel_of_an_unknown_or_finished_run(self, store: TurnStore) -> None:
        unknown = self.new_key()
        assert await store.request_cancel(unknown) is False
        assert await store.get_run(unknown) is None  # asking does not create the run
        key = self.new_key()
        lease = await self.own(store, key)
        await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="t",
        )
        assert await store.request_cancel(key) is False
        assert (await self.run_record(store, key)).status is RunStatus.COMPLETED

    # -- finish ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("status", "final_text"),
        [
            (RunStatus.COMPLETED, "Hello, wörld 🌍\n"),
            (RunStatus.COMPLETED, ""),
            (RunStatus.FAILED, None),
            (RunStatus.CANCELLED, "partial"),
        ],
    )
    async def test_finish_checkpoints_and_ends_the_log(
        self, store: TurnStore, status: RunStatus, final_text: str | None
    ) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1"), _delta("e2"), _delta("e3")])
        created = (await self.run_record(store, key)).created_at_ms
        terminal = NewEvent.build("the-end", {"type": _TERMINAL_TYPE[status], "note": "bye"})
        seq = await store.finish(
            key, lease, status=status, terminal=terminal, final_text=final_text
        )
        assert seq == 4
        record = await self.run_record(store, key)
        assert record.status is status
        assert record.final_text == final_text
        assert record.last_seq == 4
        assert record.lease_holder is None
        assert record.lease_live is False
        assert record.finished_at_ms is not None
        assert record.finished_at_ms >= created
        log = await self.log(store, key)
        assert _summary(log) == [(1, "e1"), (2, "e2"), (3, "e3"), (4, "the-end")]
        assert [event.terminal for event in log] == [False, False, False, True]
        assert log[-1].data == terminal.data
        assert log[-1].type == _TERMINAL_TYPE[status]
        result = await self.begin(store, key, "worker-b")
        assert result.outcome is BeginOutcome.COMPLETED
        assert result.run.final_text == final_text

    async def test_finish_of_an_empty_log_logs_the_terminal_event_first(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        seq = await store.finish(
            key,
            lease,
            status=RunStatus.FAILED,
            terminal=_terminal(RunStatus.FAILED),
            final_text=None,
        )
        assert seq == 1
        assert _summary(await self.log(store, key)) == [(1, "terminal")]

    async def test_a_retried_finish_returns_the_same_seq(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1"), _delta("e2")])
        terminal = _terminal(RunStatus.COMPLETED)
        first = await store.finish(
            key, lease, status=RunStatus.COMPLETED, terminal=terminal, final_text="t"
        )
        record = await self.run_record(store, key)
        again = await store.finish(
            key, lease, status=RunStatus.COMPLETED, terminal=terminal, final_text="t"
        )
        assert first == again == 3
        log = await self.log(store, key)
        assert _summary(log) == [(1, "e1"), (2, "e2"), (3, "terminal")]
        assert sum(event.terminal for event in log) == 1
        assert await self.run_record(store, key) == record

    async def test_finish_with_a_stale_lease_raises_lease_lost(self, store: TurnStore) -> None:
        key = self.new_key()
        stale = await self.own(store, key, "worker-a")
        await store.append(key, stale, [_delta("e1")])
        current = await self.take_over(store, key, stale, "worker-b")
        with pytest.raises(LeaseLost):
            await store.finish(
                key,
                stale,
                status=RunStatus.COMPLETED,
                terminal=_terminal(RunStatus.COMPLETED, "stale-end"),
                final_text="stale",
            )
        record = await self.run_record(store, key)
        assert record.status is RunStatus.RUNNING
        assert record.final_text is None
        assert _summary(await self.log(store, key)) == [(1, "e1")]
        seq = await store.finish(
            key,
            current,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="real",
        )
        assert seq == 2
        # Once finished, only the finishing lease gets the retry answer; the stale one does not.
        with pytest.raises(LeaseLost):
            await store.finish(
                key,
                stale,
                status=RunStatus.COMPLETED,
                terminal=_terminal(RunStatus.COMPLETED, "stale-end"),
                final_text="stale",
            )
        log = await self.log(store, key)
        assert _summary(log) == [(1, "e1"), (2, "terminal")]
        assert sum(event.terminal for event in log) == 1
        assert (await self.run_record(store, key)).final_text == "real"

    async def test_finish_rejects_a_non_terminal_event(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        with pytest.raises(ValueError):
            await store.finish(
                key, lease, status=RunStatus.COMPLETED, terminal=_delta("e1"), final_text="t"
            )
        assert await self.log(store, key) == []
        record = await self.run_record(store, key)
        assert record.status is RunStatus.RUNNING
        assert record.lease_holder == "worker-a"

    # -- release --------------------------------------------------------------------------

    async def test_release_lets_the_lease_lapse_at_once(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key, "worker-a")
        await store.append(key, lease, [_delta("e1")])
        await store.release(key, lease)
        record = await self.run_record(store, key)
        assert record.lease_live is False
        assert record.status is RunStatus.RUNNING
        result = await self.begin(store, key, "worker-b")
        assert result.outcome is BeginOutcome.TAKEOVER
        assert result.lease is not None
        assert result.lease.token > lease.token
        assert result.run.last_seq == 1
        with pytest.raises(LeaseLost):
            await store.append(key, lease, [_delta("e2")])
        assert await store.append(key, result.lease, [_delta("e2")]) == [2]

    async def test_release_of_a_stale_lease_is_ignored(self, store: TurnStore) -> None:
        key = self.new_key()
        stale = await self.own(store, key, "worker-a")
        current = await self.take_over(store, key, stale, "worker-b")
        before = await self.run_record(store, key)
        await store.release(key, stale)
        await store.release(key, Lease("worker-b", current.token + 1))
        await store.release(key, Lease("worker-c", current.token))
        await store.release(self.new_key(), current)  # an unknown run: nothing to do
        after = await self.run_record(store, key)
        assert after.lease_live is True
        assert (after.lease_holder, after.lease_token, after.lease_expires_at_ms) == (
            before.lease_holder,
            before.lease_token,
            before.lease_expires_at_ms,
        )
        assert (await self.begin(store, key, "worker-c")).outcome is BeginOutcome.LIVE
        assert await store.append(key, current, [_delta("e1")]) == [1]

    # -- claim ----------------------------------------------------------------------------

    async def test_claim_of_an_unknown_run_is_none_and_creates_nothing(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        assert await self.claim(store, key) is None
        assert await self.claim(store, key, "worker-a") is None
        assert await store.get_run(key) is None
        assert await store.read(key) == []
        assert await self.lapsed_among(store, [key]) == []
        # The run begins from scratch afterwards: the first token, a fresh record.
        assert await self.own(store, key, "worker-a") == Lease("worker-a", 1)

    async def test_claim_of_a_live_run_joins_and_leaves_the_lease(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key, "worker-a")
        await store.append(key, lease, [_delta("e1")])
        before = await self.run_record(store, key)
        for holder in ("worker-b", "worker-a"):
            result = await self.claim(store, key, holder)
            assert result is not None
            assert result.outcome is BeginOutcome.LIVE, (holder, result)
            assert result.lease is None
            assert (result.run.lease_holder, result.run.lease_token) == ("worker-a", lease.token)
            assert result.run.lease_live is True
            assert result.run.last_seq == 1
        after = await self.run_record(store, key)
        assert (after.lease_holder, after.lease_token, after.lease_expires_at_ms) == (
            before.lease_holder,
            before.lease_token,
            before.lease_expires_at_ms,
        )
        assert await store.append(key, lease, [_delta("e2")]) == [2]

    async def test_claim_of_a_finished_run_is_completed(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.append(key, lease, [_delta("e1")])
        await self.lapse_lease(store, key, lease)  # a lapsed lease does not reopen it either
        await store.finish(
            key,
            lease,
            status=RunStatus.CANCELLED,
            terminal=_terminal(RunStatus.CANCELLED),
            final_text="partial",
        )
        record = await self.run_record(store, key)
        for holder in ("worker-a", "worker-b"):
            result = await self.claim(store, key, holder)
            assert result is not None
            assert result.outcome is BeginOutcome.COMPLETED, (holder, result)
            assert result.lease is None
            assert result.run.status is RunStatus.CANCELLED
            assert result.run.final_text == "partial"
            assert result.run.last_seq == 2
            assert result.run.lease_live is False
        assert await self.run_record(store, key) == record
        assert _summary(await self.log(store, key)) == [(1, "e1"), (2, "terminal")]

    async def test_claim_takes_over_a_lapsed_run_and_fences_the_old_holder(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        old = await self.own(store, key, "worker-a")
        await store.append(key, old, [_delta("e1"), _delta("e2")])
        await store.set_handle(key, old, {"kind": "test", "runId": "r1"})
        await self.lapse_lease(store, key, old)
        lapsed = await self.run_record(store, key)
        assert lapsed.lease_live is False

        result = await self.claim(store, key, "worker-b")
        assert result is not None
        assert result.outcome is BeginOutcome.TAKEOVER, result
        assert result.lease == Lease("worker-b", old.token + 1)
        run = result.run
        assert (run.lease_holder, run.lease_token) == ("worker-b", old.token + 1)
        assert run.lease_live is True
        assert run.status is RunStatus.RUNNING
        assert run.last_seq == 2
        assert run.attempt == 1  # like begin's takeover: the attempt goes on
        assert (run.input_hash, run.user_id) == ("hash-1", "user-1")
        assert run.created_at_ms == lapsed.created_at_ms
        assert run.handle is not None and dict(run.handle) == {"kind": "test", "runId": "r1"}
        # now + lease_ms by the store's clock: not before the run was created, and not later
        # than this test could have taken.
        expiry_after_creation = run.lease_expires_at_ms - run.created_at_ms - self.lease_ms
        assert 0 <= expiry_after_creation < 30_000, run
        assert await store.get_run(key) == run

        new = result.lease
        with pytest.raises(LeaseLost):
            await store.append(key, old, [_delta("e3", "from the dead writer")])
        with pytest.raises(LeaseLost):
            await store.renew(key, old, lease_ms=self.lease_ms)
        with pytest.raises(LeaseLost):
            await store.set_handle(key, old, {"kind": "test", "runId": "stale"})
        with pytest.raises(LeaseLost):
            await store.restart(key, old)
        with pytest.raises(LeaseLost):
            await store.finish(
                key,
                old,
                status=RunStatus.FAILED,
                terminal=_terminal(RunStatus.FAILED),
                final_text=None,
            )
        [batch] = await store.append_batch([AppendRequest(key, old, [_delta("e3")])])
        assert isinstance(batch, LeaseLost), batch
        await store.release(key, old)  # ignored: not the current lease
        assert (await self.run_record(store, key)).lease_live is True

        assert await store.append(key, new, [_delta("e3")]) == [3]
        for holder in ("worker-c", "worker-a"):
            claimed = await self.claim(store, key, holder)
            assert claimed is not None and claimed.outcome is BeginOutcome.LIVE, claimed
            assert claimed.run.lease_holder == "worker-b"
        joined = await self.begin(store, key, "worker-c")
        assert joined.outcome is BeginOutcome.LIVE
        assert _summary(await self.log(store, key)) == [(1, "e1"), (2, "e2"), (3, "e3")]

    async def test_every_takeover_increments_the_token(self, store: TurnStore) -> None:
        key = self.new_key()
        first = await self.own(store, key, "worker-a")
        leases = [first]
        for holder in ("worker-b", "worker-c"):
            await self.lapse_lease(store, key, leases[-1])
            result = await self.claim(store, key, holder)
            assert result is not None and result.lease is not None, result
            leases.append(result.lease)
        # begin and claim draw from the one counter.
        leases.append(await self.take_over(store, key, leases[-1], "worker-d"))
        # A released lease is claimable at once, without waiting for it to lapse.
        await store.release(key, leases[-1])
        result = await self.claim(store, key, "worker-a")
        assert result is not None and result.lease is not None, result
        leases.append(result.lease)
        assert [lease.token for lease in leases] == [1, 2, 3, 4, 5]
        assert leases[-1] == Lease("worker-a", 5)
        # The same holder name with an old token is a stale writer all the same.
        with pytest.raises(LeaseLost):
            await store.append(key, first, [_delta("e1")])
        record = await self.run_record(store, key)
        assert (record.lease_holder, record.lease_token) == ("worker-a", 5)
        assert await store.append(key, leases[-1], [_delta("e1")]) == [1]

    async def test_a_claim_keeps_a_requested_cancel(self, store: TurnStore) -> None:
        key = self.new_key()
        lease = await self.own(store, key)
        assert await store.request_cancel(key) is True
        await self.lapse_lease(store, key, lease)
        result = await self.claim(store, key)
        assert result is not None and result.lease is not None, result
        assert result.run.cancel_requested is True  # the new owner ends the run as asked
        assert (await store.renew(key, result.lease, lease_ms=self.lease_ms)).cancel_requested

    async def test_concurrent_claims_take_a_lapsed_run_over_once(self, store: TurnStore) -> None:
        key = self.new_key()
        old = await self.own(store, key, "worker-dead")
        await self.lapse_lease(store, key, old)
        results: dict[str, BeginResult | None] = {}

        async def claim(holder: str) -> None:
            results[holder] = await self.claim(store, key, holder)

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(claim, f"worker-{n}")
        outcomes = [r.outcome if r is not None else None for r in results.values()]
        assert outcomes.count(BeginOutcome.TAKEOVER) == 1, results
        assert outcomes.count(BeginOutcome.LIVE) == 5, results
        [winner] = [r.lease for r in results.values() if r is not None and r.lease is not None]
        assert winner.token == old.token + 1
        record = await self.run_record(store, key)
        assert (record.lease_holder, record.lease_token) == (winner.holder, winner.token)

    # -- lapsed_runs ----------------------------------------------------------------------

    async def test_lapsed_runs_lists_unfinished_runs_whose_lease_lapsed(
        self, store: TurnStore
    ) -> None:
        live, orphan, done = self.new_key(), self.new_key(), self.new_key()
        await self.own_reconnectable(store, live)
        orphan_lease = await self.own_reconnectable(store, orphan)
        done_lease = await self.own_reconnectable(store, done)
        assert await self.lapsed_among(store, [live, orphan, done]) == []

        await self.lapse_lease(store, orphan, orphan_lease)
        await self.lapse_lease(store, done, done_lease)
        assert set(await self.lapsed_among(store, [live, orphan, done])) == {orphan, done}
        # A finished run is never an orphan, whatever its lease did.
        await store.finish(
            done,
            done_lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="t",
        )
        assert await self.lapsed_among(store, [live, orphan, done]) == [orphan]

        # What the sweeper does with it: claim it, after which it is no longer lapsed…
        result = await self.claim(store, orphan, "sweeper")
        assert result is not None and result.lease is not None, result
        assert await self.lapsed_among(store, [live, orphan, done]) == []
        # …until the sweeper's own lease lapses, and not after the run finished.
        await self.lapse_lease(store, orphan, result.lease)
        assert await self.lapsed_among(store, [orphan]) == [orphan]
        await store.finish(
            orphan,
            result.lease,
            status=RunStatus.FAILED,
            terminal=_terminal(RunStatus.FAILED),
            final_text=None,
        )
        assert await self.lapsed_among(store, [live, orphan, done]) == []

    async def test_a_released_run_is_lapsed_at_once(self, store: TurnStore) -> None:
        key, other = self.new_key(), self.new_key()
        lease = await self.own_reconnectable(store, key)
        assert await self.lapsed_among(store, [key]) == []
        await store.release(key, lease)  # no clock has to move
        assert await self.lapsed_among(store, [key]) == [key]
        # A stale lease's release leaves the current owner's run alone.
        stale = await self.own_reconnectable(store, other, "worker-a")
        current = await self.take_over(store, other, stale, "worker-b")
        await store.release(other, stale)
        assert await self.lapsed_among(store, [key, other]) == [key]
        # A renewal takes a released run off the list again.
        await store.renew(other, current, lease_ms=self.lease_ms)
        assert await self.lapsed_among(store, [other]) == []

    async def test_lapsed_runs_are_oldest_expiry_first_and_limited(self, store: TurnStore) -> None:
        keys = [self.new_key() for _ in range(3)]
        leases = [await self.own_reconnectable(store, key) for key in keys]
        # Three expiries in a row, each in the past before the next is set.
        for key, lease in zip(keys, leases, strict=True):
            await store.renew(key, lease, lease_ms=1)
            await self.advance_clock(store, 1 + self.lapse_margin_ms)
        assert await self.lapsed_among(store, keys) == keys

        every = await store.lapsed_runs(limit=100_000)
        assert len(every) >= 3
        expiries = [(await self.run_record(store, key)).lease_expires_at_ms for key in every]
        assert expiries == sorted(expiries), list(zip(every, expiries, strict=True))
        assert await store.lapsed_runs(limit=2) == every[:2]
        assert await store.lapsed_runs(limit=1) == every[:1]
        assert len(await store.lapsed_runs()) <= 100
        assert await store.lapsed_runs(limit=0) == []
        assert await store.lapsed_runs(limit=-1) == []

    async def test_lapsed_runs_skip_runs_without_a_handle(self, store: TurnStore) -> None:
        # A run with no handle cannot be re-attached, only restarted by its next request: the
        # sweeper must never see it, nor be starved by a pile of them.
        plain = [self.new_key() for _ in range(5)]
        for key in plain:
            await store.release(key, await self.own(store, key))
        reconnectable = self.new_key()
        await store.release(reconnectable, await self.own_reconnectable(store, reconnectable))
        assert await self.lapsed_among(store, [*plain, reconnectable]) == [reconnectable]
        for _ in range(len(plain) + 1):  # bounded: each call may drop what it skipped
            if reconnectable in await store.lapsed_runs(limit=2):
                break
        else:
            raise AssertionError("a run without a handle starved a reconnectable one")
        # Still a lapsed run all the same: its next request takes it over.
        assert (await self.begin(store, plain[0], "worker-b")).outcome is BeginOutcome.TAKEOVER

    async def test_lapsed_runs_list_local_runs_once_lapsed_long_enough(
        self, store: TurnStore
    ) -> None:
        # A run without a handle can only be finished by the sweeper, and only once its lease
        # lapsed `local_after_ms` ago: a request that comes back before then restarts it.
        local, reconnectable = self.new_key(), self.new_key()
        local_lease = await self.own(store, local)
        await store.release(reconnectable, await self.own_reconnectable(store, reconnectable))
        await self.lapse_lease(store, local, local_lease)
        assert await self.lapsed_among(store, [local, reconnectable]) == [reconnectable]

        async def listed(local_after_ms: int) -> list[RunKey]:
            found = await store.lapsed_runs(limit=100_000, local_after_ms=local_after_ms)
            return [key for key in found if key in (local, reconnectable)]

        assert await listed(3_600_000) == [reconnectable]
        await self.advance_clock(store, 60)
        # Re-attachable runs come first: they can be saved, a local one only ended.
        assert await listed(30) == [reconnectable, local]
        # A renewal (its owner came back) takes it off the list again.
        await store.renew(local, local_lease, lease_ms=self.lease_ms)
        assert await listed(0) == [reconnectable]

    async def test_a_lapsed_lease_nobody_took_over_is_renewed_by_its_holder(
        self, store: TurnStore
    ) -> None:
        # The owner was only cut off from the store (an outage): its lease is still the
        # current one, so it renews and writes on; after a takeover it never does.
        key = self.new_key()
        lease = await self.own(store, key)
        await self.lapse_lease(store, key, lease)
        assert (await self.run_record(store, key)).lease_live is False
        await store.renew(key, lease, lease_ms=self.lease_ms)
        assert (await self.run_record(store, key)).lease_live is True
        assert await store.append(key, lease, [_delta("e1")]) == [1]
        await self.take_over(store, key, lease)
        with pytest.raises(LeaseLost):
            await store.renew(key, lease, lease_ms=self.lease_ms)

    async def test_renew_batch_answers_each_request_on_its_own(self, store: TurnStore) -> None:
        held, stale_key, finished = self.new_key(), self.new_key(), self.new_key()
        held_lease = await self.own(store, held)
        stale = await self.own(store, stale_key, "worker-a")
        await self.take_over(store, stale_key, stale, "worker-b")
        finished_lease = await self.own(store, finished)
        await store.finish(
            finished,
            finished_lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="t",
        )
        await store.request_cancel(held)
        results = await store.renew_batch(
            [
                RenewRequest(held, held_lease),
                RenewRequest(stale_key, stale),
                RenewRequest(finished, finished_lease),
            ],
            lease_ms=self.lease_ms,
        )
        assert isinstance(results[0], RenewResult) and results[0].cancel_requested is True
        assert isinstance(results[1], LeaseLost), results
        assert isinstance(results[2], RunFinished), results
        assert await store.renew_batch([], lease_ms=self.lease_ms) == []

    # -- persistence ----------------------------------------------------------------------

    async def finish_completed(
        self, store: TurnStore, key: RunKey, lease: Lease, *, persist_after_ms: int | None
    ) -> int:
        return await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="the text",
            persist_after_ms=persist_after_ms,
        )

    async def pending_among(self, store: TurnStore, keys: Sequence[RunKey]) -> list[RunKey]:
        wanted = set(keys)
        return [key for key in await store.pending_persists(limit=100_000) if key in wanted]

    async def test_a_finish_without_persistence_leaves_nothing_pending(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        await self.finish_completed(store, key, await self.own(store, key), persist_after_ms=None)
        assert (await self.run_record(store, key)).persist_pending is False
        assert await store.claim_persist(key, holder="sweeper", lease_ms=self.lease_ms) is None
        assert await self.pending_among(store, [key]) == []

    async def test_pending_persistence_is_claimed_once_due_and_cleared_when_marked(
        self, store: TurnStore
    ) -> None:
        key, unknown, running = self.new_key(), self.new_key(), self.new_key()
        await self.own(store, running)
        lease = await self.own(store, key)
        seq = await self.finish_completed(store, key, lease, persist_after_ms=self.lease_ms)
        record = await self.run_record(store, key)
        assert record.persist_pending is True
        # The owner is persisting it: nobody else may yet.
        assert await store.claim_persist(key, holder="sweeper", lease_ms=self.lease_ms) is None
        assert await self.pending_among(store, [key]) == []
        # A retried finish (lost reply) keeps it pending and answers the same.
        assert await self.finish_completed(store, key, lease, persist_after_ms=1) == seq
        assert (await self.run_record(store, key)).persist_pending is True
        for other in (unknown, running):
            assert await store.claim_persist(other, holder="s", lease_ms=self.lease_ms) is None
        await store.mark_persisted(key)
        assert (await self.run_record(store, key)).persist_pending is False
        await store.mark_persisted(key)  # idempotent
        await store.mark_persisted(unknown)  # and harmless
        assert await store.claim_persist(key, holder="sweeper", lease_ms=1) is None

    async def test_an_unconfirmed_persistence_is_handed_to_one_claimer(
        self, store: TurnStore
    ) -> None:
        key = self.new_key()
        await self.finish_completed(store, key, await self.own(store, key), persist_after_ms=1)
        await self.advance_clock(store, 1 + self.lapse_margin_ms)
        assert await self.pending_among(store, [key]) == [key]
        claims: list[RunRecord | None] = []

        async def claim(holder: str) -> None:
            claims.append(await store.claim_persist(key, holder=holder, lease_ms=self.lease_ms))

        async with anyio.create_task_group() as tg:
            for holder in ("s1", "s2", "s3"):
                tg.start_soon(claim, holder)
        won = [claim for claim in claims if claim is not None]
        assert len(won) == 1, claims
        record = won[0]
        assert (record.status, record.final_text, record.persist_pending) == (
            RunStatus.COMPLETED,
            "the text",
            True,
        )
        # Not due again for the claimer's lease_ms, so it is not listed meanwhile…
        assert await self.pending_among(store, [key]) == []
        # …and due again after a claim with a short one (its claimer died).
        await self.advance_clock(store, 1 + self.lapse_margin_ms)
        assert await store.claim_persist(key, holder="s4", lease_ms=1) is None  # still s1's
        await store.mark_persisted(key)
        assert await self.pending_among(store, [key]) == []

    async def test_pending_persists_are_oldest_due_first_and_limited(
        self, store: TurnStore
    ) -> None:
        keys = [self.new_key() for _ in range(3)]
        for key in keys:
            await self.finish_completed(store, key, await self.own(store, key), persist_after_ms=1)
            await self.advance_clock(store, 1 + self.lapse_margin_ms)
        assert await self.pending_among(store, keys) == keys
        assert await store.pending_persists(limit=0) == []
        assert len(await store.pending_persists(limit=1)) == 1

    async def test_lapsed_runs_give_back_the_exact_keys(self, store: TurnStore) -> None:
        unique = uuid.uuid4().hex
        tenants = [
            "acme",
            "",
            "a/b",
            "a%2Fb",
            "100%",
            "%",
            "/",
            "//x//",
            "t/",
            "{x}",
            "ünïcødé 🌍",
            "日本/語",
            " spaced out ",
            "a+b=c&d?e#f:g;h",
            "tab\tnew\nline",
        ]
        keys = [
            RunKey(tenant, derive_execution_id("project", f"s-{unique}-{n}", 1))
            for n, tenant in enumerate(tenants)
        ]
        # Execution ids are the store's to keep as given, too (derive_execution_id's are tame).
        keys.append(RunKey("a/b", f"raw/ex%41:id:{unique}/é"))
        # And users, when the run is a user's (Supervisor(access="user")): every one a run
        # of its own, even where tenant + user + id would spell alike without the user.
        eid = derive_execution_id("project", f"s-{unique}-u", 1)
        for tenant, user in [("acme", "ada"), ("acme", "a/b"), ("acme@ada", "x"), ("a", "")]:
            keys.append(RunKey(tenant, eid, user))
        keys.append(RunKey("acme", eid))  # the same tenant and id, no user: another run
        for key in keys:
            await store.release(key, await self.own_reconnectable(store, key))
        listed = await self.lapsed_among(store, keys)
        assert sorted(listed, key=repr) == sorted(keys, key=repr)
        for key in listed:
            assert type(key) is RunKey
            assert type(key.tenant_id) is str and type(key.execution_id) is str
        # And they name the runs: a claim through a listed key takes the right one over.
        for key in listed:
            result = await self.claim(store, key)
            assert result is not None and result.outcome is BeginOutcome.TAKEOVER, (key, result)
            assert result.run.key == key

    # -- reopening a failed run (a retry of a failed turn) ------------------------------------

    async def failed_run(self, store: TurnStore, *, persist: bool = False) -> tuple[RunKey, Lease]:
        key = self.new_key()
        lease = await self.own(store, key)
        await store.request_cancel(key)
        assert await store.append(key, lease, [_delta("1.1"), _delta("1.2")]) == [1, 2]
        seq = await store.finish(
            key,
            lease,
            status=RunStatus.FAILED,
            terminal=_terminal(RunStatus.FAILED, "ts:terminal"),
            final_text="<1.1><1.2>",
            persist_after_ms=1 if persist else None,
        )
        assert seq == 3
        return key, lease

    async def test_reopen_failed_leases_a_failed_run_again_and_keeps_its_log(
        self, store: TurnStore
    ) -> None:
        key, old = await self.failed_run(store, persist=True)
        reopened = await self.begin(store, key, "worker-b", reopen_failed=True)
        assert reopened.outcome is BeginOutcome.TAKEOVER
        assert reopened.lease is not None and reopened.lease.token > old.token
        record = reopened.run
        assert record.status is RunStatus.RUNNING
        assert (record.final_text, record.finished_at_ms, record.cancel_requested) == (
            None,
            None,
            False,
        )
        assert record.last_seq == 3 and record.lease_live
        assert await store.claim_persist(key, holder="w", lease_ms=1000) is None  # not pending
        with pytest.raises(LeaseLost):
            await store.append(key, old, [_delta("x")])
        lease = reopened.lease
        assert await store.restart(key, lease) == 2
        assert await store.append(key, lease, [_delta("2.1")]) == [4]
        seq = await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED, "ts:terminal:2"),
            final_text="<2.1>",
        )
        assert seq == 5
        log = await self.log(store, key)
        assert _summary(log) == [
            (1, "1.1"), (2, "1.2"), (3, "ts:terminal"), (4, "2.1"), (5, "ts:terminal:2")
        ]  # fmt: skip
        final = await self.run_record(store, key)
        assert (final.status, final.final_text, final.attempt) == (RunStatus.COMPLETED, "<2.1>", 2)

    async def test_reopen_failed_is_a_begin_for_any_other_run(self, store: TurnStore) -> None:
        key, _ = await self.failed_run(store)
        assert (await self.begin(store, key, "w")).outcome is BeginOutcome.COMPLETED  # no reopen
        mismatch = await self.begin(store, key, "w", input_hash="other", reopen_failed=True)
        assert (mismatch.outcome, mismatch.lease) == (BeginOutcome.MISMATCH, None)
        reopened = await self.begin(store, key, "worker-b", reopen_failed=True)
        assert reopened.outcome is BeginOutcome.TAKEOVER
        # Running again with a live lease: a second retry joins it, it is not reopened twice.
        again = await self.begin(store, key, "worker-c", reopen_failed=True)
        assert (again.outcome, again.lease) == (BeginOutcome.LIVE, None)
        for status in (RunStatus.COMPLETED, RunStatus.CANCELLED):
            other = self.new_key()
            lease = await self.own(store, other)
            await store.finish(other, lease, status=status, terminal=_terminal(status),
                               final_text="")  # fmt: skip
            result = await self.begin(store, other, "w", reopen_failed=True)
            assert (result.outcome, result.lease) == (BeginOutcome.COMPLETED, None)

    # -- isolation ------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("tenant_one", "tenant_two"),
        [
            ("acme", "globex"),
            ("a/b", "a%2Fb"),
            ("t", "t/"),
            ("{x}", "x"),
            # A user's runs (Supervisor(access="user")) against another user's, against the
            # tenant's shared ones, and against a tenant whose name spells like a user's.
            (("acme", "ada"), ("acme", "grace")),
            (("acme", "ada"), "acme"),
            (("acme", "ada"), "acme@ada"),
            (("acme", "a/b"), ("acme", "a%2Fb")),
        ],
    )
    async def test_tenants_are_isolated(
        self,
        store: TurnStore,
        tenant_one: str | tuple[str, str],
        tenant_two: str | tuple[str, str],
    ) -> None:
        eid = self.new_key("x").execution_id  # unique: a store shared between tests works

        def key(spec: str | tuple[str, str]) -> RunKey:
            tenant, user = (spec, None) if isinstance(spec, str) else spec
            return RunKey(tenant, eid, user)

        one, two = key(tenant_one), key(tenant_two)
        assert one != two
        lease_one = await self.own(store, one, "worker-1", input_hash="hash-1")
        # Same execution id, other tenant, other input: a fresh run, not a mismatch.
        lease_two = await self.own(store, two, "worker-2", input_hash="hash-2")
        assert await store.append(one, lease_one, [_delta("a1"), _delta("a2")]) == [1, 2]
        assert await store.append(two, lease_two, [_delta("a1", "two")]) == [1]
        with pytest.raises(LeaseLost):
            await store.append(two, lease_one, [_delta("b1")])
        await store.set_handle(one, lease_one, {"kind": "one"})
        assert await store.request_cancel(two) is True
        await store.finish(
            one,
            lease_one,
            status=RunStatus.COMPLETED,
            terminal=_terminal(RunStatus.COMPLETED),
            final_text="one",
        )

        log_one, log_two = await self.log(store, one), await self.log(store, two)
        assert _summary(log_one) == [(1, "a1"), (2, "a2"), (3, "terminal")]
        assert _summary(log_two) == [(1, "a1")]
        assert log_two[0].data == _delta("a1", "two").data
        record_one, record_two = (
            await self.run_record(store, one),
            await self.run_record(store, two),
        )
        assert (record_one.status, record_one.cancel_requested) == (RunStatus.COMPLETED, False)
        assert record_one.handle is not None and dict(record_one.handle) == {"kind": "one"}
        assert (record_two.status, record_two.cancel_requested) == (RunStatus.RUNNING, True)
        assert record_two.handle is None
        assert record_two.input_hash == "hash-2"
        assert record_two.lease_holder == "worker-2"
        assert (await self.begin(store, two, "worker-3", input_hash="hash-2")).outcome is (
            BeginOutcome.LIVE
        )
        # A third tenant sees nothing at all.
        three = RunKey(f"other-{uuid.uuid4().hex[:8]}", one.execution_id)
        assert await store.get_run(three) is None
        assert await store.read(three) == []
        assert await store.request_cancel(three) is False

    # -- properties -----------------------------------------------------------------------

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        writes=st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=1),  # which of two concurrent writers
                st.lists(st.sampled_from(_PROPERTY_EVENT_IDS), min_size=1, max_size=5),
            ),
            min_size=1,
            max_size=10,
        )
    )
    async def test_any_interleaving_of_appends_yields_a_contiguous_deduped_log(
        self, store: TurnStore, writes: list[tuple[int, list[str]]]
    ) -> None:
        # Two writers holding the same lease stand for a write and its retry racing each other.
        key = self.new_key()
        lease = await self.own(store, key)
        returned: list[tuple[list[str], list[int]]] = []

        async def writer(lane: int) -> None:
            for writer_lane, ids in writes:
                if writer_lane == lane:
                    seqs = await store.append(key, lease, [_delta(i) for i in ids])
                    returned.append((ids, seqs))

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, 0)
            tg.start_soon(writer, 1)

        seq_of: dict[str, int] = {}
        for ids, seqs in returned:
            assert len(seqs) == len(ids), (ids, seqs)
            for event_id, seq in zip(ids, seqs, strict=True):
                # The seq returned for an id never changes.
                assert seq_of.setdefault(event_id, seq) == seq, (event_id, seq, seq_of)
        log = await self.log(store, key)
        assert [event.seq for event in log] == list(range(1, len(log) + 1)), _summary(log)
        assert len({event.event_id for event in log}) == len(log), _summary(log)
        assert {event.event_id: event.seq for event in log} == seq_of
        assert all(event.data == _delta(event.event_id).data for event in log)
        assert (await self.run_record(store, key)).last_seq == len(log)
