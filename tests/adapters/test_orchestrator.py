"""The reference substrate (DESIGN §8) under real uvicorn, and OrchestratorAdapter against it.

``httpx.ASGITransport`` buffers whole responses, so nothing here that streams runs in-process:
the substrate is a real ``python -m turnstream.adapters.orchestrator`` process on a free
loopback port, started once for the module and stopped by PID. Protocol faults the real
server never makes (a cut stream, a malformed event) come from ``httpx.MockTransport``.
Tests that need a real process are marked ``e2e``.
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse

from tests.e2e._server import ServerProcess, free_port, running
from turnstream import (
    AdapterError,
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from turnstream._demo import fake_reply
from turnstream.adapters.orchestrator import (
    FAIL_PROMPT,
    OrchestratorAdapter,
    create_substrate_app,
)
from turnstream.testing import AdapterConformance

TOKENS = 16
TOKEN_DELAY_MS = 15
STEP_S = 5.0  # bound on any one wait in these tests


def substrate_argv(*command: str) -> list[str]:
    return [
        sys.executable,
        *command,
        *f"--host 127.0.0.1 --port {{port}} --tokens {TOKENS}".split(),
        *f"--token-delay-ms {TOKEN_DELAY_MS} --log-level warning".split(),
    ]


@pytest.fixture(scope="module")
def substrate() -> Iterator[ServerProcess]:
    argv = substrate_argv("-m", "turnstream.adapters.orchestrator")
    with running("substrate", argv, health_path="/agents/runs") as server:
        yield server


@pytest.fixture
async def client(substrate: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=substrate.base_url, timeout=STEP_S) as client:
        yield client


def expected_text(message: str, tokens: int = TOKENS) -> str:
    return "".join(fake_reply(message, tokens))


def new_execution_id() -> str:
    return f"proj:session-{uuid.uuid4().hex}:0"


# -- the adapter, by the conformance kit ------------------------------------------------------


@pytest.mark.e2e
class TestOrchestratorAdapterConformance(AdapterConformance):
    @pytest.fixture
    async def adapter(self, substrate: ServerProcess) -> AsyncIterator[OrchestratorAdapter]:
        async with OrchestratorAdapter(substrate.base_url) as adapter:
            yield adapter

    @pytest.fixture
    def start_request(self) -> Callable[[], StartRequest]:
        return lambda: self.new_request("tell me about leases")

    def expected_text(self, request: StartRequest) -> str:
        return expected_text(request.input["message"])

    def make_fail_request(self, request: StartRequest) -> StartRequest:
        return dataclasses.replace(request, input={"message": FAIL_PROMPT})


# -- the substrate's protocol -----------------------------------------------------------------


Event = tuple[str, dict[str, Any]]


async def post_run(
    client: httpx.AsyncClient,
    execution_id: str | None,
    body: dict[str, Any] | None = None,
    *,
    last_event_id: str | None = None,
    limit: int | None = None,
) -> tuple[httpx.Response, list[Event]]:
    """POST /agents/run/stream and read its events (all, or the first ``limit``)."""
    headers = {}
    if execution_id is not None:
        headers["X-Execution-ID"] = execution_id
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[Event] = []
    with anyio.fail_after(STEP_S):
        async with aconnect_sse(
            client,
            "POST",
            "/agents/run/stream",
            json={"prompt": "hello"} if body is None else body,
            headers=headers,
        ) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                return source.response, events
            async for sse in source.aiter_sse():
                events.append((sse.id, orjson.loads(sse.data)))
                if limit is not None and len(events) >= limit:
                    break
    return source.response, events


async def describe(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    response = await client.get("/agents/runs", params={"executionId": execution_id})
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


async def wait_until_finished(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    with anyio.fail_after(STEP_S):
        while True:
            run = await describe(client, execution_id)
            if run["status"] not in (None, "running"):
                return run
            await anyio.sleep(0.02)


def types(events: list[Event]) -> list[str]:
    return [event["type"] for _, event in events]


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    if field is not None:
        assert problem["field"] == field


@pytest.mark.e2e
async def test_a_run_is_started_then_deltas_then_completed_with_consecutive_ids(
    client: httpx.AsyncClient,
) -> None:
    execution_id = new_execution_id()
    response, events = await post_run(
        client, execution_id, {"prompt": "hello", "session": "s-1", "options": {}}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-execution-id"] == execution_id
    assert response.headers["x-substrate-run"] == "started"
    assert response.headers["cache-control"] == "no-store"
    assert [event_id for event_id, _ in events] == [str(n) for n in range(1, TOKENS + 3)]
    assert types(events) == ["execution.started", *["text-delta"] * TOKENS, "execution.completed"]
    assert events[0][1] == {
        "type": "execution.started",
        "executionId": execution_id,
        "session": "s-1",
    }
    text = "".join(event["delta"] for _, event in events[1:-1])
    assert text == expected_text("hello") == events[-1][1]["finalText"]


@pytest.mark.e2e
async def test_the_wire_format_is_id_and_data_per_event(client: httpx.AsyncClient) -> None:
    execution_id = new_execution_id()
    await post_run(client, execution_id)
    headers = {"X-Execution-ID": execution_id, "Last-Event-ID": str(TOKENS + 1)}
    response = await client.post("/agents/run/stream", json={}, headers=headers)
    final = orjson.dumps(
        {
            "type": "execution.completed",
            "executionId": execution_id,
            "finalText": expected_text("hello"),
        }
    )
    assert response.content == b"id: %d\ndata: %s\n\n" % (TOKENS + 2, final)


@pytest.mark.e2e
async def test_a_known_execution_id_never_starts_a_second_run(
    client: httpx.AsyncClient,
) -> None:
    execution_id = new_execution_id()
    results: list[tuple[httpx.Response, list[Event]]] = []

    async def post(prompt: str) -> None:
        results.append(await post_run(client, execution_id, {"prompt": prompt}))

    # Concurrent first POSTs, and one more after the run ended with another prompt.
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(post, "hello")
    await post("something else entirely")
    modes = sorted(response.headers["x-substrate-run"] for response, _ in results)
    assert modes == ["attached", "attached", "attached", "started"]
    assert len({orjson.dumps(events) for _, events in results}) == 1  # all saw the same run
    assert results[-1][1][-1][1]["finalText"] == expected_text("hello")
    run = await describe(client, execution_id)
    assert run == {
        "executionId": execution_id,
        "started": 1,
        "status": "completed",
        "events": TOKENS + 2,
    }


@pytest.mark.e2e
async def test_last_event_id_replays_strictly_after_it(client: httpx.AsyncClient) -> None:
    execution_id = new_execution_id()
    _, everything = await post_run(client, execution_id)
    for cursor in (0, 1, 5, TOKENS + 1):
        _, events = await post_run(client, execution_id, {}, last_event_id=str(cursor))
        assert events == everything[cursor:]


@pytest.mark.e2e
async def test_attaching_live_with_last_event_id_continues_the_run(
    client: httpx.AsyncClient,
) -> None:
    execution_id = new_execution_id()
    _, head = await post_run(client, execution_id, limit=3)
    _, tail = await post_run(client, execution_id, {}, last_event_id=head[-1][0])
    ids = [event_id for event_id, _ in head + tail]
    assert ids == [str(n) for n in range(1, TOKENS + 3)]
    assert tail[-1][1]["finalText"] == expected_text("hello")


@pytest.mark.e2e
async def test_a_client_that_leaves_does_not_stop_the_run(client: httpx.AsyncClient) -> None:
    execution_id = new_execution_id()
    _, head = await post_run(client, execution_id, limit=1)  # then the connection is closed
    assert types(head) == ["execution.started"]
    run = await wait_until_finished(client, execution_id)
    assert run["status"] == "completed"
    assert run["events"] == TOKENS + 2
    _, events = await post_run(client, execution_id, {})
    assert events[-1][1]["finalText"] == expected_text("hello")
    assert (await describe(client, execution_id))["started"] == 1


@pytest.mark.e2e
async def test_cancel_stops_the_run_and_is_idempotent(client: httpx.AsyncClient) -> None:
    execution_id = new_execution_id()
    slow = {"prompt": "hello", "options": {"tokens": 50, "tokenDelayMs": 20}}
    _, head = await post_run(client, execution_id, slow, limit=2)
    for _ in range(2):
        response = await client.post(f"/agents/run/{execution_id}/cancel")
        assert response.status_code == 202
        assert response.json() == {"executionId": execution_id, "status": "cancelled"}
    _, events = await post_run(client, execution_id, {})
    assert events[: len(head)] == head
    assert types(events)[-1] == "execution.cancelled"
    assert types(events).count("text-delta") < 50
    assert [event_id for event_id, _ in events] == [str(n) for n in range(1, len(events) + 1)]
    # Nothing is appended after the terminal event, however long the run would have gone on.
    await anyio.sleep(0.1)
    _, again = await post_run(client, execution_id, {})
    assert again == events


@pytest.mark.e2e
async def test_cancel_after_completion_keeps_the_run_completed(
    client: httpx.AsyncClient,
) -> None:
    execution_id = new_execution_id()
    await post_run(client, execution_id)
    response = await client.post(f"/agents/run/{execution_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "completed"


@pytest.mark.e2e
async def test_cancel_of_an_unknown_run_is_a_404(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/agents/run/{new_execution_id()}/cancel")
    assert_problem(response, 404)


@pytest.mark.e2e
async def test_the_fail_prompt_makes_the_run_fail(client: httpx.AsyncClient) -> None:
    _, events = await post_run(client, new_execution_id(), {"prompt": FAIL_PROMPT})
    assert types(events) == ["execution.started", "text-delta", "text-delta", "execution.failed"]
    assert events[-1][1]["code"] == "requested_failure"


@pytest.mark.e2e
async def test_options_set_the_length_and_pace_of_one_run(client: httpx.AsyncClient) -> None:
    body = {"prompt": "short", "options": {"tokens": 2, "tokenDelayMs": 0}}
    _, events = await post_run(client, new_execution_id(), body)
    assert events[-1][1]["finalText"] == expected_text("short", tokens=2)


@pytest.mark.e2e
async def test_the_runs_summary_counts_starts(client: httpx.AsyncClient) -> None:
    before = (await client.get("/agents/runs")).json()
    execution_id = new_execution_id()
    await post_run(client, execution_id)
    await post_run(client, execution_id)
    after = (await client.get("/agents/runs")).json()
    assert after["total"] == before["total"] + 1
    assert after["runs"][execution_id] == {
        "started": 1,
        "status": "completed",
        "events": TOKENS + 2,
    }
    unknown = await describe(client, new_execution_id())
    assert (unknown["started"], unknown["status"], unknown["events"]) == (0, None, 0)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("headers", "body", "status", "field"),
    [
        ({}, {"prompt": "hello"}, 400, "X-Execution-ID"),
        ({"X-Execution-ID": ""}, {"prompt": "hello"}, 400, "X-Execution-ID"),
        ({"X-Execution-ID": "has space"}, {"prompt": "hello"}, 400, "X-Execution-ID"),
        ({"X-Execution-ID": "x" * 1025}, {"prompt": "hello"}, 400, "X-Execution-ID"),
        ({"X-Execution-ID": "ok", "Last-Event-ID": "-1"}, {"prompt": "x"}, 400, "Last-Event-ID"),
        ({"X-Execution-ID": "ok", "Last-Event-ID": "evt-3"}, {}, 400, "Last-Event-ID"),
        ({"X-Execution-ID": "new"}, {"prompt": 3}, 400, "prompt"),
        ({"X-Execution-ID": "new"}, {"prompt": ""}, 400, "prompt"),
        ({"X-Execution-ID": "new"}, {"prompt": "x", "options": []}, 400, "options"),
        ({"X-Execution-ID": "new"}, {"prompt": "x", "options": {"tokens": -1}}, 400, "tokens"),
        ({"X-Execution-ID": "new"}, ["not", "an", "object"], 400, "body"),
        ({"X-Execution-ID": "never-started"}, {}, 404, None),
    ],
)
async def test_bad_requests_are_problem_documents(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    body: Any,
    status: int,
    field: str | None,
) -> None:
    if headers.get("X-Execution-ID") in ("new", "never-started"):
        headers = {**headers, "X-Execution-ID": f"{headers['X-Execution-ID']}-{uuid.uuid4().hex}"}
    response = await client.post("/agents/run/stream", json=body, headers=headers)
    assert_problem(response, status, field)


@pytest.mark.e2e
async def test_a_body_that_is_not_json_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/agents/run/stream",
        content=b"{nope",
        headers={"X-Execution-ID": new_execution_id(), "Content-Type": "application/json"},
    )
    assert_problem(response, 400, "body")


# -- the adapter's side of the protocol -------------------------------------------------------


def start_request(message: str = "hello", **input: Any) -> StartRequest:
    return AdapterConformance.new_request(message, **input)


async def collect(stream: AsyncIterator[SupervisedEvent]) -> list[SupervisedEvent]:
    with anyio.fail_after(STEP_S):
        return [event async for event in stream]


@pytest.mark.e2e
async def test_the_adapter_maps_events_and_hands_out_its_handle(
    substrate: ServerProcess,
) -> None:
    request = start_request(options={"tokens": 3, "tokenDelayMs": 0})
    async with OrchestratorAdapter(substrate.base_url + "/", kind="sandbox") as adapter:
        events = await collect(adapter.start(request))
    assert events[0].handle == RunHandle(
        "sandbox", request.execution_id, {"baseUrl": substrate.base_url}
    )
    assert all(event.handle is None for event in events[1:])
    assert events[0].payload == {
        "type": "data-substrate",
        "data": {
            "type": "execution.started",
            "executionId": request.execution_id,
            "session": request.identity.session_id,
        },
    }
    assert [event.payload for event in events[1:]] == [
        {"type": "text-delta", "delta": delta} for delta in fake_reply("hello", 3)
    ]
    assert [event.event_id for event in events] == ["1", "2", "3", "4"]


@pytest.mark.e2e
async def test_the_adapter_reports_a_run_the_substrate_does_not_know(
    substrate: ServerProcess,
) -> None:
    async with OrchestratorAdapter(substrate.base_url) as adapter:
        handle = RunHandle(adapter.kind, new_execution_id())
        with pytest.raises(SubstrateFailed) as failed:
            await collect(adapter.attach(handle, None))
        assert failed.value.code == "substrate_run_not_found"
        await adapter.cancel(handle)  # nothing to stop: not an error
        with pytest.raises(AdapterError, match="handle"):
            await collect(adapter.attach(RunHandle("other-kind", handle.run_id), None))


@pytest.mark.e2e
async def test_a_start_at_the_wrong_address_is_a_refusal_not_a_lost_run(
    substrate: ServerProcess,
) -> None:
    async with OrchestratorAdapter(substrate.base_url + "/not-here") as adapter:
        with pytest.raises(SubstrateFailed) as failed:
            await collect(adapter.start(start_request()))
    assert failed.value.code == "substrate_rejected"


@pytest.mark.e2e
async def test_the_adapter_turns_a_bad_input_into_a_failed_run(
    substrate: ServerProcess,
) -> None:
    request = dataclasses.replace(start_request(), input={"text": "no message key"})
    async with OrchestratorAdapter(substrate.base_url) as adapter:
        with pytest.raises(SubstrateFailed) as failed:
            await collect(adapter.start(request))
    assert failed.value.code == "invalid_input"


async def test_an_unreachable_substrate_is_an_adapter_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with OrchestratorAdapter(url, timeout=2.0) as adapter:
        with pytest.raises(AdapterError) as broken:
            await collect(adapter.start(start_request()))
        assert not isinstance(broken.value, SubstrateFailed | SubstrateCancelled)
        with pytest.raises(AdapterError):
            await adapter.cancel(RunHandle(adapter.kind, "proj:s:0"))


@pytest.mark.e2e
async def test_the_adapter_leaves_a_shared_client_open(substrate: ServerProcess) -> None:
    async with httpx.AsyncClient() as shared:
        async with OrchestratorAdapter(substrate.base_url, client=shared) as adapter:
            await collect(adapter.start(start_request(options={"tokens": 1, "tokenDelayMs": 0})))
        assert not shared.is_closed
        response = await shared.get(substrate.base_url + "/agents/runs")
        assert response.status_code == 200


def test_the_adapter_wants_an_http_url() -> None:
    for url in ("ftp://example.test", "not a url", "http://"):
        with pytest.raises(ValueError):
            OrchestratorAdapter(url)


def mock_adapter(
    body: bytes, *, status: int = 200, content_type: str = "text/event-stream"
) -> OrchestratorAdapter:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OrchestratorAdapter("http://substrate.test", client=client)


STARTED = b'id: 1\ndata: {"type":"execution.started"}\n\n'
DELTA = b'id: 2\ndata: {"type":"text-delta","delta":"a"}\n\n'
SSE = "text/event-stream"
JSON = "application/problem+json"


@pytest.mark.parametrize(
    ("body", "status", "content_type", "error", "match"),
    [
        # The connection was cut (no terminal event): the pump re-attaches.
        (STARTED + DELTA, 200, SSE, AdapterError, "ended before its run did"),
        (b'data: {"type":"text-delta","delta":"a"}\n\n', 200, SSE, AdapterError, "without an id"),
        (b"id: 1\ndata: {nope\n\n", 200, SSE, AdapterError, "not JSON"),
        (b'id: 1\ndata: ["type"]\n\n', 200, SSE, AdapterError, "'type'"),
        (b"{}", 200, "application/json", AdapterError, "text/event-stream"),
        # Worth another try: the pump re-attaches.
        (b"{}", 503, JSON, AdapterError, "HTTP 503"),
        (b"{}", 429, JSON, AdapterError, "HTTP 429"),
        # A refusal: trying again would not help.
        (b'{"detail":"prompt is too long"}', 400, JSON, SubstrateFailed, "prompt is too long"),
        (b"not json", 409, "text/plain", SubstrateFailed, "HTTP 409"),
        (
            STARTED + b'id: 2\ndata: {"type":"execution.cancelled"}\n\n',
            200,
            SSE,
            SubstrateCancelled,
            "cancelled",
        ),
    ],
)
async def test_the_adapter_translates_protocol_faults(
    body: bytes, status: int, content_type: str, error: type[Exception], match: str
) -> None:
    async with mock_adapter(body, status=status, content_type=content_type) as adapter:
        with pytest.raises(error, match=match) as raised:
            await collect(adapter.start(start_request()))
    if error is AdapterError:  # and not one of its subclasses
        assert not isinstance(raised.value, SubstrateFailed | SubstrateCancelled)
    await adapter._client.aclose()


async def test_the_adapter_raises_the_substrates_failure_code() -> None:
    failed = orjson.dumps(
        {"type": "execution.failed", "code": "oom", "message": "out", "retryable": True}
    )
    async with mock_adapter(STARTED + b"id: 2\ndata: " + failed + b"\n\n") as adapter:
        with pytest.raises(SubstrateFailed, match="out") as raised:
            await collect(adapter.start(start_request()))
    assert (raised.value.code, raised.value.retryable) == ("oom", True)
    await adapter._client.aclose()


async def test_the_adapter_sends_the_protocol_headers_and_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        frames = STARTED + b'id: 2\ndata: {"type":"execution.completed"}\n\n'
        return httpx.Response(200, content=frames, headers={"content-type": "text/event-stream"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    adapter = OrchestratorAdapter(
        "http://substrate.test/base/", client=client, headers={"Authorization": "Bearer t"}
    )
    request = start_request("hi there", options={"model": "m"})
    await collect(adapter.start(request))
    handle = RunHandle(adapter.kind, "a%2Fb:c:0")
    await collect(adapter.attach(handle, "7"))
    await adapter.cancel(handle)
    await client.aclose()
    start, attach, cancel = seen
    assert start.url == "http://substrate.test/base/agents/run/stream"
    assert start.headers["x-execution-id"] == request.execution_id
    assert start.headers["authorization"] == "Bearer t"
    assert start.headers["accept"] == "text/event-stream"
    assert "last-event-id" not in start.headers
    assert orjson.loads(start.content) == {
        "prompt": "hi there",
        "session": request.identity.session_id,
        "options": {"model": "m"},
    }
    assert attach.headers["x-execution-id"] == "a%2Fb:c:0"
    assert attach.headers["last-event-id"] == "7"
    assert orjson.loads(attach.content) == {}  # no prompt: attach only, never a new run
    # The run id is one path segment, whatever it holds.
    assert cancel.url.raw_path == b"/base/agents/run/a%252Fb%3Ac%3A0/cancel"
    assert cancel.headers["authorization"] == "Bearer t"


# -- lifecycle ----------------------------------------------------------------------------------


async def test_leaving_the_lifespan_cancels_the_runs_still_going() -> None:
    app = create_substrate_app(tokens=1000, token_delay_ms=1000)
    substrate = app.state.substrate
    with anyio.fail_after(STEP_S):
        async with substrate:
            run, started = substrate.open("proj:s:0", {"prompt": "hello"})
            assert started
            await anyio.sleep(0.01)
        assert substrate.status("proj:s:0") == "running"  # abandoned, not completed
        assert len(run.frames) == 1


async def test_a_substrate_that_is_not_started_answers_503() -> None:
    app = create_substrate_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://substrate.test") as client:
        response = await client.post(
            "/agents/run/stream", json={"prompt": "hello"}, headers={"X-Execution-ID": "a:b:0"}
        )
    assert_problem(response, 503)
    assert response.headers["retry-after"] == "1"


@pytest.mark.e2e
def test_the_turnstream_substrate_command_serves_the_reference_substrate() -> None:
    argv = substrate_argv("-m", "turnstream", "substrate")
    with running("turnstream-substrate", argv, health_path="/agents/runs") as server:
        response = httpx.post(
            server.base_url + "/agents/run/stream",
            json={"prompt": "hello", "options": {"tokens": 2, "tokenDelayMs": 0}},
            headers={"X-Execution-ID": "p:s:0"},
            timeout=STEP_S,
        )
        assert response.status_code == 200
        assert b"execution.completed" in response.content


# -- the command line and the demo --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["substrate", "--port", "70000"],
        ["substrate", "--tokens", "-1"],
        ["substrate", "--token-delay-ms", "fast"],
        ["substrate", "--redis", "redis://127.0.0.1:1"],
        ["demo", "--substrate", "redis://127.0.0.1:1"],
        ["demo", "--substrate", "127.0.0.1:8100"],
    ],
)
def test_cli_refuses_bad_substrate_arguments(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from turnstream.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_serves_the_substrate_and_points_the_demo_at_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn
    from starlette.applications import Starlette

    from turnstream.__main__ import main

    configs: list[uvicorn.Config] = []

    class FakeServer:
        started = True

        def __init__(self, config: uvicorn.Config) -> None:
            configs.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    assert main(["substrate"]) == 0
    assert main("substrate --port 9100 --tokens 3 --token-delay-ms 0".split()) == 0
    assert main(["demo", "--substrate", "http://127.0.0.1:9100", "--lease-ms", "500"]) == 0
    default, custom, demo = configs
    assert (default.host, default.port) == ("127.0.0.1", 8100)
    assert custom.port == 9100
    assert isinstance(custom.app, Starlette)
    substrate = custom.app.state.substrate
    assert (substrate.tokens, substrate.token_delay_ms) == (3, 0)
    assert isinstance(demo.app, Starlette)
    assert isinstance(demo.app.state.adapter, OrchestratorAdapter)
    assert demo.app.state.adapter.base_url == "http://127.0.0.1:9100"
    assert demo.app.state.supervisor.lease_ms == 500


def test_the_demo_refuses_a_substrate_url_that_is_not_one() -> None:
    from turnstream._demo import create_demo_app

    with pytest.raises(ValueError, match="http"):
        create_demo_app(substrate_url="ftp://127.0.0.1:1")


@pytest.mark.e2e
def test_the_demo_runs_its_turns_on_the_substrate(substrate: ServerProcess) -> None:
    from tests.e2e._server import demo_argv

    argv = demo_argv("--substrate", substrate.base_url)
    with running("demo-on-substrate", argv) as demo:
        body = {"sessionId": f"s-{uuid.uuid4().hex}", "turnIndex": 0, "message": "hello"}
        execution_id = f"demo:{body['sessionId']}:0"
        first = httpx.post(demo.base_url + "/chat", json=body, timeout=STEP_S)
        again = httpx.post(demo.base_url + "/chat", json=body, timeout=STEP_S)
        runs = httpx.get(
            substrate.base_url + "/agents/runs", params={"executionId": execution_id}
        ).json()
    assert first.headers["x-turn-mode"] == "fresh"
    assert again.headers["x-turn-mode"] == "replayed"
    events = [orjson.loads(line) for line in first.content.splitlines()]
    assert events[-1]["type"] == "session.run.completed"
    # The substrate's --tokens, not the demo's, and its event ids behind the attempt.
    assert events[-1]["finalText"] == expected_text("hello")
    assert [e["eventId"] for e in events if e["type"] == "text-delta"] == [
        f"1/{n}" for n in range(2, TOKENS + 2)
    ]
    assert again.content == first.content
    assert runs["started"] == 1


# -- the pump driving the adapter ---------------------------------------------------------------


@pytest.mark.e2e
async def test_a_takeover_re_attaches_to_the_substrate_run_without_gap_or_duplicate(
    substrate: ServerProcess,
) -> None:
    from tests._helpers import collect as collect_body
    from tests._helpers import ndjson, text_of
    from turnstream import MemoryStore, RunKey, Supervisor, TurnIdentity, handle_chat_turn

    identity = TurnIdentity("t1", "proj", f"s-{uuid.uuid4().hex}", "u1", 0)
    key = RunKey("t1", identity.execution_id, "u1")
    # 30 tokens 20 ms apart: the run is still going when worker A stops renewing its lease.
    input = {"message": "hello", "options": {"tokens": 30, "tokenDelayMs": 20}}
    store = MemoryStore()
    async with (
        OrchestratorAdapter(substrate.base_url) as adapter_a,
        OrchestratorAdapter(substrate.base_url) as adapter_b,
        # Worker A never renews its lease: it is the SIGSTOPped / dead owner.
        Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as a,
        Supervisor(store, lease_ms=2000, adapters=[adapter_b]) as b,
    ):
        first = await handle_chat_turn(identity, input, supervisor=a, adapter=adapter_a)
        assert first.mode == "fresh"
        with anyio.fail_after(STEP_S):
            while (record := await store.get_run(key)) is None or record.last_seq < 5:
                await anyio.sleep(0.01)
        store.expire_lease(key)
        resumed = await handle_chat_turn(identity, input, supervisor=b, adapter=adapter_b)
        assert resumed.mode == "resumed"
        with anyio.fail_after(STEP_S):
            events = ndjson(await collect_body(resumed))
            while a.owns(key):
                await anyio.sleep(0.01)
        async with httpx.AsyncClient(base_url=substrate.base_url) as client:
            run = await describe(client, identity.execution_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["eventId"] for e in events}) == len(events)
    assert [e["type"] for e in events].count("session.run.completed") == 1
    assert "session.run.restarted" not in [e["type"] for e in events]
    assert text_of(events) == expected_text("hello", tokens=30) == events[-1]["finalText"]
    assert run["started"] == 1


@pytest.mark.e2e
def test_a_stopping_substrate_ends_its_streams_at_once() -> None:
    argv = substrate_argv("-m", "turnstream.adapters.orchestrator")
    server = ServerProcess("stopping-substrate", argv, health_path="/agents/runs")
    try:
        server.start()
        body = {"prompt": "hello", "options": {"tokens": 1000, "tokenDelayMs": 100}}
        headers = {"X-Execution-ID": new_execution_id()}
        with httpx.Client(base_url=server.base_url, timeout=STEP_S) as client:
            with client.stream("POST", "/agents/run/stream", json=body, headers=headers) as stream:
                lines = stream.iter_lines()
                assert next(lines) == "id: 1"
                assert server.process is not None
                server.process.terminate()
                # Without closing its streams the server would wait for the 100 s run.
                server.process.wait(timeout=3)
                rest = list(lines)  # the stream ends: to the client, a cut connection
        assert not any("execution.completed" in line for line in rest)
        assert "Traceback" not in server.log_tail(lines=10_000)
    finally:
        server.close()


async def test_closing_the_streams_ends_followers_and_refuses_new_runs() -> None:
    app = create_substrate_app(tokens=1000, token_delay_ms=1000)
    substrate = app.state.substrate
    with anyio.fail_after(STEP_S):
        async with substrate:
            run, _ = substrate.open("proj:s:0", {"prompt": "hello"})
            follower = run.follow(0)
            assert (await anext(follower)).startswith(b"id: 1\n")
            substrate.close_streams_threadsafe()  # as from uvicorn's signal handler
            with pytest.raises(StopAsyncIteration):
                await anext(follower)
            with pytest.raises(Exception, match="shutting down"):
                substrate.open("proj:s:1", {"prompt": "hello"})
