"""A step-driven substrate for pump tests: the test decides when each event happens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from turnstream import (
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)


@dataclass
class SteppedRun:
    run_id: str
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    state: str = "running"  # running | completed | failed | cancelled
    changed: anyio.Event = field(default_factory=anyio.Event)
    break_after: int | None = None  # cut the next stream after this many events

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def say(self, *words: str) -> None:
        for word in words:
            self.events.append((f"e{len(self.events) + 1}", {"type": "text-delta", "delta": word}))
        self._wake()

    def end(self, state: str = "completed") -> None:
        self.state = state
        self._wake()

    @property
    def text(self) -> str:
        return "".join(str(p["delta"]) for _, p in self.events if p["type"] == "text-delta")


class SteppedSubstrate:
    def __init__(self) -> None:
        self.runs: dict[str, SteppedRun] = {}
        self.starts = 0
        self.attaches: list[str | None] = []
        self.cancels = 0


class SteppedAdapter:
    kind = "stepped"

    def __init__(self, substrate: SteppedSubstrate) -> None:
        self.substrate = substrate

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        run = self.substrate.runs.get(request.execution_id)
        if run is None:  # like DESIGN §8: a known execution id never starts a second run
            run = self.substrate.runs[request.execution_id] = SteppedRun(request.execution_id)
            self.substrate.starts += 1
        handle = RunHandle(self.kind, run.run_id)
        yield SupervisedEvent("e0", {"type": "data-substrate", "event": "started"}, handle)
        async for event in self._follow(run, None):
            yield event

    async def attach(
        self, handle: RunHandle, after_event_id: str | None
    ) -> AsyncIterator[SupervisedEvent]:
        self.substrate.attaches.append(after_event_id)
        async for event in self._follow(self.substrate.runs[handle.run_id], after_event_id):
            yield event

    async def cancel(self, handle: RunHandle) -> None:
        self.substrate.cancels += 1
        run = self.substrate.runs[handle.run_id]
        if run.state == "running":
            run.end("cancelled")

    async def _follow(
        self, run: SteppedRun, after: str | None
    ) -> AsyncIterator[SupervisedEvent]:
        index = 0 if after in (None, "e0") else int(after[1:])
        sent = 0
        while True:
            while index < len(run.events):
                if run.break_after is not None and sent >= run.break_after:
                    run.break_after = None
                    raise ConnectionResetError("the substrate connection broke")
                event_id, payload = run.events[index]
                index += 1
                sent += 1
                yield SupervisedEvent(event_id, payload)
            if run.state == "completed":
                return
            if run.state == "failed":
                raise SubstrateFailed("the sandbox crashed", code="sandbox_crashed")
            if run.state == "cancelled":
                raise SubstrateCancelled("cancelled by the substrate")
            await run.changed.wait()
