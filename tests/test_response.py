from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Scope

from turnstream._events import LoggedEvent
from turnstream._framing import SSE_KEEPALIVE, frame_ndjson, frame_sse
from turnstream._response import TurnStreamResponse

KEEPALIVE = SSE_KEEPALIVE
END: Message = {"type": "http.response.body", "body": b"", "more_body": False}

BodyHook = Callable[[Message, "FakeServer"], Awaitable[None]]


def http_scope(method: str = "GET") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/turns/p:s:0/stream",
        "raw_path": b"/turns/p:s:0/stream",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("127.0.0.1", 50000),
    }


class FakeServer:
    """The server side of one ASGI HTTP connection, written by hand.

    ``receive`` hands out the (empty) request body once, then blocks until ``disconnect()``,
    as a real server does. ``send`` records every message; ``on_body`` runs before a body
    message is recorded and may block or raise like a real transport.
    """

    def __init__(self, on_body: BodyHook | None = None) -> None:
        self.messages: list[Message] = []
        self.disconnected = anyio.Event()
        self.on_body = on_body
        self.in_flight = 0
        self.max_in_flight = 0
        self._request_delivered = False

    def disconnect(self) -> None:
        self.disconnected.set()

    async def receive(self) -> Message:
        if not self._request_delivered:
            self._request_delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.on_body is not None and message["type"] == "http.response.body":
                await self.on_body(message, self)
            self.messages.append(message)
        finally:
            self.in_flight -= 1

    @property
    def start(self) -> Message:
        assert self.messages[0]["type"] == "http.response.start"
        return self.messages[0]

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.start["headers"]}

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def ended(self) -> bool:
        return bool(self.messages) and self.messages[-1] == END


class Probe:
    """An async generator body that records how far it was pulled and how it ended."""

    def __init__(self, chunks: list[bytes], *, hang_at: int | None = None) -> None:
        self.chunks = chunks
        self.hang_at = hang_at
        self.pulled: list[bytes] = []
        self.exit: type[BaseException] | None = None
        self.finalised = 0
        self.waiting = anyio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            for index, chunk in enumerate(self.chunks):
                if index == self.hang_at:
                    self.waiting.set()
                    await anyio.sleep_forever()
                self.pulled.append(chunk)
                yield chunk
        except BaseException as exc:
            self.exit = type(exc)
            raise
        finally:
            self.finalised += 1


class CloseCounter:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


