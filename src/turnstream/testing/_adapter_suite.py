"""The adapter conformance suite: what every :class:`~turnstream.ReconnectAdapter` must do.

One suite, every substrate (the in-process fake, the reference orchestrator over real HTTP,
and adapters written elsewhere). Subclass :class:`AdapterConformance` in a ``test_*.py``
module under a name pytest collects (``Test…``); see the class docstring.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar, NoReturn

import anyio
import orjson
import pytest

from .._adapter import (
    ReconnectAdapter,
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from .._events import TERMINAL_TYPES, TEXT_DELTA, NewEvent
from .._exceptions import AdapterError
from .._identity import TurnIdentity

__all__ = ["AdapterConformance", "StreamReader"]

StartRequestFactory = Callable[[], StartRequest]


class StreamReader:
    """Reads one adapter stream step by step, each step bounded by ``timeout_s``.

    ``outcome`` is ``None`` while the stream is open, then ``"completed"`` (iteration ended),
    ``"failed"`` (:class:`~turnstream.SubstrateFailed`, kept in ``error``) or
    ``"cancelled"`` (:class:`~turnstream.SubstrateCancelled`). Any other exception propagates:
    to this suite a stream that breaks by itself is a failure. Use it as an async context
    manager: the stream is closed on the way out, like the pump closes the ones it abandons.
    """

    def __init__(self, stream: AsyncIterator[SupervisedEvent], *, timeout_s: float) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.events: list[SupervisedEvent] = []
        self.outcome: str | None = None
        self.error: AdapterError | None = None

    async def __aenter__(self) -> StreamReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None:
            with anyio.fail_after(self.timeout_s, shield=True):
                await aclose()

    async def next(self) -> SupervisedEvent | None:
        """The next event, or ``None`` once the stream has ended (see ``outcome``)."""
        if self.outcome is not None:
            return None
        with anyio.fail_after(self.timeout_s):
            try:
                event = await anext(self.stream)
            except StopAsyncIteration:
                self.outcome = "completed"
                return None
            except SubstrateCancelled as exc:
                self.outcome, self.error = "cancelled", exc
                return None
            except SubstrateFailed as exc:
                self.outcome, self.error = "failed", exc
                return None
        self.events.append(event)
        return event

    async def take(self, count: int) -> list[SupervisedEvent]:
        """Up to ``count`` more events (fewer when the stream ends first)."""
        taken: list[SupervisedEvent] = []
        while len(taken) < count:
            event = await self.next()
            if event is None:
                break
            taken.append(event)
        return taken

    async def rest(self, *, max_events: int = 100_000) -> StreamReader:
        """Read to the end of the stream (at most ``max_events`` more events)."""
        for _ in range(max_events):
            if await self.next() is None:
                return self
        raise AssertionError(f"the stream did not end within {max_events} events")

    @property
    def ids(self) -> list[str]:
        return [event.event_id for event in self.events]

    @property
    def text(self) -> str:
        return text_of(self.events)

    @property
    def handle(self) -> RunHandle | None:
        return next((event.handle for event in self.events if event.handle is not None), None)


def text_of(events: Sequence[SupervisedEvent]) -> str:
    """The text the events assemble to (the pump's default fold: ``text-delta`` deltas)."""
    return "".join(
        str(event.payload.get("delta", ""))
        for event in events
        if event.payload.get("type") == TEXT_DELTA
    )


def _summary(events: Sequence[SupervisedEvent]) -> list[tuple[str, Any]]:
    """``(eventId, type)`` pairs: what an assertion message should show of a stream."""
    return [(event.event_id, event.payload.get("type")) for event in events]


class AdapterConformance:
    """The reconnect adapter conformance tests. Subclass it and provide::

        class TestMyAdapter(AdapterConformance):
            @pytest.fixture
            async def adapter(self) -> AsyncIterator[ReconnectAdapter]:
                async with MyAdapter(...) as adapter:
                    yield adapter

            @pytest.fixture
            def start_request(self) -> Callable[[], StartRequest]:
                return lambda: self.new_request("tell me about leases")

            def expected_text(self, request: StartRequest) -> str:
                return my_substrate_reply(request.input["message"])

            def make_fail_request(self, request: StartRequest) -> StartRequest | None:
                return dataclasses.replace(request, input={"message": "please fail"})

    * ``adapter`` — the adapter under test (usable on the running test's event loop).
    * ``start_request`` — a factory of fresh requests: every call a new execution id, for a
      run that completes with :meth:`expected_text`. The run must still be going when the
      suite cancels it right after its first event: give it several paced text deltas
      (turnstream's own tests use 8 to 16 deltas 15 ms apart).
    * :meth:`expected_text` — the final text such a run assembles to.
    * :meth:`make_fail_request` (optional) — a request whose run fails; ``None`` skips the
      failure tests.

    The tests are ``async def``: run them with pytest-asyncio (``asyncio_mode = "auto"``, or
    mark the subclass ``@pytest.mark.asyncio``). Every wait is bounded by ``timeout_s``.
    """

    #: The handle must come with one of the first this many events (and before any text).
    handle_within_events: ClassVar[int] = 1
    #: Bound on every single wait of the suite (one event, one cancel, one close).
    timeout_s: ClassVar[float] = 10.0

    # -- what a subclass provides ---------------------------------------------------------

    @pytest.fixture
    def adapter(self) -> NoReturn:
        pytest.fail(
            "AdapterConformance needs an `adapter` fixture: override it in your subclass",
            pytrace=False,
        )

    @pytest.fixture
    def start_request(self) -> NoReturn:
        pytest.fail(
            "AdapterConformance needs a `start_request` fixture (a factory of fresh "
            "StartRequests): override it in your subclass",
            pytrace=False,
        )

    def expected_text(self, request: StartRequest) -> str:
        """The final text of the run ``request`` starts."""
        pytest.fail(
            "AdapterConformance needs `expected_text(request)`: override it in your subclass",
            pytrace=False,
        )

    def make_fail_request(self, request: StartRequest) -> StartRequest | None:
        """A variant of the fresh ``request`` whose run fails; ``None``: cannot fail on purpose."""
        return None

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def new_request(message: str, **input: Any) -> StartRequest:
        """A request for a turn no other test uses, with ``{"message": message, **input}``."""
        unique = uuid.uuid4().hex
        identity = TurnIdentity(
            tenant_id=f"tenant-{unique[:8]}",
            project_id="conformance",
            session_id=f"session-{unique}",
            user_id="user-1",
            turn_index=0,
        )
        return StartRequest(
            execution_id=identity.execution_id,
            identity=identity,
            input={"message": message, **input},
        )

    def reader(self, stream: AsyncIterator[SupervisedEvent]) -> StreamReader:
        return StreamReader(stream, timeout_s=self.timeout_s)

    async def run_to_end(
        self, adapter: ReconnectAdapter, request: StartRequest
    ) -> tuple[StreamReader, RunHandle]:
        """Start ``request``'s run and read it to its end; the reader and the handle."""
        async with self.reader(adapter.start(request)) as stream:
            await stream.rest()
        assert stream.handle is not None, f"start never yielded a handle: {_summary(stream.events)}"
        return stream, stream.handle

    async def attach_to_end(
        self, adapter: ReconnectAdapter, handle: RunHandle, after_event_id: str | None
    ) -> StreamReader:
        async with self.reader(adapter.attach(handle, after_event_id)) as stream:
            await stream.rest()
        return stream

    async def first_events(
        self, adapter: ReconnectAdapter, request: StartRequest
    ) -> tuple[StreamReader, RunHandle]:
        """An open start stream, read up to (and including) the event with the handle."""
        stream = self.reader(adapter.start(request))
        for _ in range(self.handle_within_events):
            event = await stream.next()
            if event is None or event.handle is not None:
                break
        if stream.handle is None:
            await stream.aclose()
            pytest.fail(
                f"start yielded no handle within {self.handle_within_events} event(s): "
                f"{_summary(stream.events)}, outcome {stream.outcome}"
            )
        return stream, stream.handle

    async def cancel(self, adapter: ReconnectAdapter, handle: RunHandle) -> None:
        with anyio.fail_after(self.timeout_s):
            await adapter.cancel(handle)

    # -- the protocol ---------------------------------------------------------------------

    async def test_adapter_is_a_reconnect_adapter(self, adapter: ReconnectAdapter) -> None:
        assert isinstance(adapter, ReconnectAdapter)
        assert isinstance(adapter.kind, str) and adapter.kind

    # -- start ----------------------------------------------------------------------------

    async def test_start_yields_the_handle_early_before_any_text(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        stream, handle = await self.first_events(adapter, start_request())
        try:
            assert not any(e.payload.get("type") == TEXT_DELTA for e in stream.events), (
                f"text before the handle: {_summary(stream.events)}"
            )
            assert handle.kind == adapter.kind
            assert isinstance(handle.run_id, str) and handle.run_id
            # Persisted as JSON and read back by another worker: it must survive the trip.
            assert RunHandle.from_json(orjson.loads(orjson.dumps(handle.to_json()))) == handle
            # Only the first handle counts; later events need not repeat it.
            assert stream.events[-1].handle is handle
        finally:
            await stream.aclose()
            await self.cancel(adapter, handle)

    async def test_start_streams_the_whole_text_and_ends(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        stream, _ = await self.run_to_end(adapter, request)
        assert stream.outcome == "completed", stream.error
        assert stream.text == self.expected_text(request)

    async def test_events_are_valid_log_events_with_unique_ids(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        stream, _ = await self.run_to_end(adapter, start_request())
        ids = stream.ids
        assert len(set(ids)) == len(ids), f"duplicate event ids: {ids}"
        for event in stream.events:
            assert isinstance(event, SupervisedEvent)
            assert isinstance(event.event_id, str) and event.event_id
            # What the pump does with each event: it must be a loggable one...
            NewEvent.build(event.event_id, event.payload)
            # ...and never a terminal event: those are the pump's to write.
            assert event.payload.get("type") not in TERMINAL_TYPES, _summary(stream.events)

    # -- attach ---------------------------------------------------------------------------

    async def test_attach_from_the_start_replays_the_same_events(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        started, handle = await self.run_to_end(adapter, request)
        attached = await self.attach_to_end(adapter, handle, None)
        assert attached.outcome == "completed", attached.error
        # The seam of a re-attach deduplicates on these ids: they must be the same ones.
        assert attached.ids == started.ids
        assert [dict(e.payload) for e in attached.events] == [
            dict(e.payload) for e in started.events
        ]
        assert attached.text == self.expected_text(request)

    async def test_attach_after_a_cursor_yields_only_later_events(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        started, handle = await self.run_to_end(adapter, request)
        ids = started.ids
        assert ids, "the run yielded no events"
        # First, second, middle, one before last, last: a replay after the last event a
        # client saw has nothing left to say but how the run ended.
        last = len(ids) - 1
        for k in sorted({0, min(1, last), last // 2, max(last - 1, 0), last}):
            attached = await self.attach_to_end(adapter, handle, ids[k])
            assert attached.outcome == "completed", (k, attached.error)
            assert attached.ids == ids[k + 1 :], f"after {ids[k]!r}"
            assert text_of(started.events[: k + 1]) + attached.text == self.expected_text(request)

    @pytest.mark.parametrize("every", [1, 3])
    async def test_a_stream_cut_again_and_again_delivers_the_text_exactly_once(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory, every: int
    ) -> None:
        """Read ``every`` events, drop the stream, re-attach after the last id: until the end."""
        request = start_request()
        seen: list[SupervisedEvent] = []
        stream, handle = await self.first_events(adapter, request)
        async with stream:
            await stream.take(every - len(stream.events))
        seen += stream.events
        outcome = stream.outcome
        for _ in range(10_000):
            if outcome is not None:
                break
            cursor = seen[-1].event_id
            async with self.reader(adapter.attach(handle, cursor)) as stream:
                await stream.take(every)
            again = {event.event_id for event in seen} & set(stream.ids)
            assert not again, f"attach after {cursor!r} yielded {sorted(again)} again"
            seen += stream.events
            outcome = stream.outcome
        assert outcome == "completed", f"no end after {len(seen)} events"
        ids = [event.event_id for event in seen]
        assert len(set(ids)) == len(ids), f"an event came twice across the cuts: {ids}"
        assert text_of(seen) == self.expected_text(request)

    async def test_a_run_goes_on_after_its_stream_is_closed(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        stream, handle = await self.first_events(adapter, request)
        await stream.aclose()  # the worker that started the run is gone
        attached = await self.attach_to_end(adapter, handle, None)
        assert attached.outcome == "completed", attached.error
        assert attached.text == self.expected_text(request)

    async def test_concurrent_attaches_see_the_same_run(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        stream, handle = await self.first_events(adapter, request)
        await stream.aclose()
        results: list[StreamReader] = []

        async def attach() -> None:
            results.append(await self.attach_to_end(adapter, handle, None))

        async with anyio.create_task_group() as tg:
            tg.start_soon(attach)
            tg.start_soon(attach)
        first, second = results
        assert first.outcome == second.outcome == "completed"
        assert first.ids == second.ids
        assert first.text == second.text == self.expected_text(request)

    # -- cancel ---------------------------------------------------------------------------

    async def test_cancel_mid_run_ends_the_run_cancelled(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        stream, handle = await self.first_events(adapter, request)
        async with stream:
            await self.cancel(adapter, handle)
            await stream.rest()
        # The live stream says so, or just ends; either way it stops, and text it carried
        # is a beginning of the reply.
        assert stream.outcome in ("cancelled", "completed"), stream.error
        assert self.expected_text(request).startswith(stream.text)
        later = await self.attach_to_end(adapter, handle, None)
        assert later.outcome == "cancelled", (
            f"the run was not cancelled (was it over before the cancel? make the runs of "
            f"start_request() slower): {_summary(later.events)}"
        )
        assert isinstance(later.error, SubstrateCancelled)
        assert later.ids[: len(stream.ids)] == stream.ids
        ids = later.ids
        assert len(set(ids)) == len(ids), ids

    async def test_cancel_is_idempotent(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        stream, handle = await self.first_events(adapter, start_request())
        await stream.aclose()
        await self.cancel(adapter, handle)
        await self.cancel(adapter, handle)
        later = await self.attach_to_end(adapter, handle, None)
        assert later.outcome == "cancelled"
        await self.cancel(adapter, handle)  # and after the run ended cancelled
        again = await self.attach_to_end(adapter, handle, None)
        assert again.outcome == "cancelled"
        assert again.ids == later.ids

    async def test_cancel_after_completion_is_a_harmless_no_op(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = start_request()
        started, handle = await self.run_to_end(adapter, request)
        await self.cancel(adapter, handle)
        await self.cancel(adapter, handle)
        attached = await self.attach_to_end(adapter, handle, None)
        assert attached.outcome == "completed", attached.error
        assert attached.ids == started.ids
        assert attached.text == self.expected_text(request)

    # -- failure --------------------------------------------------------------------------

    def _fail_request(self, start_request: StartRequestFactory) -> StartRequest:
        request = self.make_fail_request(start_request())
        if request is None:
            pytest.skip("make_fail_request() gives no request whose run fails")
        return request

    async def test_a_failed_run_raises_substrate_failed(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = self._fail_request(start_request)
        async with self.reader(adapter.start(request)) as stream:
            await stream.rest()
        assert stream.outcome == "failed", f"{stream.outcome}: {_summary(stream.events)}"
        assert isinstance(stream.error, SubstrateFailed)
        assert isinstance(stream.error.code, str) and stream.error.code
        assert isinstance(stream.error.retryable, bool)
        if stream.handle is not None:
            later = await self.attach_to_end(adapter, stream.handle, None)
            assert later.outcome == "failed"
            assert isinstance(later.error, SubstrateFailed)
            assert later.error.code == stream.error.code
            assert later.ids == stream.ids
            # Cancelling a failed run changes nothing either.
            await self.cancel(adapter, stream.handle)

    async def test_a_failed_run_fails_again_after_a_cursor(
        self, adapter: ReconnectAdapter, start_request: StartRequestFactory
    ) -> None:
        request = self._fail_request(start_request)
        async with self.reader(adapter.start(request)) as stream:
            await stream.rest()
        if stream.handle is None or not stream.ids:
            pytest.skip("the failing run yielded no handle to re-attach with")
        later = await self.attach_to_end(adapter, stream.handle, stream.ids[-1])
        assert later.outcome == "failed"
        assert later.ids == []
