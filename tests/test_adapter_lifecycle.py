"""The adapter's optional methods: ``handle_for`` (a cancel before the handle still reaches the
substrate) and ``aclose`` (the supervisor closes its adapters when it stops)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from tests._helpers import collect, ndjson
from turnstream import (
    MemoryStore,
    RunHandle,
    RunKey,
    StartRequest,
    SupervisedEvent,
    Supervisor,
    TurnIdentity,
    handle_chat_turn,
)
from turnstream.adapters.orchestrator import OrchestratorAdapter
from turnstream.testing import FakeSubstrate, FakeSubstrateAdapter

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", IDENTITY.execution_id, "u1")


class HandleLater:
    """Starts the substrate run at once but yields its first event (the one carrying the
    handle) only when the test opens the gate: a substrate slow to say which run it made."""

    def __init__(self, inner: FakeSubstrateAdapter) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.gate = anyio.Event()

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        stream = self.inner.start(request)
        first = await anext(stream)
        await self.gate.wait()
        yield first
        async for event in stream:
            yield event

    def attach(self, handle: RunHandle, after: str | None) -> AsyncIterator[SupervisedEvent]:
        return self.inner.attach(handle, after)

    async def cancel(self, handle: RunHandle) -> None:
        await self.inner.cancel(handle)


class HandleLaterNamingRuns(HandleLater):
    def handle_for(self, request: StartRequest) -> RunHandle | None:
        return self.inner.handle_for(request)


async def cancel_before_the_handle(adapter: HandleLater, substrate: FakeSubstrate) -> list[str]:
    async with Supervisor(MemoryStore(), lease_ms=300) as supervisor:
        result = await handle_chat_turn(
            IDENTITY, {"message": "hello"}, supervisor=supervisor, adapter=adapter
        )
        with anyio.fail_after(5):
            await substrate.wait_for_run(IDENTITY.execution_id)
            assert await supervisor.cancel(KEY)
            events = ndjson(await collect(result))
    return [event["type"] for event in events]


async def test_a_cancel_before_the_handle_reaches_the_substrate() -> None:
    substrate = FakeSubstrate(tokens=4, manual=True)
    types = await cancel_before_the_handle(HandleLaterNamingRuns(substrate.adapter()), substrate)
    assert types == ["session.run.started", "session.run.cancelled"]
    assert substrate.cancel_calls == 1
    assert substrate.run(IDENTITY.execution_id).status == "cancelled"


async def test_without_handle_for_the_substrate_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    substrate = FakeSubstrate(tokens=4, manual=True)
    with caplog.at_level(logging.INFO, logger="turnstream.pump"):
        types = await cancel_before_the_handle(HandleLater(substrate.adapter()), substrate)
    assert types == ["session.run.started", "session.run.cancelled"]  # the turn ends anyway
    assert substrate.cancel_calls == 0
    assert substrate.run(IDENTITY.execution_id).status == "running"  # what it cannot help
    assert any("before its substrate run had a handle" in r.getMessage() for r in caplog.records)


class Closing:
    def __init__(self, kind: str, *, fail: bool = False) -> None:
        self.kind = kind
        self.fail = fail
        self.closed = 0

    def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        raise NotImplementedError

    def attach(self, handle: RunHandle, after: str | None) -> AsyncIterator[SupervisedEvent]:
        raise NotImplementedError

    async def cancel(self, handle: RunHandle) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closed += 1
        if self.fail:
            raise RuntimeError("the client was already gone")


async def test_the_supervisor_closes_its_adapters_when_it_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing, fine = Closing("a", fail=True), Closing("b")
    async with Supervisor(MemoryStore(), adapters=[failing, fine]):
        assert (failing.closed, fine.closed) == (0, 0)
    assert (failing.closed, fine.closed) == (1, 1)  # one failing does not skip the others
    assert any("closing the a adapter failed" in r.getMessage() for r in caplog.records)


def test_the_orchestrator_adapter_knows_its_handle_up_front() -> None:
    adapter = OrchestratorAdapter("http://127.0.0.1:1")
    request = StartRequest(execution_id=IDENTITY.execution_id, identity=IDENTITY, input={})
    assert adapter.handle_for(request) == RunHandle(
        "orchestrator", IDENTITY.execution_id, {"baseUrl": "http://127.0.0.1:1"}
    )
