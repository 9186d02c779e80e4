"""The fake substrate: it passes the adapter conformance suite, and its knobs do what they say."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import anyio
import pytest

from turnstream import AdapterError, RunHandle, StartRequest, SubstrateFailed
from turnstream.testing import AdapterConformance, FakeSubstrate, FakeSubstrateAdapter

TOKENS = 8


class TestFakeSubstrateConformance(AdapterConformance):
    @pytest.fixture
    def substrate(self) -> FakeSubstrate:
        # 8 tokens 15 ms apart: slow enough that a cancel right after the first event lands
        # mid-run, fast enough for the whole suite to take a few seconds.
        return FakeSubstrate(tokens=TOKENS, step_delay_s=0.015)

    @pytest.fixture
    def adapter(self, substrate: FakeSubstrate) -> FakeSubstrateAdapter:
        return substrate.adapter()

    @pytest.fixture
    def start_request(self) -> Callable[[], StartRequest]:
        return lambda: self.new_request("tell me about leases")

    def expected_text(self, request: StartRequest) -> str:
        return FakeSubstrate(tokens=TOKENS).expected_text(request.input["message"])

    def make_fail_request(self, request: StartRequest) -> StartRequest:
        return dataclasses.replace(request, input={"message": "please fail"})


def new_request(message: str = "hello") -> StartRequest:
    return AdapterConformance.new_request(message)


async def drain(stream: object) -> list[str]:
    ids: list[str] = []
    with anyio.fail_after(5):
        async for event in stream:  # type: ignore[attr-defined]
            ids.append(event.event_id)
    return ids


async def test_a_second_start_attaches_instead_of_starting_a_run() -> None:
    substrate = FakeSubstrate(tokens=3)
    worker_a, worker_b = substrate.adapter(), substrate.adapter()
    request = new_request()
    first = await drain(worker_a.start(request))
    second = await drain(worker_b.start(request))
    assert first == second == ["evt-1", "evt-2", "evt-3", "evt-4"]
    assert substrate.runs_started == 1
    assert substrate.starts(request.execution_id) == 1
    assert substrate.start_calls == 2
    assert substrate.open_streams == 0
    run = substrate.run(request.execution_id)
    assert run.status == "completed"
    assert run.text == substrate.expected_text("hello")
    assert run.run_id != request.execution_id  # adapters must attach by the handle


async def test_manual_pacing_puts_out_only_what_the_test_releases() -> None:
    substrate = FakeSubstrate(tokens=3, manual=True)
    adapter = substrate.adapter()
    request = new_request()
    stream = adapter.start(request)
    with anyio.fail_after(5):
        first = await anext(stream)
        assert isinstance(first.handle, RunHandle)
        run = substrate.run(request.execution_id)
        assert [event_id for event_id, _ in run.events()] == ["evt-1"]
        with anyio.move_on_after(0.05) as waited:
            await anext(stream)
        assert waited.cancelled_caught  # nothing more until the test says so
        await stream.aclose()  # type: ignore[attr-defined]

        substrate.advance(request.execution_id, 2)
        assert run.text == "".join(substrate.reply("hello", 3)[:2])
        assert run.status == "running"
        substrate.release(request.execution_id)
        await substrate.wait_for_events(request.execution_id, 5)
        assert run.status == "completed"


async def test_clock_pacing_runs_on_without_anyone_attached() -> None:
    substrate = FakeSubstrate(tokens=4, step_delay_s=0.01)
    adapter = substrate.adapter()
    request = new_request()
    stream = adapter.start(request)
    with anyio.fail_after(5):
        event = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        assert event.handle is not None
        run = await substrate.wait_for_events(request.execution_id, 6)
    assert run.status == "completed"
    assert substrate.open_streams == 0


async def test_cut_streams_break_after_k_events_and_a_re_attach_resumes() -> None:
    substrate = FakeSubstrate(tokens=4)
    adapter = substrate.adapter()
    request = new_request()
    substrate.cut_streams(after=2)
    seen: list[str] = []
    handle: RunHandle | None = None
    with pytest.raises(AdapterError, match="cut"):
        with anyio.fail_after(5):
            async for event in adapter.start(request):
                seen.append(event.event_id)
                handle = handle or event.handle
    assert seen == ["evt-1", "evt-2"]
    assert handle is not None
    rest = await drain(adapter.attach(handle, seen[-1]))
    assert rest == ["evt-3", "evt-4", "evt-5"]
    assert substrate.open_streams == 0


async def test_refused_streams_start_no_run() -> None:
    substrate = FakeSubstrate()
    adapter = substrate.adapter()
    request = new_request()
    substrate.refuse_streams()
    with pytest.raises(AdapterError, match="refused"):
        await drain(adapter.start(request))
    assert substrate.runs_started == 0
    assert not substrate.has_run(request.execution_id)
    assert len(await drain(adapter.start(request))) == substrate.tokens + 1


async def test_fail_run_and_forget() -> None:
    substrate = FakeSubstrate(tokens=3, manual=True)
    adapter = substrate.adapter()
    request = new_request()
    stream = adapter.start(request)
    with anyio.fail_after(5):
        handle = (await anext(stream)).handle
    await stream.aclose()  # type: ignore[attr-defined]
    assert handle is not None
    assert substrate.fail_run(request.execution_id, code="sandbox_crashed", retryable=True)
    assert not substrate.fail_run(request.execution_id)  # ended already
    with pytest.raises(SubstrateFailed) as failed:
        await drain(adapter.attach(handle, None))
    assert (failed.value.code, failed.value.retryable) == ("sandbox_crashed", True)

    substrate.forget(request.execution_id)
    with pytest.raises(SubstrateFailed) as lost:
        await drain(adapter.attach(handle, None))
    assert lost.value.code == "substrate_run_not_found"


async def test_cancel_from_the_substrate_side_and_bad_cursors() -> None:
    substrate = FakeSubstrate(tokens=3, manual=True)
    adapter = substrate.adapter()
    request = new_request()
    stream = adapter.start(request)
    with anyio.fail_after(5):
        handle = (await anext(stream)).handle
    await stream.aclose()  # type: ignore[attr-defined]
    assert handle is not None
    assert substrate.cancel_run(request.execution_id)
    assert substrate.run(request.execution_id).status == "cancelled"
    with pytest.raises(SubstrateFailed) as bad:
        await drain(adapter.attach(handle, "not-an-id"))
    assert bad.value.code == "invalid_cursor"
    with pytest.raises(AdapterError, match="handle"):
        await drain(adapter.attach(RunHandle("other", handle.run_id), None))


async def test_the_pump_re_attaches_across_cut_streams() -> None:
    from tests._helpers import collect, ndjson, text_of
    from turnstream import MemoryStore, Supervisor, TurnIdentity, handle_chat_turn

    substrate = FakeSubstrate(tokens=6, step_delay_s=0.002)
    adapter = substrate.adapter()
    substrate.cut_streams(after=2, times=2)  # the start stream and the first re-attach
    identity = TurnIdentity("t1", "proj", "s1", "u1", 0)
    async with Supervisor(MemoryStore(), adapters=[adapter]) as supervisor:
        result = await handle_chat_turn(
            identity, {"message": "hello"}, supervisor=supervisor, adapter=adapter
        )
        with anyio.fail_after(5):
            events = ndjson(await collect(result))
    assert text_of(events) == substrate.expected_text("hello") == events[-1]["finalText"]
    assert len({e["eventId"] for e in events}) == len(events)
    assert substrate.runs_started == 1
    assert substrate.attach_calls == 2
    assert substrate.open_streams == 0