class RecordingIterator:
    """A body that is an async iterator but not a generator; records ``aclose``."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.pulled = 0
        self.closed = 0

    def __aiter__(self) -> RecordingIterator:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        self.pulled += 1
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        self.closed += 1


def chunks(n: int) -> list[bytes]:
    return [b"%d\n" % i for i in range(1, n + 1)]


async def serve(response: Response, server: FakeServer, method: str = "GET") -> None:
    with anyio.fail_after(10):
        await response(http_scope(method), server.receive, server.send)


# --- the full body -------------------------------------------------------------------------


async def test_full_body_delivered_in_order() -> None:
    probe, on_close, server = Probe(chunks(3)), CloseCounter(), FakeServer()
    response = TurnStreamResponse(
        probe.body(), media_type="application/x-ndjson", on_close=on_close
    )
    await serve(response, server)
    assert server.messages == [
        server.start,
        {"type": "http.response.body", "body": b"1\n", "more_body": True},
        {"type": "http.response.body", "body": b"2\n", "more_body": True},
        {"type": "http.response.body", "body": b"3\n", "more_body": True},
        END,
    ]
    assert server.start["status"] == 200
    assert server.headers == {
        "content-type": "application/x-ndjson",
        "cache-control": "no-store",
        "x-accel-buffering": "no",
    }
    assert probe.pulled == chunks(3)
    assert (probe.exit, probe.finalised) == (None, 1)
    assert on_close.calls == 1


async def test_empty_body_and_empty_chunks() -> None:
    server = FakeServer()
    await serve(TurnStreamResponse(RecordingIterator([]), media_type="text/plain"), server)
    assert server.bodies == [b""]
    assert server.ended

    server = FakeServer()
    body = RecordingIterator([b"", b"a", b"", b"b"])
    await serve(TurnStreamResponse(body, media_type="text/plain"), server)
    # A zero-length chunk would end a chunked body early: it is never passed on.
    assert server.bodies == [b"a", b"b", b""]
    assert body.closed == 1


async def test_headers_status_and_overrides() -> None:
    server = FakeServer()
    response = TurnStreamResponse(
        RecordingIterator([b"x"]),
        status_code=201,
        headers={
            "X-Execution-Id": "p:s:0",
            "X-Turn-Mode": "fresh",
            "Cache-Control": "no-cache",
            "x-accel-buffering": "yes",
        },
        media_type="text/event-stream",
    )
    await serve(response, server)
    assert server.start["status"] == 201
    raw = [k for k, _ in server.start["headers"]]
    assert len(raw) == len(set(raw))  # nothing doubled by the defaults
    assert server.headers == {
        "x-execution-id": "p:s:0",
        "x-turn-mode": "fresh",
        "cache-control": "no-cache",
        "x-accel-buffering": "yes",
        "content-type": "text/event-stream; charset=utf-8",
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keepalive_interval": 0},
        {"keepalive_interval": -1.0},
        {"send_timeout": 0},
        {"keepalive": b""},
    ],
)
def test_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TurnStreamResponse(RecordingIterator([]), media_type="text/plain", **kwargs)


# --- the client leaves ---------------------------------------------------------------------


async def test_disconnect_while_the_body_waits_stops_it() -> None:
    probe, on_close, server = Probe(chunks(3), hang_at=2), CloseCounter(), FakeServer()
    response = TurnStreamResponse(probe.body(), media_type="text/plain", on_close=on_close)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(serve, response, server)
        with anyio.fail_after(5):
            await probe.waiting.wait()
        assert server.bodies == [b"1\n", b"2\n"]
        server.disconnect()
    assert probe.pulled == [b"1\n", b"2\n"]
    assert probe.exit is anyio.get_cancelled_exc_class()
    assert probe.finalised == 1
    assert not server.ended  # nothing is sent to a client that left
    assert on_close.calls == 1


async def test_disconnect_during_a_send_stops_the_body_at_once() -> None:
    # The body never blocks (a replay from memory): the disconnect listener must still get its
    # turn before the next chunk is pulled.
    async def disconnect_after_two(message: Message, server: FakeServer) -> None:
        if message["body"] == b"2\n":
            server.disconnect()

    probe, on_close = Probe(chunks(50)), CloseCounter()
    server = FakeServer(disconnect_after_two)
    response = TurnStreamResponse(probe.body(), media_type="text/plain", on_close=on_close)
    await serve(response, server)
    assert probe.pulled == [b"1\n", b"2\n"]
    assert server.bodies == [b"1\n", b"2\n"]
    assert probe.exit is GeneratorExit  # closed where it was suspended, at its yield
    assert probe.finalised == 1
    assert on_close.calls == 1


async def test_a_chunk_pulled_as_the_client_leaves_is_not_sent() -> None:
    # The body's next event and the disconnect arrive in the same loop iteration: the pump
    # pulls the chunk first, then yields (shielded) while taking the send lock, and only then
    # does the listener run. The chunk must still not be sent.
    next_event = anyio.Event()
    pulled: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"1\n"
        await next_event.wait()
        pulled.append(b"2\n")
        yield b"2\n"

    server, on_close = FakeServer(), CloseCounter()
    response = TurnStreamResponse(body(), media_type="text/plain", on_close=on_close)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(serve, response, server)
        while server.bodies != [b"1\n"]:
            await anyio.sleep(0.01)
        next_event.set()
        server.disconnect()
    assert pulled == [b"2\n"]
    assert server.bodies == [b"1\n"]
    assert on_close.calls == 1


class ClientDisconnected(OSError):
    """What uvicorn raises from ``send`` under ASGI spec 2.4."""


@pytest.mark.parametrize("error", [OSError, ClientDisconnected, BrokenPipeError])
async def test_send_raising_oserror_stops_the_body(error: type[OSError]) -> None:
    async def fail_on_two(message: Message, server: FakeServer) -> None:
        if message["body"] == b"2\n":
            raise error("connection lost")

    probe, on_close, server = Probe(chunks(50)), CloseCounter(), FakeServer(fail_on_two)
    response = TurnStreamResponse(probe.body(), media_type="text/plain", on_close=on_close)
    await serve(response, server)  # does not raise: the client leaving is not an error
    assert probe.pulled == [b"1\n", b"2\n"]
    assert server.bodies == [b"1\n"]
    assert probe.exit is GeneratorExit
    assert probe.finalised == 1
    assert on_close.calls == 1


async def test_send_raising_oserror_on_start_never_starts_the_body() -> None:
    async def fail(message: Message) -> None:
        raise OSError("gone")

    body, on_close = RecordingIterator(chunks(3)), CloseCounter()
    response = TurnStreamResponse(body, media_type="text/plain", on_close=on_close)
    await response(http_scope(), FakeServer().receive, fail)
    assert (body.pulled, body.closed, on_close.calls) == (0, 1, 1)


async def test_a_send_that_blocks_is_cut_after_send_timeout() -> None:
    async def stall_on_two(message: Message, server: FakeServer) -> None:
        if message["body"] == b"2\n":
            await anyio.sleep_forever()

    probe, on_close, server = Probe(chunks(50)), CloseCounter(), FakeServer(stall_on_two)
    response = TurnStreamResponse(
        probe.body(), media_type="text/plain", send_timeout=0.2, on_close=on_close
    )
    started = anyio.current_time()
    await serve(response, server)
    elapsed = anyio.current_time() - started
    assert 0.2 <= elapsed < 5
    assert probe.pulled == [b"1\n", b"2\n"]
    assert server.bodies == [b"1\n"]
    assert probe.exit is GeneratorExit
    assert probe.finalised == 1
    assert on_close.calls == 1


async def test_a_start_that_blocks_is_cut_after_send_timeout() -> None:
    async def stall(message: Message) -> None:
        await anyio.sleep_forever()

    body, on_close = RecordingIterator(chunks(3)), CloseCounter()
    response = TurnStreamResponse(
        body, media_type="text/plain", send_timeout=0.2, on_close=on_close
    )
    with anyio.fail_after(5):
        await response(http_scope(), FakeServer().receive, stall)
    assert (body.pulled, body.closed, on_close.calls) == (0, 1, 1)


async def test_server_cancellation_propagates_and_still_cleans_up() -> None:
    finished: list[str] = []

    async def slow_on_close() -> None:
        await anyio.sleep(0.05)  # would be cancelled at once without the shield
        finished.append("on_close")

    probe, server = Probe(chunks(3), hang_at=1), FakeServer()
    response = TurnStreamResponse(probe.body(), media_type="text/plain", on_close=slow_on_close)
    with anyio.move_on_after(0.2) as scope:
        await response(http_scope(), server.receive, server.send)
    assert scope.cancelled_caught  # the cancellation was not swallowed
    assert probe.exit is anyio.get_cancelled_exc_class()
    assert probe.finalised == 1
    assert finished == ["on_close"]


# --- keep-alive ----------------------------------------------------------------------------


async def test_keepalive_fills_idle_time_between_chunks() -> None:
    release = anyio.Event()

    async def count_keepalives(message: Message, server: FakeServer) -> None:
        if message["body"] == KEEPALIVE and server.bodies.count(KEEPALIVE) == 2:
            release.set()  # this is the third

    async def body() -> AsyncIterator[bytes]:
        yield b"a\n\n"
        await release.wait()
        yield b"b\n\n"

    server, on_close = FakeServer(count_keepalives), CloseCounter()
    response = TurnStreamResponse(
        body(),
        media_type="text/event-stream",
        keepalive=KEEPALIVE,
        keepalive_interval=0.05,
        on_close=on_close,
    )
    await serve(response, server)
    assert server.bodies == [b"a\n\n", KEEPALIVE, KEEPALIVE, KEEPALIVE, b"b\n\n", b""]
    assert all(m["more_body"] for m in server.body_messages[:-1])
    assert on_close.calls == 1


async def test_keepalive_never_overlaps_a_slow_chunk() -> None:
    async def slow_data(message: Message, server: FakeServer) -> None:
        if message["body"] not in (KEEPALIVE, b""):
            await anyio.sleep(0.2)

    server = FakeServer(slow_data)
    response = TurnStreamResponse(
        RecordingIterator([b"a\n\n", b"b\n\n", b"c\n\n"]),
        media_type="text/event-stream",
        keepalive=KEEPALIVE,
        keepalive_interval=0.05,
    )
    await serve(response, server)
    assert server.max_in_flight == 1
    # The ticker woke during every slow send, but a chunk had just gone out each time.
    assert server.bodies == [b"a\n\n", b"b\n\n", b"c\n\n", b""]


async def test_a_chunk_waits_for_a_keepalive_being_sent() -> None:
    keepalive_sending = anyio.Event()

    async def slow_keepalive(message: Message, server: FakeServer) -> None:
        if message["body"] == KEEPALIVE:
            keepalive_sending.set()
            await anyio.sleep(0.2)

    async def body() -> AsyncIterator[bytes]:
        yield b"a\n\n"
        await keepalive_sending.wait()
        yield b"b\n\n"

    server = FakeServer(slow_keepalive)
    response = TurnStreamResponse(
        body(), media_type="text/event-stream", keepalive=KEEPALIVE, keepalive_interval=0.05
    )
    await serve(response, server)
    assert server.max_in_flight == 1
    assert server.bodies == [b"a\n\n", KEEPALIVE, b"b\n\n", b""]


async def test_no_keepalive_unless_asked() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a\n"
        await anyio.sleep(0.3)
        yield b"b\n"

    server = FakeServer()
    response = TurnStreamResponse(
        body(), media_type="application/x-ndjson", keepalive_interval=0.05
    )
    await serve(response, server)
    assert server.bodies == [b"a\n", b"b\n", b""]


async def test_a_stuck_client_is_dropped_by_the_keepalive() -> None:
    async def stall_keepalive(message: Message, server: FakeServer) -> None:
        if message["body"] == KEEPALIVE:
            await anyio.sleep_forever()

    probe, on_close = Probe(chunks(3), hang_at=1), CloseCounter()
    server = FakeServer(stall_keepalive)
    response = TurnStreamResponse(
        probe.body(),
        media_type="text/event-stream",
        keepalive=KEEPALIVE,
        keepalive_interval=0.05,
        send_timeout=0.2,
        on_close=on_close,
    )
    await serve(response, server)
    assert server.bodies == [b"1\n"]
    assert probe.pulled == [b"1\n"]
    assert probe.exit is anyio.get_cancelled_exc_class()
    assert probe.finalised == 1
    assert on_close.calls == 1


# --- HEAD, failures, cleanup ---------------------------------------------------------------


async def test_head_sends_headers_only_and_never_starts_the_body() -> None:
    body, on_close, server = RecordingIterator(chunks(3)), CloseCounter(), FakeServer()
    response = TurnStreamResponse(body, media_type="application/x-ndjson", on_close=on_close)
    await serve(response, server, method="HEAD")
    assert server.start["status"] == 200
    assert server.messages[1:] == [END]
    assert (body.pulled, body.closed, on_close.calls) == (0, 1, 1)


async def test_a_failing_body_raises_the_bare_exception_while_the_client_is_there() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a\n"
        raise RuntimeError("reader bug")

    server, on_close = FakeServer(), CloseCounter()
    response = TurnStreamResponse(body(), media_type="text/plain", on_close=on_close)
    with pytest.raises(RuntimeError, match="reader bug"):
        await serve(response, server)
    # No clean end: the server aborts the connection and the client sees a broken body.
    assert server.bodies == [b"a\n"]
    assert on_close.calls == 1


async def test_a_body_failing_after_the_client_left_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    waiting = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a\n"
        try:
            waiting.set()
            await anyio.sleep_forever()
        finally:
            raise RuntimeError("cleanup bug")

    server, on_close = FakeServer(), CloseCounter()
    response = TurnStreamResponse(body(), media_type="text/plain", on_close=on_close)
    with caplog.at_level(logging.ERROR, logger="turnstream.response"):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(serve, response, server)
            await waiting.wait()
            server.disconnect()
    assert on_close.calls == 1
    assert any("after the client left" in record.message for record in caplog.records)


async def test_on_close_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def on_close() -> None:
        calls.append(1)
        raise RuntimeError("on_close bug")

    server = FakeServer()
    response = TurnStreamResponse(
        RecordingIterator([b"a"]), media_type="text/plain", on_close=on_close
    )
    with caplog.at_level(logging.ERROR, logger="turnstream.response"):
        await serve(response, server)
    assert server.ended
    assert calls == [1]
    assert any("on_close" in record.message for record in caplog.records)


async def test_cleanup_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def on_close() -> None:
        calls.append(1)
        await anyio.sleep_forever()

    response = TurnStreamResponse(
        RecordingIterator([b"a"]), media_type="text/plain", on_close=on_close
    )
    response.close_timeout = 0.1
    with caplog.at_level(logging.WARNING, logger="turnstream.response"):
        await serve(response, FakeServer())
    assert calls == [1]
    assert any("took over" in record.message for record in caplog.records)


async def test_closes_both_the_iterable_and_its_iterator() -> None:
    class Reader:
        def __init__(self) -> None:
            self.probe = Probe(chunks(5), hang_at=2)
            self.closed = 0

        def __aiter__(self) -> AsyncIterator[bytes]:
            return self.probe.body()

        async def aclose(self) -> None:
            self.closed += 1

    reader, server = Reader(), FakeServer()
    response = TurnStreamResponse(reader, media_type="text/plain")
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(serve, response, server)
        await reader.probe.waiting.wait()
        server.disconnect()
    assert reader.closed == 1
    assert reader.probe.finalised == 1


async def test_background_tasks_run_after_the_stream() -> None:
    order: list[str] = []

    async def on_close() -> None:
        order.append("on_close")

    async def background() -> None:
        order.append("background")

    response = TurnStreamResponse(
        RecordingIterator([b"a"]), media_type="text/plain", on_close=on_close
    )
    response.background = BackgroundTask(background)  # what FastAPI does with BackgroundTasks
    await serve(response, FakeServer())
    assert order == ["on_close", "background"]


# --- end to end ----------------------------------------------------------------------------


def event(seq: int, delta: str) -> LoggedEvent:
    data = orjson.dumps({"type": "text-delta", "delta": delta, "eventId": f"e{seq}"})
    return LoggedEvent(seq=seq, event_id=f"e{seq}", type="text-delta", data=data)


EVENTS = [event(1, "Hel"), event(2, "lo \u2713")]


async def test_end_to_end_through_starlette_and_httpx() -> None:
    closed: list[str] = []

    async def stream(request: Request) -> Response:
        sse = request.query_params.get("format") == "sse"
        frame = frame_sse if sse else frame_ndjson

        async def body() -> AsyncIterator[bytes]:
            for logged in EVENTS:
                yield frame(logged)

        async def on_close() -> None:
            closed.append(request.url.path)

        return TurnStreamResponse(
            body(),
            headers={"X-Execution-Id": "p:s:0", "X-Turn-Mode": "replayed"},
            media_type="text/event-stream" if sse else "application/x-ndjson",
            keepalive=SSE_KEEPALIVE if sse else None,
            on_close=on_close,
        )

    app = Starlette(routes=[Route("/turns/{execution_id}/stream", stream)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://test"
    ) as client:
        ndjson = await client.get("/turns/p:s:0/stream")
        sse = await client.get("/turns/p:s:0/stream", params={"format": "sse"})

    assert ndjson.status_code == 200
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    assert ndjson.headers["cache-control"] == "no-store"
    assert ndjson.headers["x-accel-buffering"] == "no"
    assert ndjson.headers["x-execution-id"] == "p:s:0"
    assert ndjson.headers["x-turn-mode"] == "replayed"
    assert ndjson.content == (
        b'{"seq":1,"type":"text-delta","delta":"Hel","eventId":"e1"}\n'
        + '{"seq":2,"type":"text-delta","delta":"lo \u2713","eventId":"e2"}\n'.encode()
    )
    assert [line["seq"] for line in map(orjson.loads, ndjson.content.splitlines())] == [1, 2]

    assert sse.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert sse.content == (
        b"id: 1\nevent: text-delta\n"
        b'data: {"seq":1,"type":"text-delta","delta":"Hel","eventId":"e1"}\n\n'
        + 'id: 2\nevent: text-delta\ndata: {"seq":2,"type":"text-delta","delta":"lo \u2713",'
        '"eventId":"e2"}\n\n'.encode()
    )
    assert closed == ["/turns/p:s:0/stream", "/turns/p:s:0/stream"]
