"""A model-based test of the runtime: two workers, one store, turns under faults.

A Hypothesis state machine drives the real runtime (``handle_chat_turn``, supervisors, pumps,
readers, sweepers) over one shared store — memory, fakeredis, or a real Redis server — with
producers and a substrate that the test steps by hand, and checks every turn's log against a
pure model of it.

Rules (at most three turns, each a local producer or a stepped-substrate adapter):
``start_turn``; ``emit`` (the live attempt's producer, or the substrate, says k words);
``end`` (it completes or fails); ``cancel``; ``retry_post`` (the same POST again, from a
cursor: replay, join, restart or resume); ``conflicting_post`` (409); ``reconnect`` (a
reader from a cursor, or from where a cut-off reader stopped); ``lose_reply`` (the next call
of a store method lands and its reply is lost); ``outage`` (the store is down for far less
than ``store_retry_s`` while the producer runs ahead); ``post_while_down`` (503);
``kill`` (the owner's worker is cut off the store and its leases lapse; its producer may say
more into the void; then a retry, a reader on the survivor, or a cancel and nobody comes
back); ``revive`` (SIGCONT: fencing stops what the stale worker still tries to write);
``replace`` (SIGKILL and a new worker process); ``idle`` (the sweepers' turn).

Checked after every step: every log has seqs 1..n, unique event ids, ``session.run.started``
first, attempts counting up by one (a takeover's restart is the next attempt), every event
inside its own attempt, at most one terminal event and that one last; every event the
producer (or the substrate) gave appears once, in order, in its attempt; a finished log never
changes and its checkpoint is the fold of its last attempt; a replay is the log and calls
nothing; a resume re-attaches (no second substrate start); every reader got a gap-free,
duplicate-free slice of the log after its cursor, and ended only for a reason the model saw
happen (the terminal event, a failed store call, a dead owner). At teardown every turn is
driven to its terminal event (no turn is left running), every reader ends, and a turn whose
cancel was accepted ends ``session.run.cancelled`` without producing again.

The event loop is an ``asyncio.Runner`` that runs only while a step does: what a step sees
is what the previous one left. No timing is asserted; waits are bounded only so that a hang
fails. Regression tests for what the machine found are at the end of the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import anyio
import fakeredis
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests._flaky import FlakyStore
from tests._helpers import wait_for
from tests._substrate import SteppedAdapter, SteppedRun, SteppedSubstrate
from turnstream import (
    ChatTurnResult,
    Lease,
    LeaseLost,
    MemoryStore,
    OwnerLost,
    RunKey,
    RunRecord,
    StartRequest,
    StoreError,
    StoreUnavailable,
    SupervisedEvent,
    Supervisor,
    TurnContext,
    TurnIdentity,
    TurnStore,
    handle_chat_turn,
)
from turnstream._framing import StreamFormat
from turnstream._handler import stream_run
from turnstream._pump import Pump
from turnstream._reader import read_run
from turnstream.stores.redis import RedisStore

T = TypeVar("T")

STARTED = "session.run.started"
RESTARTED = "session.run.restarted"
COMPLETED = "session.run.completed"
FAILED = "session.run.failed"
CANCELLED = "session.run.cancelled"
TERMINALS = frozenset({COMPLETED, FAILED, CANCELLED})

MAX_TURNS = 3
LEASE_MS = 600
HEARTBEAT_MS = 100  # renewals every 100 ms: an outage of <= 200 ms never lapses a lease
SWEEP_MS = 50
ORPHAN_AFTER_MS = 60_000  # or 100 (drawn per example): a local orphan is ended soon, or never
IDLE_S = 0.25  # long enough for a sweeper to end an orphan lapsed 100 ms ago
OUTAGE_NOTICE_S = 1.0
STORE_RETRY_S = 30.0
WAIT_S = 10.0  # a bound on every wait: reaching it is a hang, not a slow machine
LOSABLE = (
    "append_batch",
    "renew_batch",
    "finish",
    "set_handle",
    "restart",
    "begin",
    "claim",
    "read",
    "follow",
    "get_run",
    "request_cancel",
)
# Calls whose effect a kill must not let land after the worker was declared dead.
_READS = frozenset({"read", "follow", "get_run", "ping", "lapsed_runs", "pending_persists"})


async def wait_until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    with anyio.move_on_after(WAIT_S):
        while not await check():
            await anyio.sleep(0.005)
        return
    raise AssertionError(f"still waiting after {WAIT_S:g} s for {what}")


# -- what the test steps by hand ------------------------------------------------------------


class Attempt:
    """One attempt of a local producer: the deltas the test let it emit, and how it ends."""

    def __init__(self) -> None:
        self.emitted: list[str] = []
        self.end: str | None = None  # "completed" | "failed"
        self._changed = anyio.Event()

    def emit(self, words: list[str]) -> None:
        self.emitted.extend(words)
        self._wake()

    def finish(self, outcome: str) -> None:
        self.end = outcome
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class LocalProducer:
    """The turn's producer (every request passes this one): each call is one attempt."""

    def __init__(self) -> None:
        self.attempts: dict[int, Attempt] = {}
        self.calls: list[int] = []  # the attempt of each call, in order

    def attempt(self, number: int) -> Attempt:
        if number not in self.attempts:
            self.attempts[number] = Attempt()
        return self.attempts[number]

    async def __call__(self, context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        self.calls.append(context.attempt)
        script = self.attempt(context.attempt)
        index = 0
        while True:
            while index < len(script.emitted):
                index += 1
                yield {"type": "text-delta", "delta": script.emitted[index - 1]}
            if script.end == "completed":
                return
            if script.end == "failed":
                raise RuntimeError("the model broke")
            await script.changed()


class CountingAdapter(SteppedAdapter):
    """The stepped substrate's adapter, counting ``start`` calls per execution id."""

    def __init__(self, substrate: SteppedSubstrate, starts: Counter[str]) -> None:
        super().__init__(substrate)
        self.starts = starts

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        self.starts[request.execution_id] += 1
        async with aclosing(super().start(request)) as events:
            async for event in events:
                yield event


class Link:
    """One worker's connection to the shared store; ``cut`` when the worker 'dies'.

    A cut link refuses every call (the worker is partitioned, frozen or killed: either way
    nothing it does reaches the store any more). Writes in flight are counted so a kill can
    wait for them: a write that was on its way when the worker died may land, but not later.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cut = False
        self.failures = 0
        self.in_flight = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            if name == "aclose":
                return None  # the store is the test's, closed at teardown
            if self.cut:
                self.failures += 1
                raise StoreUnavailable(f"this worker is cut off the store ({name})")
            counted = name not in _READS
            self.in_flight += counted
            try:
                return await attribute(*args, **kwargs)
            finally:
                self.in_flight -= counted

        return call


# -- the model ------------------------------------------------------------------------------


@dataclass
class Worker:
    slot: int
    generation: int
    link: Link
    adapter: CountingAdapter
    supervisor: Supervisor
    alive: bool = True

    @property
    def id(self) -> str:
        return self.supervisor.worker_id


@dataclass
class Turn:
    index: int
    kind: str  # "local" | "adapter"
    identity: TurnIdentity
    key: RunKey
    producer: LocalProducer
    deaths: int = 0  # times its owner died (or never got its pump) while it ran
    restarts: int = 0  # takeovers that restarted it (what the model expects in its log)
    # Once a cancel was accepted: the terminal events it may still end with (cancelled, or
    # the end of a producer that was already ending when the cancel came).
    cancel_allows: set[str] | None = None
    restarts_at_cancel: int = 0  # a cancelled turn starts no attempt after these
    finished_log: list[dict[str, Any]] | None = None

    @property
    def input(self) -> dict[str, Any]:
        return {"message": f"turn {self.index}"}


@dataclass
class Reader:
    name: str
    turn: Turn
    worker: Worker
    after: int
    via: str  # "post" (handle_chat_turn's body) | "stream" (stream_run) | "read" (read_run)
    failures_at_start: int
    deaths_at_start: int
    ownerless_at_start: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None  # None while it runs
    failures_at_end: int = 0
    deaths_at_end: int = 0
    handle_at_end: bool = False
    task: asyncio.Task[None] | None = None
    done: bool = False  # ended, and everything about its end recorded
    checked: bool = False

    @property
    def cursor(self) -> int:
        return self.events[-1]["seq"] if self.events else self.after


def segments_of(log: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """The log cut at its lifecycle markers: (attempt, the events of that attempt)."""
    segments: list[tuple[int, list[dict[str, Any]]]] = []
    for event in log:
        if event["type"] in (STARTED, RESTARTED):
            segments.append((event["attempt"], []))
        elif segments:
            segments[-1][1].append(event)
    return segments


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text-delta")


class RuntimeModel(RuleBasedStateMachine):
    backend: ClassVar[str] = "memory"
    redis_url: ClassVar[str | None] = None

    turns = Bundle("turns")

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.broken = False
        self.turn_list: list[Turn] = []
        self.readers: list[Reader] = []
        self.starts: Counter[str] = Counter()
        self.substrate = SteppedSubstrate()
        self.generations = [0, 0]
        self.inner: TurnStore
        self._clients: list[Any] = []
        self.workers: list[Worker] = []
        self.idles = 0
        self.outages = 0
        self.orphan_after_ms = ORPHAN_AFTER_MS
        self.dead_at_the_end = "revive"

    # -- plumbing ---------------------------------------------------------------------------

    def drive(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one step's coroutine on the machine's loop (which runs only meanwhile)."""
        try:
            return self.runner.run(self._bounded(coro))
        except BaseException:
            self.broken = True
            raise

    async def _bounded(self, coro: Coroutine[Any, Any, T]) -> T:
        with anyio.fail_after(60):
            return await coro

    @initialize(
        target=turns,
        orphan_after_ms=st.sampled_from([100, ORPHAN_AFTER_MS]),
        kind=st.sampled_from(["local", "adapter"]),
        slot=st.integers(0, 1),
        dead_at_the_end=st.sampled_from(["revive", "replace"]),
    )
    def set_up(self, orphan_after_ms: int, kind: str, slot: int, dead_at_the_end: str) -> int:
        """Two workers on one store, and a first turn; a local orphan is ended by a sweeper
        soon after its owner died, or only long after; a worker still dead at the end comes
        back, or is replaced by a new one."""
        self.orphan_after_ms = orphan_after_ms
        self.dead_at_the_end = dead_at_the_end
        self.drive(self._setup())
        return self.drive(self._start_turn(kind, slot))

    async def _setup(self) -> None:
        prefix = f"turnstream-model-{uuid.uuid4().hex}"
        if self.backend == "memory":
            self.inner = MemoryStore()
        elif self.backend == "fakeredis":
            server = fakeredis.FakeServer()
            client = fakeredis.FakeAsyncRedis(server=server)
            blocking = fakeredis.FakeAsyncRedis(server=server)
            self._clients = [client, blocking]
            self.inner = RedisStore(client, prefix=prefix, blocking_client=blocking)
        else:
            assert self.redis_url is not None
            self.inner = RedisStore.from_url(self.redis_url, prefix=prefix)
        self.shared = FlakyStore(self.inner)
        self.workers = [await self._new_worker(0), await self._new_worker(1)]

    async def _new_worker(self, slot: int) -> Worker:
        self.generations[slot] += 1
        link = Link(self.shared)
        adapter = CountingAdapter(self.substrate, self.starts)
        supervisor = Supervisor(
            link,  # type: ignore[arg-type]
            lease_ms=LEASE_MS,
            heartbeat_ms=HEARTBEAT_MS,
            worker_id=f"w{slot}.{self.generations[slot]}",
            shutdown_grace_s=1.0,
            adapters=[adapter],
            sweep_interval_ms=SWEEP_MS,
            store_retry_s=STORE_RETRY_S,
            outage_notice_s=OUTAGE_NOTICE_S,
            orphan_after_ms=self.orphan_after_ms,
        )
        await supervisor.start()
        return Worker(slot, self.generations[slot], link, adapter, supervisor)

    def alive_worker(self, slot: int) -> Worker:
        worker = self.workers[slot]
        return worker if worker.alive else self.workers[1 - slot]

    def failures_seen_by(self, worker: Worker) -> int:
        return sum(self.shared.failures.values()) + worker.link.failures

    async def record(self, turn: Turn) -> RunRecord:
        record = await self.inner.get_run(turn.key)
        assert record is not None, f"turn {turn.index}: its run is gone"
        return record

    async def log_of(self, turn: Turn) -> list[dict[str, Any]]:
        return [e.payload() for e in await self.inner.read(turn.key, after=0, limit=100_000)]

    def owner_of(self, turn: Turn, record: RunRecord) -> tuple[Worker, Pump] | None:
        """The worker whose pump holds the run's current lease (alive or not)."""
        if record.status.finished or record.lease_holder is None:
            return None
        lease = Lease(record.lease_holder, record.lease_token)
        for worker in self.workers:
            pump = worker.supervisor._pumps.get(turn.key)
            if pump is not None and not pump.lost and not pump.finished and pump.lease == lease:
                return worker, pump
        return None

    def live_owner(self, turn: Turn, record: RunRecord) -> tuple[Worker, Pump] | None:
        """The owner that drains the producer: alive, and not only ending an orphan."""
        owner = self.owner_of(turn, record)
        if owner is None or not owner[0].alive or owner[1].mode == "orphan":
            return None
        return owner

    async def lapse(self, key: RunKey) -> None:
        """Let the run's lease lapse now, as if its owner died (no release)."""
        record = await self.inner.get_run(key)
        if record is None or record.status.finished or record.lease_holder is None:
            return
        if isinstance(self.inner, MemoryStore):
            self.inner.expire_lease(key)
            return
        try:
            lease = Lease(record.lease_holder, record.lease_token)
            await self.inner.renew(key, lease, lease_ms=1)
        except LeaseLost:
            return  # taken over meanwhile: that lease is live, and not ours to lapse
        await anyio.sleep(0.03)

    async def settle(self, turn: Turn) -> RunRecord:
        """Wait out the transient states: an orphan being ended, a lease without a pump."""
        record = await self.record(turn)

        async def stable() -> bool:
            nonlocal record
            record = await self.record(turn)
            if record.status.finished:
                return True
            owner = self.owner_of(turn, record)
            if owner is None:
                return not record.lease_live
            if not owner[0].alive:
                return True
            # A live owner renews within a heartbeat a lease that lapsed while the loop did
            # not run (between two steps, on a busy machine): wait for that, or for a
            # sweeper that took it over meanwhile.
            return owner[1].mode != "orphan" and record.lease_live

        await wait_until(f"turn {turn.index} to settle", stable)
        return record

    # -- readers ----------------------------------------------------------------------------

    def _reader(self, turn: Turn, worker: Worker, after: int, via: str, ownerless: bool) -> Reader:
        reader = Reader(
            name=f"r{len(self.readers)}",
            turn=turn,
            worker=worker,
            after=after,
            via=via,
            failures_at_start=self.failures_seen_by(worker),
            deaths_at_start=turn.deaths,
            ownerless_at_start=ownerless,
        )
        self.readers.append(reader)
        return reader

    def spawn_body_reader(self, reader: Reader, body: AsyncIterator[bytes]) -> None:
        async def consume() -> None:
            pending = b""
            try:
                async for chunk in body:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if not line:
                            continue
                        frame = orjson.loads(line)
                        if "seq" in frame:
                            reader.events.append(frame)
                        else:  # an in-band, unlogged error: the stream ends with it
                            reader.outcome = f"error:{frame['code']}"
                assert not pending, pending
                if reader.outcome is None:
                    ended = reader.events and reader.events[-1]["type"] in TERMINALS
                    reader.outcome = "terminal" if ended else "ended"
            except Exception as exc:
                reader.outcome = f"raised:{exc!r}"
            finally:
                await self._reader_ended(reader)

        reader.task = asyncio.get_running_loop().create_task(consume())

    def spawn_log_reader(self, reader: Reader) -> None:
        async def consume() -> None:
            try:
                events = read_run(reader.worker.supervisor, reader.turn.key, after=reader.after)
                async with aclosing(events) as stream:  # type: ignore[type-var]
                    async for event in stream:
                        reader.events.append(event.payload())
                ended = reader.events and reader.events[-1]["type"] in TERMINALS
                reader.outcome = "terminal" if ended else "ended"
            except OwnerLost:
                reader.outcome = "error:owner_lost"
            except StoreError:
                reader.outcome = "error:store_unavailable"
            except Exception as exc:
                reader.outcome = f"raised:{exc!r}"
            finally:
                await self._reader_ended(reader)

        reader.task = asyncio.get_running_loop().create_task(consume())

    async def _reader_ended(self, reader: Reader) -> None:
        reader.failures_at_end = self.failures_seen_by(reader.worker)
        reader.deaths_at_end = reader.turn.deaths
        if reader.outcome is None:
            reader.outcome = "cancelled"
        try:
            record = await self.inner.get_run(reader.turn.key)
        except Exception:
            record = None
        reader.handle_at_end = record is not None and record.handle is not None
        reader.done = True

    async def post(
        self, turn: Turn, worker: Worker, *, after: int, input: Mapping[str, Any] | None = None
    ) -> tuple[ChatTurnResult, Reader | None]:
        record = await self.inner.get_run(turn.key)
        ownerless = (
            record is not None
            and not record.status.finished
            and self.live_owner(turn, record) is None
        )
        source: dict[str, Any] = (
            {"produce": turn.producer} if turn.kind == "local" else {"adapter": worker.adapter}
        )
        result = await handle_chat_turn(
            turn.identity,
            turn.input if input is None else input,
            supervisor=worker.supervisor,
            cursor=after,
            # This model replays a failure: it checks takeovers and outages, and a retry of
            # a failed turn (a new attempt after it, tests/test_retry.py) is not in it yet.
            retry=False,
            **source,
        )
        if result.status != 200:
            return result, None
        assert not isinstance(result.body, bytes)
        reader = self._reader(turn, worker, after, "post", ownerless)
        self.spawn_body_reader(reader, result.body.__aiter__())
        return result, reader

    # -- waiting for the runtime ----------------------------------------------------------

    async def wait_logged(self, turn: Turn, attempt: int, count: int) -> None:
        """Until the log's segment of ``attempt`` holds ``count`` events of its source."""

        async def logged() -> bool:
            segments = [s for s in segments_of(await self.log_of(turn)) if s[0] == attempt]
            if not segments:
                return False
            given = [e for e in segments[-1][1] if not e["eventId"].startswith("ts:")]
            given = [e for e in given if not e["eventId"].endswith("/e0")]
            return len(given) >= count

        await wait_until(f"turn {turn.index} to log {count} events of attempt {attempt}", logged)

    async def wait_finished(self, turn: Turn) -> tuple[RunRecord, list[dict[str, Any]]]:
        async def finished() -> bool:
            return (await self.record(turn)).status.finished

        await wait_until(f"turn {turn.index} to finish", finished)
        return await self.record(turn), await self.log_of(turn)

    # -- rules ------------------------------------------------------------------------------

    @precondition(lambda self: len(self.turn_list) < MAX_TURNS)
    @rule(target=turns, kind=st.sampled_from(["local", "adapter"]), slot=st.integers(0, 1))
    def start_turn(self, kind: str, slot: int) -> int:
        return self.drive(self._start_turn(kind, slot))

    async def _start_turn(self, kind: str, slot: int) -> int:
        index = len(self.turn_list)
        identity = TurnIdentity("t1", "proj", "s1", "u1", index)
        key = RunKey("t1", identity.execution_id, "u1")
        turn = Turn(index, kind, identity, key, LocalProducer())
        if kind == "adapter":
            # The substrate run exists from the start, so the test can step it at any time.
            self.substrate.runs[identity.execution_id] = SteppedRun(identity.execution_id)
        self.turn_list.append(turn)
        worker = self.alive_worker(slot)
        lost_before = self.shared.failures["begin"]
        result, _ = await self.post(turn, worker, after=0)
        if result.status == 503:
            # The begin landed and its reply was lost: the run is leased to a worker that
            # never started its pump — as good as an owner that died at once.
            assert self.shared.failures["begin"] > lost_before, result.body
            record = await self.record(turn)
            assert record.lease_holder == worker.id and record.last_seq == 0, record
            await self.lapse(turn.key)
            turn.deaths += 1
        else:
            assert result.status == 200 and result.mode == "fresh", (result.status, result.mode)
        return index

    @rule(turn=turns, k=st.integers(1, 3))
    def emit(self, turn: int, k: int) -> None:
        """The producer (or the substrate) says k more words."""
        self.drive(self._emit(self.turn_list[turn], k))

    @precondition(lambda self: self.outages < 3)  # they cost time: a few per example
    @rule(turn=turns, k=st.integers(0, 3), ms=st.sampled_from([10, 50, 120]))
    def outage(self, turn: int, k: int, ms: int) -> None:
        """The store is away for a while (far less than ``store_retry_s``), while the
        producer says k more words: nothing is lost, nothing doubled."""
        self.outages += 1
        self.drive(self._outage(self.turn_list[turn], k, ms))

    async def _outage(self, turn: Turn, k: int, ms: int) -> None:
        await self.settle(turn)
        self.shared.down = True
        try:
            await self._emit(turn, k, wait=False)
            await anyio.sleep(ms / 1000)
        finally:
            self.shared.down = False
        await self._emit(turn, 0)  # now wait for what it said to be logged

    async def _emit(self, turn: Turn, k: int, *, wait: bool = True) -> None:
        record = await (self.settle(turn) if wait else self.record(turn))
        if record.status.finished:
            return
        owner = self.live_owner(turn, record)
        if turn.kind == "adapter":
            run = self.substrate.runs[turn.key.execution_id]
            if run.state != "running":
                return
            words = [f"t{turn.index}e{len(run.events) + n + 1} " for n in range(k)]
            run.say(*words)
            # Whoever owns it next drains the substrate: a live owner, or (once there is a
            # handle to re-attach by) a sweeper; a handle-less orphan waits for a request.
            drained = owner is not None or record.handle is not None
            if wait and drained and not record.cancel_requested:
                attempt = owner[1].attempt if owner is not None else record.attempt
                await self.wait_logged(turn, attempt, len(run.events))
            return
        attempt = owner[1].attempt if owner is not None else record.attempt
        script = turn.producer.attempt(attempt)
        if script.end is not None:
            return  # that attempt's producer ended: it says nothing more
        words = [f"t{turn.index}a{attempt}w{len(script.emitted) + n + 1} " for n in range(k)]
        script.emit(words)  # to a dead owner's producer: must never land after a takeover
        if wait and owner is not None and not record.cancel_requested:
            await self.wait_logged(turn, attempt, len(script.emitted))

    @rule(turn=turns, outcome=st.sampled_from(["completed", "failed"]))
    def end(self, turn: int, outcome: str) -> None:
        self.drive(self._end(self.turn_list[turn], outcome))

    async def _end(self, turn: Turn, outcome: str) -> None:
        record = await self.settle(turn)
        if record.status.finished or turn.cancel_allows is not None:
            return  # a turn being cancelled is left to its cancel
        owner = self.live_owner(turn, record)
        if turn.kind == "adapter":
            run = self.substrate.runs[turn.key.execution_id]
            if run.state != "running":
                return
            run.end(outcome)
            if (owner is None and record.handle is None) or record.cancel_requested:
                return  # ends when a request restarts it (or the sweeper gives it up)
            text = run.text
            code = "sandbox_crashed"
        else:
            attempt = owner[1].attempt if owner is not None else record.attempt
            script = turn.producer.attempt(attempt)
            if script.end is not None:
                return
            script.finish(outcome)
            if owner is None or record.cancel_requested:
                return  # a dead owner's producer ended: nothing may come of it elsewhere
            text = "".join(script.emitted)
            code = "producer_error"
        record, log = await self.wait_finished(turn)
        terminal = log[-1]
        assert terminal["type"] == (COMPLETED if outcome == "completed" else FAILED), log
        assert terminal["finalText"] == text == record.final_text, (text, log)
        if outcome == "failed":
            assert log[-2]["type"] == "error" and log[-2]["code"] == code, log

    @rule(turn=turns, slot=st.integers(0, 1))
    def cancel(self, turn: int, slot: int) -> None:
        self.drive(self._cancel(self.turn_list[turn], slot))

    async def _cancel(self, turn: Turn, slot: int) -> None:
        record = await self.settle(turn)
        owner = self.live_owner(turn, record)
        worker = self.alive_worker(slot)
        lost_before = self.shared.failures["request_cancel"]
        try:
            requested: bool | None = await worker.supervisor.cancel(turn.key)
        except StoreUnavailable:
            assert self.shared.failures["request_cancel"] > lost_before
            requested = None  # the flag was raised, its reply lost: the owner sees it anyway
        if record.status.finished:
            assert requested in (False, None)
            return
        assert requested in (True, None)
        # A producer told to end while its owner was away may be finishing right now.
        if turn.kind == "adapter":
            ending = {self.substrate.runs[turn.key.execution_id].state}
        else:
            ending = {a.end for a in turn.producer.attempts.values() if a.end is not None}
        allowed = {CANCELLED} | {f"session.run.{e}" for e in ending if e != "running"}
        if turn.cancel_allows is None:
            turn.cancel_allows = allowed
            turn.restarts_at_cancel = turn.restarts
        if owner is None:
            return  # whoever takes it over next sees the flag (checked at teardown)
        record, log = await self.wait_finished(turn)
        assert log[-1]["type"] in allowed, (allowed, log)
        if log[-1]["type"] != CANCELLED:
            return
        assert log[-1]["finalText"] == text_of(segments_of(log)[-1][1]) == record.final_text

    @rule(turn=turns, slot=st.integers(0, 1), after=st.integers(0, 40))
    def retry_post(self, turn: int, slot: int, after: int) -> None:
        self.drive(self._retry_post(self.turn_list[turn], slot, after))

    async def _retry_post(self, turn: Turn, slot: int, after: int) -> None:
        record = await self.settle(turn)
        owner = self.live_owner(turn, record)
        worker = self.alive_worker(slot)
        after = min(after, record.last_seq)
        log_before = await self.log_of(turn)
        calls_before = (len(turn.producer.calls), self.starts[turn.key.execution_id])
        lost_before = self.shared.failures["begin"]
        result, reader = await self.post(turn, worker, after=after)
        if result.status == 503:
            assert self.shared.failures["begin"] > lost_before, result.body
            now = await self.record(turn)
            if (
                not now.status.finished
                and now.lease_holder == worker.id
                and now.lease_token != record.lease_token
                and not worker.supervisor.owns(turn.key)
            ):
                # It took the run over, and never heard so: a lease with no pump behind it.
                await self.lapse(turn.key)
                turn.deaths += 1
            return
        assert result.status == 200 and reader is not None, (result.status, result.body)
        mode = result.mode
        if record.status.finished:
            assert mode == "replayed", mode
            assert reader.task is not None
            with anyio.fail_after(WAIT_S):
                await reader.task
            self.check_reader(reader, log_before, reader.events, True)  # its outcome, too
            if reader.outcome != "error:store_unavailable":  # which check_reader explains
                assert reader.events == log_before[after:], "a replay is the log"
            calls_now = (len(turn.producer.calls), self.starts[turn.key.execution_id])
            assert calls_now == calls_before, "a replay never calls the producer again"
            return
        if owner is not None or record.lease_live:
            assert mode == "joined", (mode, record)
            return
        reconnectable = turn.kind == "adapter" and record.handle is not None
        # A sweeper may have taken it over between our look and the request.
        allowed = {"resumed", "joined"} if reconnectable else {"restarted", "joined", "replayed"}
        assert mode in allowed, (mode, record)
        if mode == "restarted":
            await self.wait_restart(turn, record, log_before)
        if mode == "resumed":
            assert self.starts[turn.key.execution_id] == calls_before[1], "a resume re-attaches"

    async def wait_restart(
        self, turn: Turn, record: RunRecord, log_before: list[dict[str, Any]]
    ) -> None:
        """A takeover restarted the turn: its log says so, with the next attempt number
        (``session.run.restarted``, or ``session.run.started`` when nothing was logged)."""
        markers = len(segments_of(log_before))

        async def restarted() -> bool:
            return len(segments_of(await self.log_of(turn))) > markers

        turn.restarts += 1
        await wait_until(f"turn {turn.index} to log its restart", restarted)
        attempt, _ = segments_of(await self.log_of(turn))[markers]
        assert attempt == record.attempt + 1, (
            f"a takeover of attempt {record.attempt} restarted as attempt {attempt}"
        )

    @rule(turn=turns, slot=st.integers(0, 1))
    def conflicting_post(self, turn: int, slot: int) -> None:
        self.drive(self._conflicting_post(self.turn_list[turn], slot))

    async def _conflicting_post(self, turn: Turn, slot: int) -> None:
        lost_before = self.shared.failures["begin"]
        log_before = await self.log_of(turn)
        result, _ = await self.post(
            turn, self.alive_worker(slot), after=0, input={"message": "something else"}
        )
        assert result.status == 409 or (
            result.status == 503 and self.shared.failures["begin"] > lost_before
        ), (result.status, result.body)
        assert (await self.log_of(turn))[: len(log_before)] == log_before

    @rule(
        turn=turns,
        slot=st.integers(0, 1),
        after=st.one_of(st.just("resume"), st.integers(0, 40)),
        via=st.sampled_from(["stream", "read"]),
    )
    def reconnect(self, turn: int, slot: int, after: str | int, via: str) -> None:
        self.drive(self._reconnect(self.turn_list[turn], slot, after, via))

    async def _reconnect(self, turn: Turn, slot: int, after: str | int, via: str) -> None:
        record = await self.record(turn)
        if after == "resume":  # where a reader of this turn that was cut off stopped
            cut = [r for r in self.readers if r.turn is turn and r.outcome is not None]
            cut = [r for r in cut if r.outcome != "terminal"]
            cursor = cut[-1].cursor if cut else 0
        else:
            assert isinstance(after, int)
            cursor = after
        cursor = min(cursor, record.last_seq)
        worker = self.alive_worker(slot)
        ownerless = not record.status.finished and self.live_owner(turn, record) is None
        reader = self._reader(turn, worker, cursor, via, ownerless)
        if via == "read":
            self.spawn_log_reader(reader)
        else:
            result = stream_run(
                worker.supervisor, turn.key, fmt=StreamFormat.NDJSON, after=cursor, mode="joined"
            )
            assert not isinstance(result.body, bytes)
            self.spawn_body_reader(reader, result.body.__aiter__())

    @rule(method=st.sampled_from(LOSABLE))
    def lose_reply(self, method: str) -> None:
        """The next call of ``method`` (by any worker) lands, and its reply is lost."""
        self.shared.lose_replies[method] = 1

    @precondition(lambda self: self.idles < 1)  # the one rule that only costs time
    @rule()
    def idle(self) -> None:
        """A while passes with no request: sweepers re-attach or end what lapsed."""
        self.idles += 1
        self.drive(anyio.sleep(IDLE_S))

    @rule(turn=turns, slot=st.integers(0, 1))
    def post_while_down(self, turn: int, slot: int) -> None:
        self.drive(self._post_while_down(self.turn_list[turn], slot))

    async def _post_while_down(self, turn: Turn, slot: int) -> None:
        worker = self.alive_worker(slot)
        log_before = await self.log_of(turn)
        self.shared.down = True
        try:
            result, reader = await self.post(turn, worker, after=0)
        finally:
            self.shared.down = False
        assert result.status == 503 and reader is None, (result.status, result.body)
        assert result.headers.get("retry-after"), result.headers
        assert (await self.log_of(turn))[: len(log_before)] == log_before

    # No precondition reads what the runtime did (a replayed example must draw the same
    # steps): a step that does not apply does nothing.
    @rule(
        turn=turns,
        slot=st.integers(0, 1),
        stale=st.integers(0, 2),
        then=st.sampled_from(["nothing", "retry", "reader", "cancel"]),
        after=st.integers(0, 40),
    )
    def kill(self, turn: int, slot: int, stale: int, then: str, after: int) -> None:
        """The worker that owns the turn (or, when nobody does, worker ``slot``) dies; its
        producer may say a few more words into the void; then the client retries, or a
        reader on the surviving worker follows the turn, or the client cancels the turn and
        goes away."""
        self.drive(self._kill_owner(self.turn_list[turn], slot, stale, then, after))

    async def _kill_owner(self, turn: Turn, slot: int, stale: int, then: str, after: int) -> None:
        if not all(w.alive for w in self.workers):
            return  # one worker always lives on
        record = await self.settle(turn)
        owner = self.live_owner(turn, record)
        victim = owner[0] if owner is not None else self.workers[slot]
        await self._kill(victim)
        if stale:
            await self._emit(turn, stale)
        survivor = 1 - victim.slot
        if then == "retry":
            await self._retry_post(turn, survivor, after)
        elif then == "reader":
            await self._reconnect(turn, survivor, after, "stream")
        elif then == "cancel":
            await self._cancel(turn, survivor)
            await anyio.sleep(IDLE_S)  # nobody comes back: the sweepers' turn

    async def _kill(self, worker: Worker) -> None:
        worker.alive = False
        worker.link.cut = True

        async def quiet() -> bool:
            return worker.link.in_flight == 0

        await wait_until(f"{worker.id}'s writes in flight", quiet)
        for turn in self.turn_list:
            record = await self.record(turn)
            if not record.status.finished and record.lease_holder == worker.id:
                await self.lapse(turn.key)
                turn.deaths += 1

    @rule()
    def revive(self) -> None:
        for worker in self.workers:
            if not worker.alive:
                self.drive(self._revive(worker))

    async def _revive(self, worker: Worker) -> None:
        """SIGCONT: it renews what nobody took over, and is fenced out of the rest."""
        worker.link.cut = False
        worker.alive = True

        async def caught_up() -> bool:
            for pump in list(worker.supervisor._pumps.values()):
                if pump.lost or pump.finished:
                    continue
                record = await self.record_of(pump.key)
                if record.status.finished or record.lease_token != pump.lease.token:
                    continue  # finished, or taken over: it hears LeaseLost on its next write
                if not record.lease_live:
                    return False
            return True

        await wait_until(f"{worker.id} to renew its leases", caught_up)

    async def record_of(self, key: RunKey) -> RunRecord:
        record = await self.inner.get_run(key)
        assert record is not None
        return record

    @rule()
    def replace(self) -> None:
        for worker in self.workers:
            if not worker.alive:
                self.drive(self._replace(worker))

    async def _replace(self, worker: Worker) -> None:
        """SIGKILL and a new process in its place: the old one is closed while cut off."""
        worker.supervisor.shutdown_grace_s = 0
        with anyio.fail_after(WAIT_S):
            await worker.supervisor.aclose()
        self.workers[worker.slot] = await self._new_worker(worker.slot)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def logs_follow_the_model(self) -> None:
        self.drive(self._check_logs())

    async def snapshot(self, turn: Turn) -> tuple[RunRecord | None, list[dict[str, Any]]]:
        """The run's record and its log as of one moment (a pump may write in between)."""
        while True:
            record = await self.inner.get_run(turn.key)
            log = await self.log_of(turn)
            again = await self.inner.get_run(turn.key)
            if record is None or again is None:
                return again, log
            if record.last_seq == again.last_seq == len(log) and record.status == again.status:
                return again, log
            await anyio.sleep(0.001)

    async def _check_logs(self) -> None:
        for turn in self.turn_list:
            record, log = await self.snapshot(turn)
            if record is not None:
                self.check_log(turn, record, log)

    def check_log(self, turn: Turn, record: RunRecord, log: list[dict[str, Any]]) -> None:
        where = f"turn {turn.index} ({turn.kind}): "
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), where + "seqs"
        ids = [e["eventId"] for e in log]
        assert len(set(ids)) == len(ids), where + f"duplicate event ids {ids}"
        assert record.last_seq == len(log), where + "last_seq"
        if not log:
            return
        assert log[0]["type"] == STARTED, where + f"the log starts with {log[0]}"
        terminals = [i for i, e in enumerate(log) if e["type"] in TERMINALS]
        assert terminals in ([], [len(log) - 1]), where + f"terminal events at {terminals}"
        assert record.status.finished == bool(terminals), where + f"{record.status} vs log"
        segments = segments_of(log)
        attempts = [attempt for attempt, _ in segments]
        # Attempt 1 (or more) may have died before it logged anything: then the log starts
        # with a later one, and counts up by one from there.
        assert attempts == list(range(attempts[0], attempts[0] + len(attempts))), (
            where + f"attempts of the log's lifecycle events: {attempts}"
        )
        assert 1 <= attempts[-1] <= 1 + turn.restarts, where + "a restart no request asked for"
        for attempt, events in segments:
            for event in events:
                event_id = event["eventId"]
                if event["type"] in TERMINALS:
                    assert event_id == "ts:terminal" and event["attempt"] == attempt, where
                elif event_id.startswith("ts:"):
                    assert event_id == f"ts:error:{attempt}", where + event_id
                else:
                    assert event_id.startswith((f"{attempt}.", f"{attempt}/")), (
                        where + f"{event_id} logged in attempt {attempt}"
                    )
            given = [e for e in events if not e["eventId"].startswith("ts:")]
            if turn.kind == "local":
                emitted = turn.producer.attempt(attempt).emitted
                expected = [
                    {"type": "text-delta", "delta": d, "eventId": f"{attempt}.{n + 1}"}
                    for n, d in enumerate(emitted)
                ]
                got = [{k: v for k, v in e.items() if k != "seq"} for e in given]
                assert got == expected[: len(got)], (
                    where + f"attempt {attempt} logged {got}, its producer gave {emitted}"
                )
            else:
                run = self.substrate.runs[turn.key.execution_id]
                source = [(f"{attempt}/e{n + 1}", p) for n, (_, p) in enumerate(run.events)]
                if given and given[0]["eventId"] == f"{attempt}/e0":
                    given = given[1:]
                got = [(e["eventId"], {k: v for k, v in e.items() if k not in ("seq", "eventId")})
                       for e in given]
                assert got == source[: len(got)], (
                    where + f"attempt {attempt} logged {got}, the substrate gave {run.events}"
                )
        starts = self.starts[turn.key.execution_id]
        calls = turn.producer.calls if turn.kind == "local" else [0] * starts
        assert len(calls) <= len(segments), where + f"{len(calls)} producer calls"
        if turn.kind == "local":
            assert len(set(calls)) == len(calls), where + f"attempts called twice: {calls}"
        if terminals:
            terminal = log[-1]
            text = text_of(segments[-1][1])
            assert terminal["finalText"] == text == record.final_text, (
                where + f"checkpoint {record.final_text!r}, terminal {terminal['finalText']!r}, "
                f"fold {text!r}"
            )
            if turn.finished_log is None:
                turn.finished_log = log
            assert log == turn.finished_log, where + "a finished log changed"

    @invariant()
    def readers_follow_the_log(self) -> None:
        self.drive(self._check_readers())

    async def _check_readers(self) -> None:
        # What each reader got so far, before the logs are read: readers run on while the
        # logs are read, and a log only grows.
        seen = [(r, list(r.events), r.done) for r in self.readers if not r.checked]
        logs: dict[int, list[dict[str, Any]]] = {}
        for reader, _, _ in seen:
            if reader.turn.index not in logs:
                logs[reader.turn.index] = await self.log_of(reader.turn)
        for reader, events, done in seen:
            self.check_reader(reader, logs[reader.turn.index], events, done)

    def check_reader(
        self, reader: Reader, log: list[dict[str, Any]], events: list[dict[str, Any]], done: bool
    ) -> None:
        where = f"reader {reader.name} of turn {reader.turn.index} after {reader.after}: "
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(reader.after + 1, reader.after + 1 + len(seqs))), (
            where + f"seqs {seqs}"
        )
        assert events == log[reader.after : reader.after + len(seqs)], (
            where + "what it was sent is not what the log holds"
        )
        if not done:
            return
        outcome = reader.outcome
        reader.checked = True
        if outcome == "terminal":
            assert events[-1] == log[-1], where + "ended before the log did"
        elif outcome == "ended":
            assert not events and log and log[-1]["type"] in TERMINALS, where + outcome
            assert reader.after >= len(log), where + outcome
        elif outcome == "error:store_unavailable":
            assert reader.failures_at_end > reader.failures_at_start, (
                where + "store_unavailable, while every store call answered"
            )
        elif outcome == "error:owner_lost":
            died = reader.ownerless_at_start or reader.deaths_at_end > reader.deaths_at_start
            assert died, where + "owner_lost, while its owner lived"
            assert not (reader.turn.kind == "adapter" and reader.handle_at_end), (
                where + "owner_lost for a run it could re-attach to"
            )
        else:
            raise AssertionError(where + f"ended with {outcome}")

    # -- teardown ---------------------------------------------------------------------------

    def teardown(self) -> None:
        if not self.workers:  # set_up never ran (or failed)
            self.runner.close()
            return
        try:
            if not self.broken:
                self.drive(self._drive_to_the_end())
        finally:
            try:
                self.drive(self._close())
            finally:
                self.runner.close()

    async def _drive_to_the_end(self) -> None:
        """Every turn can be ended: end the producer of whoever owns it, restart the rest."""
        self.shared.down = False
        self.shared.lose_replies.clear()
        for worker in self.workers:
            if not worker.alive:
                if self.dead_at_the_end == "revive":
                    await self._revive(worker)
                else:
                    await self._replace(worker)
        posted: dict[int, int] = Counter()

        async def all_finished() -> bool:
            done = True
            for turn in self.turn_list:
                record = await self.record(turn)
                if record.status.finished:
                    continue
                done = False
                owner = self.owner_of(turn, record)
                if owner is not None and turn.cancel_allows is not None:
                    pass  # its cancel ends it
                elif owner is not None:
                    if turn.kind == "adapter":
                        run = self.substrate.runs[turn.key.execution_id]
                        if run.state == "running":
                            run.end()
                    else:
                        script = turn.producer.attempt(owner[1].attempt)
                        if script.end is None:
                            script.finish("completed")
                elif not record.lease_live:
                    posted[turn.index] += 1
                    assert posted[turn.index] <= 5, f"turn {turn.index} cannot be ended"
                    log_before = await self.log_of(turn)
                    result, _ = await self.post(turn, self.workers[0], after=record.last_seq)
                    assert result.status == 200, (result.status, result.body)
                    if result.mode == "restarted":
                        await self.wait_restart(turn, record, log_before)
                    await anyio.sleep(0.05)
            return done

        await wait_until("every turn to end", all_finished)
        await self._check_logs()
        for turn in self.turn_list:
            log = await self.log_of(turn)
            if turn.cancel_allows is not None:
                assert log[-1]["type"] in turn.cancel_allows, (
                    f"turn {turn.index} was cancelled, and its log ends with {log[-2:]}"
                )
                starts = self.starts[turn.key.execution_id]
                calls = len(turn.producer.calls) if turn.kind == "local" else starts
                assert calls <= 1 + turn.restarts_at_cancel, (
                    f"turn {turn.index} was cancelled, and then produced again"
                )
        async def readers_ended() -> bool:
            return all(reader.done for reader in self.readers)

        # Every reader ends: with the terminal event, or (cut off by a fault) in-band.
        await wait_until("every reader to end", readers_ended)
        await self._check_readers()

    async def _close(self) -> None:
        self.shared.down = False
        for reader in self.readers:
            if reader.task is not None and not reader.task.done():
                reader.task.cancel()
        for worker in self.workers:
            worker.link.cut = False
            worker.supervisor.shutdown_grace_s = 0
            with anyio.move_on_after(WAIT_S):
                await worker.supervisor.aclose()
        for reader in self.readers:
            if reader.task is not None:
                with anyio.move_on_after(1):
                    try:
                        await reader.task
                    except BaseException:
                        pass
        await self.inner.aclose()
        for client in self._clients:
            await client.aclose()


