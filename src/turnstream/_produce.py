"""Where a pump's events come from: the app's producer, or a reconnect adapter's substrate.

This side of the pump validates each event, gives it its log id, and puts it in the pump's
outbox; the pump's other side logs what it finds there. Event ids are always scoped by the
attempt, in two namespaces that cannot meet:

* ``<attempt>/<id>`` — an id the producer or the substrate gave (``eventId``);
* ``<attempt>.<n>`` — generated for the n-th event of a producer that gave none;
* ``ts:…`` — the pump's own lifecycle events.

So a producer id ``"3"`` never dedups against the third id-less event, and a restarted attempt
never dedups against the dead attempt's events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._adapter import (
    ReconnectAdapter,
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from ._events import MAX_EVENT_ID_LENGTH, RESTARTED, LoggedEvent, NewEvent
from ._exceptions import AdapterError, InvalidTurnInput, LeaseLost, PayloadTooLarge, StoreError
from ._faults import fault_point
from ._hooks import TurnContext
from ._outbox import Outbox

if TYPE_CHECKING:
    from ._pump import Pump

__all__ = ["CANCELLED_CODE", "Failure", "Producing"]

logger = logging.getLogger("turnstream.pump")

_REATTACH_ATTEMPTS: Final = 3  # consecutive re-attaches that make no progress before giving up
_CLOSE_TIMEOUT_S: Final = 5.0
CANCELLED_CODE: Final = "\0cancelled"  # a Failure code no producer can send: substrate cancelled


class _TooManyEvents(Exception):
    pass


class _Stalled(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str
    retryable: bool = False


class Producing:
    def __init__(
        self, pump: Pump, *, adapter: ReconnectAdapter | None, handle: RunHandle | None
    ) -> None:
        self.pump = pump
        self.adapter = adapter
        self.handle = handle
        # The substrate's id of the last event seen: where a re-attach resumes.
        self.source_cursor: str | None = None
        self._produced = 0
        # The stall watch (see check_stall): no per-event clock reads, only a snapshot of
        # _produced that the supervisor's heartbeat compares.
        self._outbox: Outbox[Failure] | None = None
        self._stream_scope: anyio.CancelScope | None = None
        self._stalled = False
        self._saving_handle = False
        self._seen = (-1, 0.0)  # (_produced, loop time it was first seen at that count)

    # -- ids -------------------------------------------------------------------------------

    def _given_id(self, raw_id: str) -> str:
        if len(raw_id) > MAX_EVENT_ID_LENGTH:
            raise InvalidTurnInput(
                f"an eventId may hold at most {MAX_EVENT_ID_LENGTH} characters", field="eventId"
            )
        return f"{self.pump.attempt}/{raw_id}"

    def saw_logged(self, event: LoggedEvent) -> None:
        """A logged event of this run (read back after a takeover): track the cursor."""
        if event.type == RESTARTED:
            self.source_cursor = None
            return
        prefix = f"{self.pump.attempt}/"
        if event.event_id.startswith(prefix):
            self.source_cursor = event.event_id[len(prefix) :]

    # -- the stall watch -------------------------------------------------------------------

    def check_stall(self, now: float, timeout_s: float) -> bool:
        """Called by the supervisor's heartbeat: True when the source was stopped for silence.

        Silent means no event for ``timeout_s`` while nothing of ours held the source back
        (a full outbox, the handle being saved while the store is away). A producer is then
        stopped and the turn fails with ``stalled``; a substrate is re-attached once first.
        """
        outbox, scope = self._outbox, self._stream_scope
        if outbox is None or scope is None or self._stalled:
            return False
        if self._produced != self._seen[0] or outbox.put_waiting or self._saving_handle:
            self._seen = (self._produced, now)
            return False
        if now - self._seen[1] < timeout_s:
            return False
        self._stalled = True
        scope.cancel()
        return True

    async def _watched(self, stream: AsyncIterator[Any], outbox: Outbox[Failure]) -> bool:
        """Forward ``stream``; False when the stall watch stopped it (``_stalled`` is set)."""
        with anyio.CancelScope() as scope:
            self._stream_scope = scope
            self._seen = (self._produced, anyio.current_time())
            try:
                await self._forward(stream, outbox, from_adapter=self.adapter is not None)
            finally:
                self._stream_scope = None
        return not scope.cancelled_caught

    # -- driving ---------------------------------------------------------------------------

    async def run(self, outbox: Outbox[Failure]) -> None:
        end: Failure | None = None
        self._outbox = outbox
        try:
            if self.adapter is not None:
                await self._drive_adapter(self.adapter, outbox)
            else:
                await self._drive_producer(outbox)
        except PayloadTooLarge as exc:
            end = Failure("event_too_large", str(exc))
        except InvalidTurnInput as exc:
            end = Failure("invalid_event", str(exc))
        except _TooManyEvents as exc:
            end = Failure("too_many_events", str(exc))
        except _Stalled as exc:
            end = Failure("stalled", str(exc), True)
        except SubstrateCancelled:
            # In the stream, after what was produced before it: the turn ends cancelled.
            end = Failure(CANCELLED_CODE, "the substrate cancelled the run")
        except SubstrateFailed as exc:
            end = Failure(exc.code, str(exc), exc.retryable)
        except LeaseLost:
            raise
        except StoreError as exc:
            end = Failure("store_unavailable", f"the run handle could not be saved: {exc}", True)
        except Exception as exc:
            logger.exception("producer failed for %s", self.pump.key.execution_id)
            end = Failure("producer_error", f"the producer failed: {type(exc).__name__}", True)
        outbox.close(end)

    async def _drive_producer(self, outbox: Outbox[Failure]) -> None:
        pump = self.pump
        produce = pump.hooks.produce
        if produce is None:
            raise InvalidTurnInput("this turn has no producer")
        context = TurnContext(
            identity=pump.identity,
            execution_id=pump.key.execution_id,
            input=pump.input,
            attempt=pump.attempt,
        )
        if not await self._watched(produce(context), outbox):
            raise _Stalled(self._stall_message())

    def start_request(self) -> StartRequest:
        """What ``adapter.start`` is given for this attempt (and ``adapter.handle_for``)."""
        pump = self.pump
        return StartRequest(
            execution_id=pump.key.execution_id,
            identity=pump.identity,
            input=pump.input,
            attempt=pump.attempt,
        )

    def _stall_message(self) -> str:
        timeout_s = self.pump.supervisor.stall_timeout_s
        return f"the {'substrate' if self.adapter else 'producer'} sent nothing for {timeout_s:g} s"

    async def _drive_adapter(self, adapter: ReconnectAdapter, outbox: Outbox[Failure]) -> None:
        pump = self.pump
        failures = 0
        stalls = 0
        while True:
            if pump.mode == "resume" or (self.handle is not None and self._produced > 0):
                assert self.handle is not None
                stream = adapter.attach(self.handle, self.source_cursor)
            else:
                stream = adapter.start(self.start_request())
            before = self._produced
            try:
                if await self._watched(stream, outbox):
                    return
            except (
                SubstrateFailed,
                SubstrateCancelled,
                InvalidTurnInput,
                _TooManyEvents,
                StoreError,
                LeaseLost,
            ):
                raise
            except Exception as exc:
                # A broken connection to the substrate is not a failed run: re-attach after
                # the last event seen, as a takeover would.
                failures = 0 if self._produced > before else failures + 1
                if self.handle is None or failures >= _REATTACH_ATTEMPTS:
                    raise AdapterError(f"the substrate stream broke: {exc!r}") from exc
                logger.warning(
                    "substrate stream of %s broke (%r); re-attaching after %s",
                    pump.key.execution_id,
                    exc,
                    self.source_cursor,
                )
                await anyio.sleep(0.05 * 2**failures)
                continue
            # Silent for stall_timeout_s: a connection can hang without breaking (a proxy
            # that lost its upstream), so re-attach once; silent again, the run is stuck.
            stalls += 1
            if self.handle is None or stalls > 1:
                raise _Stalled(self._stall_message())
            self._stalled = False
            logger.warning(
                "substrate stream of %s was silent for %g s; re-attaching after %s",
                pump.key.execution_id,
                pump.supervisor.stall_timeout_s,
                self.source_cursor,
            )

    async def _save_handle(self, handle: RunHandle) -> None:
        pump = self.pump
        store = pump.supervisor.store
        data = handle.to_json()
        self._saving_handle = True
        try:
            await pump._retrying(
                lambda: store.set_handle(pump.key, pump.lease, data),
                pump.supervisor.store_retry_s,
            )
        finally:
            self._saving_handle = False
        self.handle = handle
        fault_point("pump.after_handle")

    async def _forward(
        self, stream: AsyncIterator[Any], outbox: Outbox[Failure], *, from_adapter: bool
    ) -> None:
        limits = self.pump.supervisor.limits
        max_events, max_bytes = limits.max_events_per_turn, limits.max_event_bytes
        attempt = self.pump.attempt
        build, put = NewEvent.build, outbox.put
        redact = self.pump.supervisor.redact
        try:
            async for item in stream:
                self._produced += 1
                if self._produced > max_events:
                    raise _TooManyEvents(f"the turn produced more than {max_events} events")
                raw_id: str | None
                payload: Any
                if type(item) is dict:  # the common case first: no ABC instance checks
                    payload = item
                    given = item.get("eventId")
                    raw_id = given if isinstance(given, str) and given else None
                elif isinstance(item, SupervisedEvent):
                    if item.handle is not None and self.handle is None:
                        # Persisted before the event that carries it is logged: whoever takes
                        # over after this event can re-attach.
                        await self._save_handle(item.handle)
                    raw_id, payload = item.event_id, item.payload
                else:
                    payload = item
                    given = item.get("eventId") if isinstance(item, Mapping) else None
                    raw_id = given if isinstance(given, str) and given else None
                if raw_id is not None:
                    event_id = self._given_id(raw_id)
                elif from_adapter:
                    raise InvalidTurnInput("an adapter event needs an event id", field="eventId")
                else:
                    event_id = f"{attempt}.{self._produced}"
                if redact is not None:
                    payload = redact(payload)  # before anything is logged, sent or folded
                event = build(event_id, payload, max_bytes=max_bytes)
                if event.terminal:
                    raise InvalidTurnInput(f"{event.type!r} is reserved for the pump", field="type")
                if raw_id is not None:
                    self.source_cursor = raw_id
                await put(event)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT_S):
                    await aclose()
