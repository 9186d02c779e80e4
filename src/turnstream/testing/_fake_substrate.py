"""``FakeSubstrate``: an in-process substrate and its reconnect adapter, for tests.

It behaves like the reference substrate without HTTP: one run per execution id,
runs that go on whether or not anyone is attached, event ids unique within a run, replay
after any id, idempotent cancel. Tests steer it:

* **pacing** — by the clock (``step_delay_s``: event *i* of a run is out ``i * step_delay_s``
  after the run started; ``0`` puts the whole run out at once) or by hand (``manual=True``:
  only the ``execution.started`` event is out until the test calls :meth:`advance` or
  :meth:`release`);
* **counters** — :attr:`runs_started`, :meth:`starts`, :attr:`start_calls`,
  :attr:`attach_calls`, :attr:`cancel_calls`, :attr:`open_streams`;
* **faults** — :meth:`cut_streams` (the next streams break after *k* events, as a dropped
  connection does), :meth:`refuse_streams` (the next streams fail before their first event,
  as an unreachable substrate does), :meth:`fail_run` (a running run fails),
  :meth:`forget` (the substrate loses a run), and the prompt ``"please fail"`` (the run fails
  after two deltas, like the reference substrate's).

A run's events are a pure function of its script, the clock and what the test did, so the
fake needs no background task: ``FakeSubstrate()`` works in any test, with or without a
running event loop at construction.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.lowlevel

from .._adapter import (
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from .._demo._app import fake_reply
from .._exceptions import AdapterError

__all__ = ["FakeRun", "FakeSubstrate", "FakeSubstrateAdapter"]

STARTED: Final = "execution.started"
COMPLETED: Final = "execution.completed"
FAILED: Final = "execution.failed"
CANCELLED: Final = "execution.cancelled"
_STATUS: Final = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}
#: Clock tolerance: an event due at ``t`` is out at ``t`` even if float arithmetic says t-ε.
_EPSILON: Final = 1e-9

Event = tuple[str, dict[str, Any]]


def _event_id(position: int) -> str:
    # Not bare numbers on purpose: code that compares ids as integers fails against the fake.
    return f"evt-{position}"


class FakeRun:
    """One run of a :class:`FakeSubstrate`: what it will say, and how much it has said."""

    def __init__(
        self,
        *,
        run_id: str,
        execution_id: str,
        message: str,
        script: list[Event],
        started_at: float,
        step_delay_s: float,
        manual: bool,
    ) -> None:
        self.run_id = run_id
        self.execution_id = execution_id
        self.message = message
        self._script = script
        self._started_at = started_at
        self._step_delay_s = step_delay_s
        self._manual = manual
        self._released = 1  # manual pacing: execution.started is out at once
        self._stopped: list[Event] | None = None  # the events once a cancel/fault ended it
        self.forgotten = False

    # -- what a test reads -----------------------------------------------------------------

    def events(self) -> list[Event]:
        """The events that are out now: ``(event id, substrate event)`` pairs."""
        if self._stopped is not None:
            return self._stopped
        return self._script[: self._out(anyio.current_time())]

    @property
    def status(self) -> str:
        """``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``."""
        events = self.events()
        return _STATUS.get(events[-1][1]["type"], "running") if events else "running"

    @property
    def text(self) -> str:
        """The text the run has sent so far."""
        return "".join(
            str(event["delta"]) for _, event in self.events() if event["type"] == "text-delta"
        )

    # -- what the substrate does -----------------------------------------------------------

    def _out(self, now: float) -> int:
        if self._manual:
            return min(self._released, len(self._script))
        if self._step_delay_s <= 0:
            return len(self._script)
        elapsed = (now - self._started_at) / self._step_delay_s
        return min(len(self._script), math.floor(elapsed + _EPSILON) + 1)

    def _next_due(self, now: float) -> float | None:
        """When the next event comes out by the clock (``None``: never by itself)."""
        if self._stopped is not None or self._manual or self._step_delay_s <= 0:
            return None
        out = self._out(now)
        if out >= len(self._script):
            return None
        return self._started_at + out * self._step_delay_s

    def _stop(self, terminal: dict[str, Any]) -> bool:
        """End the run now with ``terminal``; ``False`` when it had ended already."""
        events = self.events()
        if events and events[-1][1]["type"] in _STATUS:
            return False
        self._stopped = [*events, (_event_id(len(events) + 1), terminal)]
        return True


class FakeSubstrate:
    """An in-process substrate for tests (see the module docstring).

    * ``tokens`` — text deltas per run, from ``reply(message, tokens)`` (default: the demo's
      deterministic fake model, so :meth:`expected_text` is known in advance).
    * ``step_delay_s`` / ``manual`` — pacing, see the module docstring.
    * ``kind`` — the handle kind of its adapters.
    * ``fail_prompt`` / ``fail_after`` — a run whose message is ``fail_prompt`` fails with
      code ``"fake_failure"`` after ``fail_after`` deltas.

    Handles are ``RunHandle(kind, run_id="fake-run-<n>", data={"executionId": …})``: the run
    id is not the execution id, so an adapter user that attaches by anything but the handle
    is caught.
    """

    def __init__(
        self,
        *,
        tokens: int = 5,
        step_delay_s: float = 0.0,
        manual: bool = False,
        reply: Callable[[str, int], Sequence[str]] | None = None,
        kind: str = "fake-substrate",
        fail_prompt: str = "please fail",
        fail_after: int = 2,
    ) -> None:
        if tokens < 0 or step_delay_s < 0 or fail_after < 0:
            raise ValueError("tokens, step_delay_s and fail_after must not be negative")
        self.tokens = tokens
        self.step_delay_s = step_delay_s
        self.manual = manual
        self.reply = reply if reply is not None else fake_reply
        self.kind = kind
        self.fail_prompt = fail_prompt
        self.fail_after = fail_after
        #: Runs started, in total (a start for a known execution id attaches instead).
        self.runs_started = 0
        #: Calls of ``start`` / ``attach`` / ``cancel`` on any of this substrate's adapters.
        self.start_calls = 0
        self.attach_calls = 0
        self.cancel_calls = 0
        #: Streams (start or attach) open right now; 0 once every consumer closed its stream.
        self.open_streams = 0
        self._runs: dict[str, FakeRun] = {}
        self._by_run_id: dict[str, FakeRun] = {}
        self._starts: dict[str, int] = {}
        self._cuts: deque[int] = deque()
        self._refusals = 0
        # Created lazily: an anyio.Event needs a running event loop.
        self._changed: anyio.Event | None = None

    # -- for tests -------------------------------------------------------------------------

    def adapter(self, *, kind: str | None = None) -> FakeSubstrateAdapter:
        """A new adapter for this substrate (one per simulated worker)."""
        return FakeSubstrateAdapter(self, kind=kind)

    def expected_text(self, message: str) -> str:
        """The final text of a completed run prompted with ``message``."""
        return "".join(self.reply(message, self.tokens))

    def starts(self, execution_id: str) -> int:
        """How many runs were started for ``execution_id``: 1 at most, by design."""
        return self._starts.get(execution_id, 0)

    def run(self, execution_id: str) -> FakeRun:
        """The run of ``execution_id`` (``KeyError`` if it never started)."""
        return self._runs[execution_id]

    def has_run(self, execution_id: str) -> bool:
        return execution_id in self._runs

    async def wait_for_run(self, execution_id: str) -> FakeRun:
        """Wait until ``execution_id`` has a run (bound it with ``anyio.fail_after``)."""
        while execution_id not in self._runs:
            await self._wait(None)
        return self._runs[execution_id]

    async def wait_for_events(self, execution_id: str, count: int) -> FakeRun:
        """Wait until the run of ``execution_id`` has put out at least ``count`` events
        (or ended with fewer). Bound it with ``anyio.fail_after``."""
        run = await self.wait_for_run(execution_id)
        while len(run.events()) < count and run.status == "running":
            await self._wait(run._next_due(anyio.current_time()))
        return run

    def advance(self, execution_id: str, events: int = 1) -> None:
        """Manual pacing: let the run put out ``events`` more events."""
        run = self._runs[execution_id]
        run._released += events
        self._notify()

    def release(self, execution_id: str) -> None:
        """Manual pacing: let the run put out everything, up to its terminal event."""
        run = self._runs[execution_id]
        run._released = len(run._script)
        self._notify()

    def cut_streams(self, after: int, *, times: int = 1) -> None:
        """The next ``times`` streams opened (start or attach) break after ``after`` events:
        they raise :class:`~turnstream.AdapterError`, as a dropped connection does."""
        self._cuts.extend([after] * times)

    def refuse_streams(self, times: int = 1) -> None:
        """The next ``times`` streams opened fail before their first event (a start that is
        refused starts no run), as an unreachable substrate does."""
        self._refusals += times

    def fail_run(
        self,
        execution_id: str,
        *,
        code: str = "injected_failure",
        message: str = "the fake substrate failed the run",
        retryable: bool = False,
    ) -> bool:
        """Make a running run fail now; ``False`` if it had ended already."""
        terminal = {
            "type": FAILED,
            "code": code,
            "message": message,
            "retryable": retryable,
        }
        stopped = self._runs[execution_id]._stop(terminal)
        self._notify()
        return stopped

    def cancel_run(self, execution_id: str) -> bool:
        """Cancel a running run from the substrate's side; ``False`` if it had ended."""
        stopped = self._runs[execution_id]._stop({"type": CANCELLED})
        self._notify()
        return stopped

    def forget(self, execution_id: str) -> None:
        """The substrate loses the run: attaching to it fails, a start begins a new run."""
        run = self._runs.pop(execution_id)
        del self._by_run_id[run.run_id]
        run.forgotten = True
        self._notify()

    # -- for the adapter -------------------------------------------------------------------

    def _open(self, request: StartRequest) -> FakeRun:
        run = self._runs.get(request.execution_id)
        if run is not None:
            return run
        message = request.input.get("message")
        message = message if isinstance(message, str) else ""
        deltas = list(self.reply(message, self.tokens))
        if message == self.fail_prompt:
            deltas = deltas[: self.fail_after]
        self.runs_started += 1
        run_id = f"fake-run-{self.runs_started}"
        script: list[Event] = [
            (
                _event_id(1),
                {"type": STARTED, "executionId": request.execution_id, "runId": run_id},
            )
        ]
        script += [
            (_event_id(i + 2), {"type": "text-delta", "delta": delta})
            for i, delta in enumerate(deltas)
        ]
        if message == self.fail_prompt:
            terminal: dict[str, Any] = {
                "type": FAILED,
                "code": "fake_failure",
                "message": "the prompt asked the run to fail",
                "retryable": False,
            }
        else:
            terminal = {"type": COMPLETED, "finalText": "".join(deltas)}
        script.append((_event_id(len(script) + 1), terminal))
        run = FakeRun(
            run_id=run_id,
            execution_id=request.execution_id,
            message=message,
            script=script,
            started_at=anyio.current_time(),
            step_delay_s=self.step_delay_s,
            manual=self.manual,
        )
        self._runs[request.execution_id] = run
        self._by_run_id[run_id] = run
        self._starts[request.execution_id] = self._starts.get(request.execution_id, 0) + 1
        self._notify()
        return run

    def _refuse(self) -> None:
        if self._refusals > 0:
            self._refusals -= 1
            raise AdapterError("the fake substrate refused the connection")

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait(self, due: float | None) -> None:
        """Until something changes, or the clock reaches ``due``."""
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        delay = None if due is None else max(due - anyio.current_time(), 0.0)
        with anyio.move_on_after(delay):
            await changed.wait()


