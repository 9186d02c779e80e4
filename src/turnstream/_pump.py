"""The pump: the single writer of one run.

It drains the producer (or a reconnect adapter) into the log through the process-wide writer,
publishes what the store acknowledged to local readers, and finishes the run (checkpoint +
terminal event + release) in one atomic store call. Its lease is renewed by the supervisor's
heartbeat; when the lease is lost the pump stops at once and writes nothing more.

A store that stops answering does not end the turn: every write is idempotent (event ids
dedup, ``finish`` answers a retry like the first call), so the pump retries it with backoff
while the producer runs ahead into a bounded outbox. Only after ``store_retry_s`` without an
answer does it give the turn up — and then it still ends it properly, with an in-band
``store_unavailable`` error and a terminal event, as soon as the store answers again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

from ._adapter import ReconnectAdapter, RunHandle
from ._events import (
    CANCELLED,
    COMPLETED,
    ERROR,
    FAILED,
    RESTARTED,
    STARTED,
    LoggedEvent,
    NewEvent,
    fast_logged_event,
)
from ._exceptions import LeaseLost, StoreError
from ._faults import fault_point
from ._fold import TextFold
from ._hooks import TurnCompletion, TurnHooks
from ._identity import TurnIdentity
from ._live import LiveRun
from ._outbox import Outbox
from ._produce import CANCELLED_CODE, Failure, Producing
from ._store import Lease, RunKey, RunStatus

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["Pump", "PumpMode"]

logger = logging.getLogger("turnstream.pump")

_CANCEL_TIMEOUT_S = 5.0
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
_BACKOFF_MAX_FINISHING_S = 2.0
_BATCH_BYTES = 1024 * 1024

# fresh: a new run; restart: a new attempt of a local producer; retry: a new attempt of a
# run that ended failed (its log holds that attempt's terminal event already); resume:
# re-attach to a substrate; orphan: nothing can resume it (its owner died long ago), so only
# end it.
PumpMode = Literal["fresh", "restart", "retry", "resume", "orphan"]

T = TypeVar("T")


class Pump:
    def __init__(
        self,
        supervisor: Supervisor,
        *,
        key: RunKey,
        lease: Lease,
        identity: TurnIdentity,
        input: Mapping[str, Any],
        hooks: TurnHooks,
        attempt: int,
        last_seq: int,
        mode: PumpMode,
        live: LiveRun,
        adapter: ReconnectAdapter | None = None,
        handle: RunHandle | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.key = key
        self.lease = lease
        self.identity = identity
        self.input = input
        self.hooks = hooks
        self.attempt = attempt
        self.last_seq = last_seq
        self.mode = mode
        self.live = live
        self.producing = Producing(self, adapter=adapter, handle=handle)
        self.fold = TextFold(hooks.accumulate)
        self.lost = False
        self.finished = False
        self._cancel_requested = False
        # While the producer is drained: what a cancel request does at once (no task waits
        # for it: a task per turn costs a few KB and a wake-up more).
        self._on_cancel: Callable[[], None] | None = None
        self._scope = anyio.CancelScope()
        # Monotonic time of the first store failure of the current outage (None: none).
        self._outage_since: float | None = None
        self._abandoned = False  # a batch was given up on: it may have landed all the same
        # False once the log is seen to hold a terminal event already (a retry reopened it).
        self._first_terminal = True

    @property
    def handle(self) -> RunHandle | None:
        return self.producing.handle

    @property
    def text(self) -> str:
        """The turn's text so far: the fold of what this pump knows of the log.

        With ``Supervisor(redact=…)``, masked as a whole as well: a secret split across two
        deltas matched neither, but it must not be checkpointed or persisted joined up.
        """
        redact = self.supervisor.redact
        text = self.fold.text
        return text if redact is None else str(redact(text))

    # -- control (called by the supervisor) ------------------------------------------------

    def request_cancel(self) -> None:
        if self._cancel_requested:
            return
        self._cancel_requested = True
        if self._on_cancel is not None:
            self._on_cancel()

    def lose_lease(self) -> None:
        """Another writer holds the run now: stop without writing anything more."""
        self.lost = True
        self._scope.cancel()

    def abandon(self) -> None:
        """Stop without finishing (shutdown after the grace period); the lease is released."""
        self._scope.cancel()

    # -- the pump --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                await self._run()
        except* LeaseLost:
            self.lost = True
            logger.warning("lease on %s was taken over; this pump stops", self.key.execution_id)
        except* Exception:
            # A bug, or a store error outside the retried writes: the run stays unfinished
            # and its lease lapses, so another worker (or the sweeper) takes it over.
            logger.exception("pump for %s stopped", self.key.execution_id)
        finally:
            self.live.close()

    async def _run(self) -> None:
        execution_id = self.key.execution_id
        if self.last_seq > 0:
            # Taken over: fold the whole log, from its start.
            self.last_seq = 0
            await self._retrying(lambda: self._catch_up(publish=False), None)
        # A cancel that came while nobody owned the run (its owner had died) is honoured
        # before anything is produced again: no new attempt, no second model call, and the
        # text logged so far is the turn's.
        cancelled = self._cancel_requested
        if self.mode in ("restart", "retry") and not cancelled:
            self.attempt = await self._retrying(
                lambda: self.supervisor.store.restart(self.key, self.lease), None
            )
            fault_point("pump.after_restart")
            self.fold.reset()
            self.producing.source_cursor = None
            if self.last_seq == 0:
                # The dead attempt logged nothing, not even its start: this attempt starts
                # the log (every log begins with session.run.started), and no client has
                # any text to drop.
                started = {"type": STARTED, "executionId": execution_id, "attempt": self.attempt}
                await self._log([self._lifecycle("ts:started", started)], None)
            else:
                restarted = {
                    "type": RESTARTED,
                    "executionId": execution_id,
                    "attempt": self.attempt,
                }
                await self._log([self._lifecycle(f"ts:restarted:{self.attempt}", restarted)], None)
        elif self.last_seq == 0:
            started = {"type": STARTED, "executionId": execution_id, "attempt": self.attempt}
            await self._log([self._lifecycle("ts:started", started)], None)

        outcome: Failure | str
        if cancelled:
            outcome = "cancelled"
        elif self.mode == "orphan":
            outcome = Failure("owner_lost", "the worker running this turn stopped", True)
        else:
            outcome = await self._drain()
        if isinstance(outcome, Failure) and outcome.code == CANCELLED_CODE:
            outcome = "cancelled"
        # From here on the turn only has to end, so the store is waited for without limit:
        # first whatever an abandoned batch may have logged after all (the fold must cover
        # the whole log), then the error and the terminal event.
        if self._abandoned:
            await self._retrying(lambda: self._catch_up(publish=True), None)
        if isinstance(outcome, Failure):
            error = {
                "type": ERROR,
                "code": outcome.code,
                "message": outcome.message,
                "retryable": outcome.retryable,
            }
            await self._log([self._lifecycle(f"ts:error:{self.attempt}", error)], None)
            status, terminal_type = RunStatus.FAILED, FAILED
        elif outcome == "cancelled":
            status, terminal_type = RunStatus.CANCELLED, CANCELLED
            await self._cancel_substrate()
        else:
            status, terminal_type = RunStatus.COMPLETED, COMPLETED
        final_text = self.text  # once: with redaction it is a pass over the whole text
        terminal = self._lifecycle(
            # One terminal per log, unless a retry reopened it: then each attempt's own id, so
            # a client that dedups on eventId keeps both.
            "ts:terminal" if self._first_terminal else f"ts:terminal:{self.attempt}",
            {
                "type": terminal_type,
                "executionId": execution_id,
                "attempt": self.attempt,
                "finalText": final_text,
            },
        )
        fault_point("pump.before_finish")
        persist = self.hooks.persist_assistant_message is not None
        seq = await self._retrying(
            lambda: self.supervisor.store.finish(
                self.key,
                self.lease,
                status=status,
                terminal=terminal,
                final_text=final_text,
                persist_after_ms=self.supervisor.persist_after_ms if persist else None,
            ),
            None,
        )
        fault_point("pump.after_finish")
        self.finished = True
        self.last_seq = seq
        logged = LoggedEvent(seq, terminal.event_id, terminal.type, terminal.data)
        self.live.publish([logged])
        await self._on_event(logged)
        self.supervisor.spawn_post_hooks(
            self._completion(status, final_text), self.hooks, persist=persist
        )

    # -- the store, retried ----------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]], give_up_s: float | None) -> T:
        """``call()`` until it answers: every write of the pump is idempotent under its lease.

        A :class:`StoreError` is retried with jittered backoff; ``give_up_s`` (None: never)
        bounds the outage, counted from its first failure, after which the error is raised.
        :class:`LeaseLost` is never retried: another writer owns the run.
        """
        delay = _BACKOFF_FIRST_S
        cap = _BACKOFF_MAX_S if give_up_s is not None else _BACKOFF_MAX_FINISHING_S
        while True:
            try:
                result = await call()
            except StoreError as exc:
                now = anyio.current_time()
                if self._outage_since is None:
                    self._outage_since = now
                    self.live.set_outage(True)
                    logger.warning(
                        "the store failed under %s (%s); retrying", self.key.execution_id, exc
                    )
                if give_up_s is not None and now - self._outage_since >= give_up_s:
                    raise
                await anyio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, cap)
                continue
            if self._outage_since is not None:
                logger.info(
                    "the store answers again under %s after %.1f s",
                    self.key.execution_id,
                    anyio.current_time() - self._outage_since,
                )
                self._outage_since = None
                self.live.set_outage(False)
            return result

    async def _catch_up(self, *, publish: bool) -> None:
        """Fold (and publish) what the log holds after ``last_seq``.

        After a takeover: what earlier owners logged (docs/lifecycle.md), and where a re-attach
        resumes. After an abandoned batch: whatever of it landed although no reply said so.
        """
        while True:
            events = await self.supervisor.store.read(self.key, after=self.last_seq, limit=1024)
            if not events:
                return
            for event in events:
                self.fold.add(event)
                self.last_seq = event.seq
                self.producing.saw_logged(event)
                if event.terminal:
                    self._first_terminal = False
            if publish:
                self.live.publish(events)

    async def _log(self, events: list[NewEvent], give_up_s: float | None) -> None:
        if self.lost:
            raise LeaseLost("lease lost")
        fault_point("pump.before_append")

        # Not shielded: only the end of this pump (its lease lost, or abandoned at shutdown)
        # cancels it, and then nothing of what it knows is written any more; a cancel request
        # lets the logger finish its batch (see _drain), so the fold covers what landed.
        writer = self.supervisor.writer
        seqs = await self._retrying(lambda: writer.append(self.key, self.lease, events), give_up_s)
        fault_point("pump.after_append")
        fresh: list[LoggedEvent] = []
        add = self.fold.add
        last_seq = self.last_seq
        for event, seq in zip(events, seqs, strict=True):
            if seq > last_seq:  # a deduplicated event was logged (and delivered) before
                logged = fast_logged_event(seq, event.event_id, event.type, event.data)
                fresh.append(logged)
                add(logged, event.text_delta)
                last_seq = seq
        self.last_seq = last_seq
        self.live.publish(fresh)
        if self.hooks.on_event is not None:
            for logged in fresh:
                await self._on_event(logged)

    # -- draining the producer -------------------------------------------------------------

    async def _drain(self) -> Failure | str:
        limits = self.supervisor.limits
        outbox: Outbox[Failure] = Outbox(
            max_bytes=limits.producer_buffer_bytes, max_events=limits.producer_buffer
        )
        outcome: Failure | str = "completed"
        producing = anyio.CancelScope()

        def on_cancel() -> None:
            nonlocal outcome
            outcome = "cancelled"
            # The producer stops at once, and what it ran ahead is never logged; the batch
            # being written lands (or not) as it will, and is folded either way.
            producing.cancel()
            outbox.discard()

        async def produce() -> None:
            with producing:
                await self.producing.run(outbox)

        async def log_all() -> None:
            nonlocal outcome
            result = await self._log_from(outbox)
            if result is not None and outcome != "cancelled":
                outcome = result
            tg.cancel_scope.cancel()

        self._on_cancel = on_cancel
        try:
            if self._cancel_requested:  # raised since _run looked
                on_cancel()
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                tg.start_soon(log_all)
        finally:
            self._on_cancel = None
        return outcome

    async def _log_from(self, outbox: Outbox[Failure]) -> Failure | None:
        give_up_s = self.supervisor.store_retry_s
        while True:
            batch = await outbox.take(max_events=1024, max_bytes=_BATCH_BYTES)
            if not batch:
                return outbox.end
            try:
                await self._log(batch, give_up_s)
            except StoreError:
                self._abandoned = True
                logger.error(
                    "the store did not answer for %.0f s; ending %s as failed",
                    give_up_s,
                    self.key.execution_id,
                )
                return Failure(
                    "store_unavailable",
                    f"the turn's log could not be written for {give_up_s:g} s",
                    True,
                )

    # -- helpers ---------------------------------------------------------------------------

    async def _cancel_substrate(self) -> None:
        adapter, handle = self.producing.adapter, self.producing.handle
        if adapter is None:
            return
        if handle is None:
            # Cancelled before the substrate yielded its handle: an adapter whose substrate
            # names runs by execution id can still say which run to cancel.
            handle_for = getattr(adapter, "handle_for", None)
            if handle_for is not None:
                try:
                    handle = handle_for(self.producing.start_request())
                except Exception:
                    logger.exception("adapter.handle_for failed for %s", self.key.execution_id)
            if handle is None:
                logger.info(
                    "%s was cancelled before its substrate run had a handle; the run is not "
                    "cancelled there",
                    self.key.execution_id,
                )
                return
        with anyio.move_on_after(_CANCEL_TIMEOUT_S, shield=True):
            try:
                await adapter.cancel(handle)
            except Exception:
                logger.exception("adapter.cancel failed for %s", self.key.execution_id)

    def _lifecycle(self, event_id: str, payload: Mapping[str, Any]) -> NewEvent:
        redact = self.supervisor.redact
        if redact is not None:
            # An error's message may quote what a substrate said; the final text is masked
            # already (it is the fold of masked events).
            payload = redact(payload)
        return NewEvent.build(event_id, payload, max_bytes=2**31)

    async def _on_event(self, event: LoggedEvent) -> None:
        if self.hooks.on_event is None:
            return
        try:
            await self.hooks.on_event(event)
        except Exception:
            logger.exception("on_event hook failed for %s", self.key.execution_id)

    def _completion(self, status: RunStatus, final_text: str) -> TurnCompletion:
        return TurnCompletion(
            identity=self.identity,
            execution_id=self.key.execution_id,
            status=status.value,
            final_text=final_text,
            attempt=self.attempt,
            last_seq=self.last_seq,
        )