def run_model(backend: str, redis_url: str | None = None, *, examples: int, steps: int) -> None:
    machine = type(
        f"RuntimeModel_{backend}",
        (RuntimeModel,),
        {"backend": backend, "redis_url": redis_url},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# About 15 s per backend on two shared cores in the suite; TURNSTREAM_MODEL_SCALE=4 (say)
# runs four times the examples. A failure prints the steps that reproduce it, after a shrink
# that may take minutes: hence the long timeouts.
SCALE = float(os.environ.get("TURNSTREAM_MODEL_SCALE", "1"))


def scaled(examples: int) -> int:
    return max(1, round(examples * SCALE))


@pytest.mark.timeout(900)
def test_the_runtime_follows_its_model_on_memory(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="turnstream")  # the faults are on purpose
    run_model("memory", examples=scaled(40), steps=25)


@pytest.mark.timeout(900)
def test_the_runtime_follows_its_model_on_fakeredis(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="turnstream")
    run_model("fakeredis", examples=scaled(25), steps=25)


@pytest.mark.redis
@pytest.mark.timeout(900)
def test_the_runtime_follows_its_model_on_redis(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="turnstream")
    server = request.getfixturevalue("redis_server")
    run_model("redis", server.url, examples=scaled(25), steps=25)


# -- regressions the machine found, minimised -------------------------------------------------
#
# Each one a plain test of what a failing example came down to; the machine finds them too.

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", "proj:s1:0", "u1")
INPUT = {"message": "hi"}


def _logged(store: TurnStore, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        run = await store.get_run(KEY)
        return run is not None and run.last_seq >= n

    return check


async def _collect(result: ChatTurnResult) -> list[dict[str, Any]]:
    assert not isinstance(result.body, bytes), result.body
    data = b"".join([chunk async for chunk in result.body])
    return [orjson.loads(line) for line in data.splitlines() if line]


class _Parked:
    """A producer that says ``words`` (once ``gate`` opens, when given), then waits for ever."""

    def __init__(self, *words: str, gate: anyio.Event | None = None) -> None:
        self.words = words
        self.gate = gate

    async def __call__(self, context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        if self.gate is not None:
            await self.gate.wait()
        for word in self.words:
            yield {"type": "text-delta", "delta": word}
        await anyio.sleep_forever()


async def test_a_lost_restart_reply_counts_the_new_attempt_once() -> None:
    # restart() is not idempotent (MemoryStore adds one per call; RedisStore's restart_id is
    # new per call), but the pump retries it like its idempotent writes: a lost reply makes
    # attempt 1's takeover log `session.run.restarted` with attempt 3.
    memory = MemoryStore()
    store = FlakyStore(memory)
    async with (
        Supervisor(memory, lease_ms=100, heartbeat_ms=10_000_000) as dying,
        Supervisor(store, lease_ms=2000) as survivor,  # type: ignore[arg-type]
    ):
        await handle_chat_turn(IDENTITY, INPUT, supervisor=dying, produce=_Parked("a "))
        await wait_for(_logged(memory, 2))
        memory.expire_lease(KEY)  # the owner died
        store.lose_replies["restart"] = 1
        again = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=survivor, produce=_Parked("b ")
        )
        assert again.mode == "restarted"
        await wait_for(_logged(memory, 4))
        await survivor.cancel(KEY)
        events = await _collect(again)
        dying.shutdown_grace_s = 0
    assert store.failures["restart"] == 1
    assert [e["attempt"] for e in events if e["type"] == RESTARTED] == [2]
    assert events[-1]["attempt"] == 2


async def test_a_turn_restarted_before_anything_was_logged_still_starts_with_started() -> None:
    # The begin of a fresh turn lands and its reply is lost (the same happens when the owner
    # dies between begin and its first append): the run exists with an empty log. Its
    # restart used to log `session.run.restarted` as the log's first event, and no
    # `session.run.started` ever (DESIGN §5: "first event of every log").
    memory = MemoryStore()
    store = FlakyStore(memory)
    async with Supervisor(store, lease_ms=2000) as supervisor:  # type: ignore[arg-type]
        store.lose_replies["begin"] = 1
        first = await handle_chat_turn(IDENTITY, INPUT, supervisor=supervisor, produce=_Parked())
        assert first.status == 503
        memory.expire_lease(KEY)  # nobody runs it: its lease lapses
        again = await handle_chat_turn(
            IDENTITY, INPUT, supervisor=supervisor, produce=_Parked("x ")
        )
        assert again.mode == "restarted"
        await wait_for(_logged(memory, 2))
        await supervisor.cancel(KEY)
        events = await _collect(again)
    assert events[0]["type"] == STARTED, events[0]


async def test_a_cancel_while_a_landed_batch_is_retried_checkpoints_the_whole_log() -> None:
    # A batch lands but its reply is lost; while the pump waits to resend it, a cancel
    # arrives. A pump whose drain was cancelled in the middle of that retry never learned
    # that the batch is in the log, and finished with a checkpoint (and a terminal
    # `finalText`) that left its text out: checkpoint != fold of the log (DESIGN §3.8).
    memory = MemoryStore()
    store = FlakyStore(memory)
    async with Supervisor(store, lease_ms=2000) as supervisor:  # type: ignore[arg-type]
        gate = anyio.Event()
        await handle_chat_turn(
            IDENTITY, INPUT, supervisor=supervisor, produce=_Parked("landed ", gate=gate)
        )
        await wait_for(_logged(memory, 1))
        store.lose_replies["append_batch"] = 3  # it lands, and the pump resends it
        gate.set()
        await wait_for(_logged(memory, 2))
        await supervisor.cancel(KEY)

        async def finished() -> bool:
            record = await memory.get_run(KEY)
            return record is not None and record.status.finished

        await wait_for(finished)
    log = [e.payload() for e in await memory.read(KEY)]
    record = await memory.get_run(KEY)
    assert record is not None
    assert log[-1]["type"] == CANCELLED
    assert [e["delta"] for e in log if e["type"] == "text-delta"] == ["landed "]
    assert log[-1]["finalText"] == "landed " == record.final_text


async def test_a_cancelled_turn_whose_owner_died_ends_cancelled() -> None:
    # The cancel is accepted (True; the route answers 202, "the log ends with
    # session.run.cancelled"), but the owner is dead and nobody retries the turn: the sweeper
    # ends the orphan `error` owner_lost + `session.run.failed`, ignoring the cancel flag.
    store = MemoryStore()
    async with (
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as dying,
        Supervisor(store, lease_ms=2000, orphan_after_ms=50, sweep_interval_ms=20) as survivor,
    ):
        await handle_chat_turn(IDENTITY, INPUT, supervisor=dying, produce=_Parked("a "))
        await wait_for(_logged(store, 2))
        store.expire_lease(KEY)  # the owner died
        assert await survivor.cancel(KEY) is True

        async def finished() -> bool:
            record = await store.get_run(KEY)
            return record is not None and record.status.finished

        await wait_for(finished)
        log = [e.payload() for e in await store.read(KEY)]
        dying.shutdown_grace_s = 0
    assert log[-1]["type"] == CANCELLED, log[-2:]


async def test_a_cancelled_turn_whose_owner_died_is_not_produced_again() -> None:
    # The cancel is accepted while the owner is dead; the client's retry takes the run over,
    # and the takeover restarts the producer (a new model call for a cancelled turn) before
    # its first heartbeat reads the cancel flag that the store already holds.
    store = MemoryStore()
    calls: list[int] = []

    async def produce(context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        calls.append(context.attempt)
        yield {"type": "text-delta", "delta": f"attempt {context.attempt} "}
        await anyio.sleep_forever()

    async with (
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as dying,
        Supervisor(store, lease_ms=600) as survivor,
    ):
        await handle_chat_turn(IDENTITY, INPUT, supervisor=dying, produce=produce)
        await wait_for(_logged(store, 2))
        store.expire_lease(KEY)  # the owner died
        assert await survivor.cancel(KEY) is True
        again = await handle_chat_turn(IDENTITY, INPUT, supervisor=survivor, produce=produce)
        events = await _collect(again)
        dying.shutdown_grace_s = 0
    assert events[-1]["type"] == CANCELLED
    assert calls == [1], "a cancelled turn called its producer again"