class FakeSubstrateAdapter:
    """The :class:`~turnstream.ReconnectAdapter` of a :class:`FakeSubstrate` (no I/O).

    It maps substrate events like :class:`~turnstream.adapters.orchestrator.OrchestratorAdapter`
    does: ``text-delta`` verbatim, other events as ``{"type": "data-substrate", "data": …}``,
    ``execution.completed`` ends the iteration, ``execution.failed`` raises
    :class:`~turnstream.SubstrateFailed`, ``execution.cancelled`` raises
    :class:`~turnstream.SubstrateCancelled`.
    """

    def __init__(self, substrate: FakeSubstrate, *, kind: str | None = None) -> None:
        self.substrate = substrate
        self.kind = kind if kind is not None else substrate.kind

    async def aclose(self) -> None:
        """Nothing to release; here so the fake is used like a real adapter."""

    async def __aenter__(self) -> FakeSubstrateAdapter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        substrate = self.substrate
        substrate.start_calls += 1
        await anyio.lowlevel.checkpoint()
        substrate._refuse()
        run = substrate._open(request)
        handle = RunHandle(self.kind, run.run_id, {"executionId": run.execution_id})
        async for event in self._follow(run, 0, handle):
            yield event

    async def attach(
        self, handle: RunHandle, after_event_id: str | None
    ) -> AsyncIterator[SupervisedEvent]:
        substrate = self.substrate
        substrate.attach_calls += 1
        await anyio.lowlevel.checkpoint()
        if handle.kind != self.kind:
            raise AdapterError(f"a {handle.kind!r} handle given to the {self.kind!r} adapter")
        substrate._refuse()
        run = substrate._by_run_id.get(handle.run_id)
        if run is None:
            raise SubstrateFailed(
                f"the fake substrate has no run {handle.run_id!r}", code="substrate_run_not_found"
            )
        async for event in self._follow(run, _position(after_event_id), None):
            yield event

    def handle_for(self, request: StartRequest) -> RunHandle | None:
        """The handle of the run for ``request.execution_id``, if the substrate has one (it
        starts one run per execution id, so the id finds it without the handle)."""
        run = self.substrate._runs.get(request.execution_id)
        return None if run is None else RunHandle(self.kind, run.run_id)

    async def cancel(self, handle: RunHandle) -> None:
        substrate = self.substrate
        substrate.cancel_calls += 1
        await anyio.lowlevel.checkpoint()
        run = substrate._by_run_id.get(handle.run_id)
        if run is not None and run._stop({"type": CANCELLED}):
            substrate._notify()

    async def _follow(
        self, run: FakeRun, position: int, handle: RunHandle | None
    ) -> AsyncIterator[SupervisedEvent]:
        substrate = self.substrate
        substrate.open_streams += 1
        try:
            cut = substrate._cuts.popleft() if substrate._cuts else None
            sent = 0
            while True:
                # One checkpoint per event: a whole run that is out at once must not starve
                # the loop (an async generator's yield is no checkpoint).
                await anyio.lowlevel.checkpoint()
                if run.forgotten:
                    raise AdapterError(f"the fake substrate lost run {run.run_id!r}")
                events = run.events()
                if position >= len(events):
                    if run.status != "running":
                        # Only a cursor at or past the terminal event gets here, and no
                        # adapter ever yields a terminal event: the cursor is not this run's.
                        raise SubstrateFailed(
                            f"no event of run {run.run_id!r} after event {position}",
                            code="invalid_cursor",
                        )
                    await substrate._wait(run._next_due(anyio.current_time()))
                    continue
                event_id, event = events[position]
                position += 1
                kind = event["type"]
                if kind == COMPLETED:
                    return
                if kind == FAILED:
                    raise SubstrateFailed(
                        str(event["message"]), code=event["code"], retryable=event["retryable"]
                    )
                if kind == CANCELLED:
                    raise SubstrateCancelled(f"the fake substrate cancelled {run.run_id!r}")
                if cut is not None and sent >= cut:
                    raise AdapterError(f"the fake substrate cut the stream after {cut} events")
                yield SupervisedEvent(event_id, _payload(event), handle if sent == 0 else None)
                sent += 1
        finally:
            substrate.open_streams -= 1


def _position(after_event_id: str | None) -> int:
    """How many events of the run come before the first one to send."""
    if after_event_id is None:
        return 0
    prefix, _, number = after_event_id.partition("-")
    if prefix != "evt" or not number.isascii() or not number.isdigit():
        raise SubstrateFailed(
            f"{after_event_id!r} is not an event id of the fake substrate", code="invalid_cursor"
        )
    return int(number)


def _payload(event: Mapping[str, Any]) -> dict[str, Any]:
    if event["type"] == "text-delta":
        return {"type": "text-delta", "delta": event["delta"]}
    return {"type": "data-substrate", "data": dict(event)}
