"""The pump: the single writer of one run.

It drains the producer into the log through the process-wide writer, publishes what the store
acknowledged to local readers, and finishes the run (checkpoint + terminal event + release) in
one atomic store call. Its lease is renewed by the supervisor's heartbeat; when the lease is
lost the pump stops at once and writes nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._adapter import (
    ReconnectAdapter,
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from ._events import (
    CANCELLED,
    COMPLETED,
    ERROR,
    FAILED,
    RESTARTED,
    STARTED,
    LoggedEvent,
    NewEvent,
)
from ._exceptions import AdapterError, InvalidTurnInput, LeaseLost, PayloadTooLarge, StoreError
from ._hooks import TurnCompletion, TurnContext, TurnHooks
from ._identity import TurnIdentity
from ._live import LiveRun
from ._store import Lease, RunKey, RunStatus

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["Pump"]

logger = logging.getLogger("turnstream.pump")

_FINISH_ATTEMPTS = 3
_REATTACH_ATTEMPTS = 3  # consecutive re-attaches that make no progress before giving up
_CANCEL_TIMEOUT_S = 5.0

PumpMode = Literal["fresh", "restart", "resume"]
_CANCELLED = "\0cancelled"  # a _Failure code no producer can send: the substrate cancelled


class _TooManyEvents(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str
    message: str
    retryable: bool = False


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
        self.adapter = adapter
        self.handle = handle
        # The substrate's id of the last event seen: where a re-attach resumes.
        self.source_cursor: str | None = None
        self.text = ""
        self.lost = False
        self.finished = False
        self._cancel_requested = anyio.Event()
        self._scope = anyio.CancelScope()
        self._produced = 0

    # -- control (called by the supervisor) ------------------------------------------------

    def request_cancel(self) -> None:
        self._cancel_requested.set()

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
            # Only a store outage gets here (producer errors are logged in-band): the run
            # stays unfinished and its lease lapses, so the next request takes it over.
            logger.exception("pump for %s stopped", self.key.execution_id)
        finally:
            self.live.close()

    async def _run(self) -> None:
        store = self.supervisor.store
        execution_id = self.key.execution_id
        if self.last_seq > 0:
            await self._scan_log()
        if self.mode == "restart":
            self.attempt = await store.restart(self.key, self.lease)
            self.text = ""
            self.source_cursor = None
            await self._log(
                [
                    self._lifecycle(
                        f"ts:restarted:{self.attempt}",
                        {"type": RESTARTED, "executionId": execution_id, "attempt": self.attempt},
                    )
                ]
            )
        elif self.last_seq == 0:
            await self._log(
                [
                    self._lifecycle(
                        "ts:started",
                        {"type": STARTED, "executionId": execution_id, "attempt": self.attempt},
                    )
                ]
            )

        outcome = await self._drain()
        if isinstance(outcome, _Failure):
            await self._log(
                [
                    self._lifecycle(
                        f"ts:error:{self.attempt}",
                        {
                            "type": ERROR,
                            "code": outcome.code,
                            "message": outcome.message,
                            "retryable": outcome.retryable,
                        },
                    )
                ]
            )
            status, terminal_type = RunStatus.FAILED, FAILED
        elif outcome == "cancelled":
            status, terminal_type = RunStatus.CANCELLED, CANCELLED
            await self._cancel_substrate()
        else:
            status, terminal_type = RunStatus.COMPLETED, COMPLETED
        terminal = self._lifecycle(
            "ts:terminal",
            {
                "type": terminal_type,
                "executionId": execution_id,
                "attempt": self.attempt,
                "finalText": self.text,
            },
        )
        seq = await self._finish(status, terminal)
        self.finished = True
        self.last_seq = seq
        logged = LoggedEvent(seq, terminal.event_id, terminal.type, terminal.data)
        self.live.publish([logged])
        await self._on_event(logged)
        self.supervisor.spawn_post_hooks(self._completion(status), self.hooks)

    async def _finish(self, status: RunStatus, terminal: NewEvent) -> int:
        store = self.supervisor.store
        for attempt in range(1, _FINISH_ATTEMPTS + 1):
            try:
                # Idempotent under the same lease, so a retry after a lost reply is safe.
                return await store.finish(
                    self.key, self.lease, status=status, terminal=terminal, final_text=self.text
                )
            except LeaseLost:
                raise
            except StoreError:
                if attempt == _FINISH_ATTEMPTS:
                    raise
                await anyio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _scan_log(self) -> None:
        """After a takeover: the fold must cover what earlier owners logged (DESIGN §3.8),
        and a re-attach resumes after the last substrate event they logged."""
        cursor = 0
        while True:
            events = await self.supervisor.store.read(self.key, after=cursor, limit=1024)
            if not events:
                return
            for event in events:
                self._fold(event)
                cursor = event.seq
                if event.type == RESTARTED:
                    self.source_cursor = None
                elif not event.event_id.startswith("ts:"):
                    self.source_cursor = self._source_id(event.event_id)

    def _scoped_id(self, raw_id: str) -> str:
        # A restarted attempt never dedups against the dead attempt's events.
        return raw_id if self.attempt == 1 else f"{self.attempt}.{raw_id}"

    def _source_id(self, event_id: str) -> str:
        prefix = f"{self.attempt}."
        if self.attempt > 1 and event_id.startswith(prefix):
            return event_id[len(prefix) :]
        return event_id

    async def _cancel_substrate(self) -> None:
        if self.adapter is None or self.handle is None:
            return
        with anyio.move_on_after(_CANCEL_TIMEOUT_S, shield=True):
            try:
                await self.adapter.cancel(self.handle)
            except Exception:
                logger.exception("adapter.cancel failed for %s", self.key.execution_id)

    def _fold(self, event: LoggedEvent) -> None:
        if event.type == RESTARTED:
            self.text = ""  # a restarted attempt's text replaces the dead attempt's
            return
        payload = orjson.loads(event.data)
        self.text = self.hooks.accumulate(self.text, payload)

    def _lifecycle(self, event_id: str, payload: Mapping[str, Any]) -> NewEvent:
        return NewEvent.build(event_id, payload, max_bytes=2**31)

    async def _log(self, events: list[NewEvent]) -> None:
        if self.lost:
            raise LeaseLost("lease lost")
        # Shielded: once queued the events may land, and a pump that stopped waiting would
        # lose track of seqs and text that are in the log (checkpoint = fold of the log).
        with anyio.CancelScope(shield=True):
            seqs = await self.supervisor.writer.append(self.key, self.lease, events)
        fresh: list[LoggedEvent] = []
        for event, seq in zip(events, seqs, strict=True):
            if seq > self.last_seq:  # a deduplicated event was logged (and delivered) before
                fresh.append(LoggedEvent(seq, event.event_id, event.type, event.data))
                self.last_seq = seq
        for logged in fresh:
            self._fold(logged)
        self.live.publish(fresh)
        for logged in fresh:
            await self._on_event(logged)

    async def _on_event(self, event: LoggedEvent) -> None:
        if self.hooks.on_event is None:
            return
        try:
            await self.hooks.on_event(event)
        except Exception:
            logger.exception("on_event hook failed for %s", self.key.execution_id)

    # -- draining the producer -------------------------------------------------------------

    async def _drain(self) -> _Failure | str:
        limits = self.supervisor.limits
        send, receive = anyio.create_memory_object_stream[NewEvent | _Failure](
            limits.producer_buffer
        )
        outcome: _Failure | str = "completed"
        async with anyio.create_task_group() as tg:

            async def watch_cancel() -> None:
                nonlocal outcome
                await self._cancel_requested.wait()
                outcome = "cancelled"
                tg.cancel_scope.cancel()

            async def log_all() -> None:
                nonlocal outcome
                result = await self._log_from(receive)
                if result is not None:
                    outcome = "cancelled" if result.code == _CANCELLED else result
                tg.cancel_scope.cancel()

            tg.start_soon(watch_cancel)
            tg.start_soon(self._produce, send)
            tg.start_soon(log_all)
        return outcome

    async def _log_from(
        self, receive: MemoryObjectReceiveStream[NewEvent | _Failure]
    ) -> _Failure | None:
        async with receive:
            async for first in receive:
                batch: list[NewEvent] = []
                item: NewEvent | _Failure = first
                while True:
                    if isinstance(item, _Failure):
                        if batch:
                            await self._log(batch)
                        return item
                    batch.append(item)
                    if len(batch) >= 1024:
                        break
                    try:
                        item = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._log(batch)
        return None

    async def _produce(self, send: MemoryObjectSendStream[NewEvent | _Failure]) -> None:
        async with send:
            try:
                if self.adapter is not None:
                    await self._drive_adapter(self.adapter, send)
                else:
                    await self._drive_producer(send)
            except PayloadTooLarge as exc:
                await send.send(_Failure("event_too_large", str(exc)))
            except InvalidTurnInput as exc:
                await send.send(_Failure("invalid_event", str(exc)))
            except _TooManyEvents as exc:
                await send.send(_Failure("too_many_events", str(exc)))
            except SubstrateCancelled:
                # In the stream, after what was produced before it: the turn ends cancelled.
                await send.send(_Failure(_CANCELLED, "the substrate cancelled the run"))
            except SubstrateFailed as exc:
                await send.send(_Failure(exc.code, str(exc), exc.retryable))
            except LeaseLost:
                raise
            except Exception as exc:
                logger.exception("producer failed for %s", self.key.execution_id)
                await send.send(
                    _Failure("producer_error", f"the producer failed: {type(exc).__name__}", True)
                )

    async def _drive_producer(self, send: MemoryObjectSendStream[NewEvent | _Failure]) -> None:
        produce = self.hooks.produce
        if produce is None:
            await send.send(_Failure("no_producer", "this turn has no producer"))
            return
        context = TurnContext(
            identity=self.identity,
            execution_id=self.key.execution_id,
            input=self.input,
            attempt=self.attempt,
        )
        await self._forward(produce(context), send, scope_all=True)

    async def _drive_adapter(
        self, adapter: ReconnectAdapter, send: MemoryObjectSendStream[NewEvent | _Failure]
    ) -> None:
        failures = 0
        while True:
            if self.mode == "resume" or (self.handle is not None and self._produced > 0):
                assert self.handle is not None
                stream = adapter.attach(self.handle, self.source_cursor)
            else:
                stream = adapter.start(
                    StartRequest(
                        execution_id=self.key.execution_id,
                        identity=self.identity,
                        input=self.input,
                        attempt=self.attempt,
                    )
                )
            before = self._produced
            try:
                await self._forward(stream, send, scope_all=False)
                return
            except (SubstrateFailed, SubstrateCancelled, InvalidTurnInput, _TooManyEvents):
                raise
            except Exception as exc:
                # A broken connection to the substrate is not a failed run: re-attach after
                # the last event seen, as a takeover would.
                failures = 0 if self._produced > before else failures + 1
                if self.handle is None or failures >= _REATTACH_ATTEMPTS:
                    raise AdapterError(f"the substrate stream broke: {exc!r}") from exc
                logger.warning(
                    "substrate stream of %s broke (%r); re-attaching after %s",
                    self.key.execution_id,
                    exc,
                    self.source_cursor,
                )
                await anyio.sleep(0.05 * 2**failures)

    async def _forward(
        self,
        stream: AsyncIterator[Any],
        send: MemoryObjectSendStream[NewEvent | _Failure],
        *,
        scope_all: bool,
    ) -> None:
        limits = self.supervisor.limits
        try:
            async for item in stream:
                self._produced += 1
                if self._produced > limits.max_events_per_turn:
                    raise _TooManyEvents(
                        f"the turn produced more than {limits.max_events_per_turn} events"
                    )
                raw_id: str | None
                if isinstance(item, SupervisedEvent):
                    if item.handle is not None and self.handle is None:
                        # Persisted before the event that carries it is logged: whoever takes
                        # over after this event can re-attach.
                        await self.supervisor.store.set_handle(
                            self.key, self.lease, item.handle.to_json()
                        )
                        self.handle = item.handle
                    raw_id, payload = item.event_id, item.payload
                else:
                    payload = item
                    given = item.get("eventId") if isinstance(item, Mapping) else None
                    raw_id = given if isinstance(given, str) else None
                if scope_all:
                    event_id = f"{self.attempt}.{raw_id or self._produced}"
                elif raw_id and not raw_id.startswith("ts:"):
                    event_id = self._scoped_id(raw_id)
                else:
                    raise InvalidTurnInput(
                        "an adapter event needs an event id that does not start with 'ts:'",
                        field="eventId",
                    )
                event = NewEvent.build(event_id, payload, max_bytes=limits.max_event_bytes)
                if event.terminal:
                    raise InvalidTurnInput(f"{event.type!r} is reserved for the pump", field="type")
                if raw_id:
                    self.source_cursor = raw_id
                await send.send(event)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_TIMEOUT_S):
                    await aclose()

    def _completion(self, status: RunStatus) -> TurnCompletion:
        return TurnCompletion(
            identity=self.identity,
            execution_id=self.key.execution_id,
            status=status.value,
            final_text=self.text,
            attempt=self.attempt,
            last_seq=self.last_seq,
        )
