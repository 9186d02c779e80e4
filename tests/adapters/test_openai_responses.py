"""The OpenAI Responses background-mode adapter against a local fake of the API (real uvicorn)."""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import openai
import pytest

from tests._helpers import collect, ndjson, text_of
from tests.adapters._fake_openai import FakeModel, FakeOpenAI, serve
from turnstream import (
    AdapterError,
    MemoryStore,
    RunHandle,
    RunKey,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
    Supervisor,
    TurnIdentity,
    handle_chat_turn,
)
from turnstream.adapters.openai_responses import OpenAIResponsesAdapter
from turnstream.testing import AdapterConformance

IDENTITY = TurnIdentity("t1", "proj", "s1", "u1", 0)
KEY = RunKey("t1", "proj:s1:0", "u1")
MODEL = "gpt-test"
KIND = "openai-responses"


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def base_url(fake: FakeOpenAI) -> Iterator[str]:
    with serve(fake) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(api_key="test", base_url=base_url, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
def adapter(client: openai.AsyncOpenAI) -> OpenAIResponsesAdapter:
    return OpenAIResponsesAdapter(client, model=MODEL)


def request(message: str = "hi", **input: Any) -> StartRequest:
    return StartRequest(
        execution_id=KEY.execution_id, identity=IDENTITY, input={"message": message, **input}
    )


def reply(fake: FakeOpenAI, message: str = "hi") -> str:
    return "".join(fake.model.deltas(message))


def text(events: list[SupervisedEvent]) -> str:
    return "".join(e.payload["delta"] for e in events if e.payload["type"] == "text-delta")


def ids(events: list[SupervisedEvent]) -> list[int]:
    return [int(e.event_id) for e in events]


async def drain(stream: AsyncIterator[SupervisedEvent]) -> list[SupervisedEvent]:
    return [event async for event in stream]


async def take(
    stream: AsyncIterator[SupervisedEvent], deltas: int
) -> tuple[list[SupervisedEvent], RunHandle]:
    """Read until ``deltas`` text deltas arrived, then close the stream (a cut connection)."""
    seen: list[SupervisedEvent] = []
    handle: RunHandle | None = None
    async for event in stream:
        seen.append(event)
        handle = handle or event.handle
        if sum(e.payload["type"] == "text-delta" for e in seen) >= deltas:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert handle is not None
    return seen, handle


async def status_of(client: openai.AsyncOpenAI, response_id: str) -> str | None:
    return (await client.responses.retrieve(response_id)).status


async def wait_for_status(client: openai.AsyncOpenAI, response_id: str, status: str) -> None:
    with anyio.fail_after(5):
        while await status_of(client, response_id) != status:
            await anyio.sleep(0.01)


# -- start -----------------------------------------------------------------------------------


async def test_start_yields_the_handle_first_and_maps_deltas_to_text(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    events = await drain(adapter.start(request()))
    assert events[0].handle == RunHandle(KIND, "resp_0001", {"model": MODEL})
    assert events[0].event_id == "0"
    assert events[0].payload == {
        "type": "data-openai",
        "data": {"event": "response.created", "responseId": "resp_0001", "status": "queued"},
    }
    assert all(e.handle is None for e in events[1:])
    assert text(events) == reply(fake) == "Echo: hi. t0 t1 t2 t3 t4 t5"
    assert [e.payload["type"] for e in events] == ["data-openai"] * 2 + ["text-delta"] * 7
    assert not caplog.records  # the streamed text matched the response's output
    assert fake.created == 1


async def test_event_ids_are_the_sequence_numbers(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    events = await drain(adapter.start(request()))
    # created 0, in_progress 1, output_item.added 2, content_part.added 3 (skipped), deltas 4…
    assert ids(events) == [0, 1, *range(4, 11)]
    assert fake.responses["resp_0001"].status == "completed"


async def test_start_creates_one_background_streamed_response_tagged_with_the_turn(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    adapter = OpenAIResponsesAdapter(
        client,
        model=MODEL,
        instructions="Be brief.",
        temperature=0.2,
        metadata={"app": "demo"},
    )
    await drain(adapter.start(request()))
    body = fake.responses["resp_0001"].body
    assert body["background"] is True and body["stream"] is True
    assert body["model"] == MODEL and body["input"] == "hi"
    assert body["instructions"] == "Be brief." and body["temperature"] == 0.2
    assert body["metadata"] == {
        "app": "demo",
        "turnstream_execution_id": KEY.execution_id,
        "turnstream_attempt": "1",
    }
    assert fake.created == 1


async def test_a_messages_list_is_sent_as_the_input(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "again"},
    ]
    events = await drain(adapter.start(request(messages=messages)))
    assert fake.responses["resp_0001"].body["input"] == messages
    assert text(events) == reply(fake, "again")


@pytest.mark.parametrize(
    "turn_input",
    [{}, {"message": 3}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}],
)
async def test_a_turn_input_without_a_message_fails_before_calling_openai(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter, turn_input: dict[str, Any]
) -> None:
    start = StartRequest(execution_id=KEY.execution_id, identity=IDENTITY, input=turn_input)
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.start(start))
    assert caught.value.code == "invalid_input"
    assert fake.create_requests == 0


def test_the_adapter_sets_the_background_streaming_arguments_itself(
    client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(TypeError, match="stream"):
        OpenAIResponsesAdapter(client, model=MODEL, stream=False)
    with pytest.raises(TypeError, match="background"):
        OpenAIResponsesAdapter(client, model=MODEL, background=False)


async def test_create_is_never_retried(fake: FakeOpenAI, base_url: str) -> None:
    # The client would retry a 500 twice; a retry after a lost reply could start a second,
    # billed response, so the adapter sends create exactly once.
    fake.model = FakeModel(create_status=500)
    async with openai.AsyncOpenAI(api_key="test", base_url=base_url, max_retries=2) as client:
        with pytest.raises(AdapterError) as caught:
            await drain(OpenAIResponsesAdapter(client, model=MODEL).start(request()))
    assert not isinstance(caught.value, SubstrateFailed)  # a 5xx is transient
    assert fake.create_requests == 1


async def test_a_refused_create_is_substrate_rejected(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(create_status=400)
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.start(request()))
    assert caught.value.code == "substrate_rejected"


# -- attach ----------------------------------------------------------------------------------


async def test_attach_yields_only_events_after_the_cursor(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    first = await drain(adapter.start(request()))
    handle = first[0].handle
    assert handle is not None
    rest = await drain(adapter.attach(handle, "6"))
    assert ids(rest) == list(range(7, 11))
    assert rest == [e for e in first if int(e.event_id) > 6]
    assert fake.created == 1


async def test_attach_without_a_cursor_replays_the_whole_response(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    first = await drain(adapter.start(request()))
    handle = first[0].handle
    assert handle is not None
    again = await drain(adapter.attach(handle, None))
    assert ids(again) == ids(first)
    assert text(again) == reply(fake)
    assert all(e.handle is None for e in again)  # the handle is already persisted


async def test_a_cut_stream_resumes_after_the_last_seen_event_exactly_once(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=40, delay=0.01)
    seen, handle = await take(adapter.start(request()), deltas=3)
    assert fake.responses[handle.run_id].status == "in_progress"  # it went on without us
    rest = await drain(adapter.attach(handle, seen[-1].event_id))
    assert text(seen) + text(rest) == reply(fake)
    assert ids(seen + rest) == sorted(set(ids(seen + rest)))  # increasing, no duplicate
    assert fake.created == 1


async def test_attach_after_the_response_finished_replays_the_rest(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=10, delay=0.005)
    seen, handle = await take(adapter.start(request()), deltas=1)
    await wait_for_status(client, handle.run_id, "completed")
    rest = await drain(adapter.attach(handle, seen[-1].event_id))
    assert text(seen) + text(rest) == reply(fake)
    assert fake.created == 1


async def test_a_dropped_connection_is_transient_and_attach_resumes(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=10, delay=0.005, drop_after=7)
    seen: list[SupervisedEvent] = []
    with pytest.raises(AdapterError) as caught:
        async for event in adapter.start(request()):
            seen.append(event)
    assert not isinstance(caught.value, SubstrateFailed)  # the pump re-attaches on it
    handle = seen[0].handle
    assert handle is not None
    rest = await drain(adapter.attach(handle, seen[-1].event_id))
    assert text(seen) + text(rest) == reply(fake)
    assert fake.created == 1


async def test_attach_to_an_unknown_response_is_substrate_not_found(
    adapter: OpenAIResponsesAdapter,
) -> None:
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.attach(RunHandle(KIND, "resp_gone"), "3"))
    assert caught.value.code == "substrate_not_found"


async def test_attach_to_a_response_created_without_stream_is_rejected(
    client: openai.AsyncOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    created = await client.responses.create(model=MODEL, input="hi", background=True)
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.attach(RunHandle(KIND, created.id), None))
    assert caught.value.code == "substrate_rejected"


@pytest.mark.parametrize("cursor", ["abc", "-1", "07", ""])
async def test_a_cursor_that_is_no_sequence_number_fails(
    adapter: OpenAIResponsesAdapter, cursor: str
) -> None:
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.attach(RunHandle(KIND, "resp_0001"), cursor))
    assert caught.value.code == "invalid_cursor"


async def test_an_unreachable_api_is_a_transient_adapter_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    async with openai.AsyncOpenAI(api_key="test", base_url=url, max_retries=0) as client:
        adapter = OpenAIResponsesAdapter(client, model=MODEL)
        for stream in (adapter.start(request()), adapter.attach(RunHandle(KIND, "r"), "1")):
            with pytest.raises(AdapterError) as caught:
                await drain(stream)
            assert not isinstance(caught.value, SubstrateFailed)


# -- endings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_event", [True, False], ids=["cancelled-event", "stream-ends"])
async def test_cancel_ends_the_live_stream_cancelled(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter, cancel_event: bool
) -> None:
    fake.model = FakeModel(tokens=200, delay=0.01, cancel_event=cancel_event)
    seen: list[SupervisedEvent] = []
    with pytest.raises(SubstrateCancelled):
        async for event in adapter.start(request()):
            seen.append(event)
            if len(seen) == 4:
                assert seen[0].handle is not None
                await adapter.cancel(seen[0].handle)
    assert fake.responses["resp_0001"].status == "cancelled"
    assert 0 < len(text(seen)) < len(reply(fake))


async def test_attach_to_a_cancelled_response_raises_cancelled(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=200, delay=0.01, cancel_event=False)
    seen, handle = await take(adapter.start(request()), deltas=1)
    await adapter.cancel(handle)
    with pytest.raises(SubstrateCancelled):
        await drain(adapter.attach(handle, seen[-1].event_id))


async def test_cancel_is_idempotent_and_quiet_for_finished_or_unknown_responses(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=200, delay=0.01)
    _, running = await take(adapter.start(request()), deltas=1)
    await adapter.cancel(running)
    await adapter.cancel(running)  # cancelling twice returns the cancelled response again
    fake.model = FakeModel()
    finished = (await drain(adapter.start(request())))[0].handle
    assert finished is not None
    await adapter.cancel(finished)  # OpenAI answers 400: nothing left to stop
    await adapter.cancel(RunHandle(KIND, "resp_unknown"))  # 404: nothing to stop either
    assert fake.cancels == 4
    assert fake.responses[running.run_id].status == "cancelled"
    assert fake.responses[finished.run_id].status == "completed"


async def test_a_failed_response_raises_substrate_failed_after_its_text(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(fail_after=3)
    seen: list[SupervisedEvent] = []
    with pytest.raises(SubstrateFailed) as caught:
        async for event in adapter.start(request()):
            seen.append(event)
    assert caught.value.code == "server_error"
    assert caught.value.retryable
    assert str(caught.value) == "The model broke."
    assert text(seen) == "".join(fake.model.deltas("hi")[:3])


async def test_an_error_event_raises_substrate_failed(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(error_after=1)
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.start(request()))
    assert caught.value.code == "rate_limit_exceeded"
    assert str(caught.value) == "Slow down."


async def test_an_incomplete_response_fails_with_code_incomplete(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(incomplete_after=2)
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.start(request()))
    assert caught.value.code == "incomplete"
    assert "max_output_tokens" in str(caught.value)


async def test_a_failure_is_also_reported_to_a_late_attach(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(fail_after=4, delay=0.005)
    seen, handle = await take(adapter.start(request()), deltas=1)
    await wait_for_status(client, handle.run_id, "failed")
    with pytest.raises(SubstrateFailed) as caught:
        await drain(adapter.attach(handle, seen[-1].event_id))
    assert caught.value.code == "server_error"


async def test_a_final_text_that_differs_from_the_stream_is_reported(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    fake.model = FakeModel(output_text="something else")
    events = await drain(adapter.start(request()))
    assert text(events) == reply(fake)  # what was streamed stands
    assert "does not match its output" in caplog.text


async def test_forward_events_logs_chosen_events_as_data_openai(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    adapter = OpenAIResponsesAdapter(
        client, model=MODEL, forward_events={"response.output_text.done"}
    )
    events = await drain(adapter.start(request()))
    done = [e.payload for e in events if e.payload["type"] == "data-openai"][-1]
    assert done["data"]["event"] == "response.output_text.done"
    assert done["data"]["payload"]["text"] == reply(fake)


# -- through the supervisor ------------------------------------------------------------------


async def wait_for(predicate: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    with anyio.fail_after(limit):
        while not await predicate():
            await anyio.sleep(0.005)


async def test_a_turn_through_the_supervisor_creates_one_response(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    store = MemoryStore()
    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(
            IDENTITY, {"message": "hi"}, supervisor=sup, adapter=adapter
        )
        events = ndjson(await collect(result))
    assert text_of(events) == reply(fake) == events[-1]["finalText"]
    assert events[-1]["type"] == "session.run.completed"
    record = await store.get_run(KEY)
    assert record is not None
    assert record.handle == {"kind": KIND, "runId": "resp_0001", "data": {"model": MODEL}}
    assert fake.created == 1


async def test_a_dropped_stream_is_re_attached_by_the_pump(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=10, delay=0.005, drop_after=7)
    async with Supervisor(MemoryStore(), lease_ms=2000) as sup:
        result = await handle_chat_turn(
            IDENTITY, {"message": "hi"}, supervisor=sup, adapter=adapter
        )
        events = ndjson(await collect(result))
    assert text_of(events) == reply(fake) == events[-1]["finalText"]
    assert len({e["eventId"] for e in events}) == len(events)
    assert fake.created == 1


async def test_takeover_re_attaches_to_the_same_response(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.model = FakeModel(tokens=100, delay=0.01)  # still running when B takes over
    store = MemoryStore()
    adapter_a = OpenAIResponsesAdapter(client, model=MODEL)
    adapter_b = OpenAIResponsesAdapter(client, model=MODEL)

    async def some_text_logged() -> bool:
        run = await store.get_run(KEY)
        return run is not None and run.last_seq >= 5

    # Worker A never renews its lease: it is the dead owner.
    async with (
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as a,
        Supervisor(store, lease_ms=2000, adapters=[adapter_b]) as b,
    ):
        await handle_chat_turn(IDENTITY, {"message": "hi"}, supervisor=a, adapter=adapter_a)
        await wait_for(some_text_logged)
        store.expire_lease(KEY)
        resumed = await handle_chat_turn(
            IDENTITY, {"message": "hi"}, supervisor=b, adapter=adapter_b
        )
        assert resumed.mode == "resumed"
        events = ndjson(await collect(resumed))
    assert text_of(events) == reply(fake) == events[-1]["finalText"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["eventId"] for e in events}) == len(events)
    assert fake.created == 1


async def test_cancel_through_the_supervisor_cancels_the_response(
    fake: FakeOpenAI, adapter: OpenAIResponsesAdapter
) -> None:
    fake.model = FakeModel(tokens=200, delay=0.01)
    store = MemoryStore()

    async def some_text_logged() -> bool:
        run = await store.get_run(KEY)
        return run is not None and run.last_seq >= 5

    async with Supervisor(store, lease_ms=2000) as sup:
        result = await handle_chat_turn(
            IDENTITY, {"message": "hi"}, supervisor=sup, adapter=adapter
        )
        await wait_for(some_text_logged)
        assert await sup.cancel(KEY)
        events = ndjson(await collect(result))
    assert events[-1]["type"] == "session.run.cancelled"
    assert events[-1]["finalText"] == text_of(events)
    assert fake.responses["resp_0001"].status == "cancelled"
    assert fake.created == 1


# -- the adapter conformance kit -------------------------------------------------------------


class TestOpenAIResponsesConformance(AdapterConformance):
    """The suite every reconnect adapter passes, against the fake API under real uvicorn."""

    MODEL = FakeModel(tokens=20, delay=0.01)  # paced: a cancel right after the handle lands

    @pytest.fixture
    def fake(self) -> FakeOpenAI:
        return FakeOpenAI(self.MODEL)

    @pytest.fixture
    def adapter(self, client: openai.AsyncOpenAI) -> OpenAIResponsesAdapter:
        return OpenAIResponsesAdapter(client, model=MODEL)

    @pytest.fixture
    def start_request(self) -> Callable[[], StartRequest]:
        return lambda: self.new_request("tell me about leases")

    def expected_text(self, request: StartRequest) -> str:
        return "".join(self.MODEL.deltas(request.input["message"]))

    def make_fail_request(self, request: StartRequest) -> StartRequest | None:
        return dataclasses.replace(request, input={"message": self.MODEL.fail_prompt})
