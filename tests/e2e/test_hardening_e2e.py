"""Hardening on real uvicorn (h11 and httptools): clients that leave, clients that stop
reading, clients that trickle their body, junk cursors and the size limits (DESIGN §3
invariant 9, §5).

The server is the demo with test-chosen limits and a gauge of open readers
(``tests/e2e/_hardening_app.py``).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock
from urllib.parse import quote

import httpx
import orjson
import pytest

from turnstream._demo import fake_reply

from ._server import ServerProcess

pytestmark = pytest.mark.e2e

SEND_TIMEOUT_S = 1.0
# Long enough turns (about 2 s) that a reader which stops because its client left is seen
# stopping well before the turn ends.
TOKENS = 1500
TOKEN_DELAY_MS = 1
LONG_TOKENS = 5000
BODY_TIMEOUT_S = 0.5
HTTP_IMPLEMENTATIONS = ["h11", "httptools"]


@contextmanager
def hardening_server(http: str, **env: str) -> Iterator[ServerProcess]:
    argv = [sys.executable, "-m", "tests.e2e._hardening_app", "--port", "{port}", "--http", http]
    server = ServerProcess(f"hardening-{http}", argv)
    try:
        with mock.patch.dict(os.environ, env):
            server.start()
        yield server
        server.stop()
        log = server.log_tail(lines=10_000)
        assert "Traceback" not in log, f"the server logged an exception:\n{log}"
    finally:
        server.close()


@pytest.fixture(scope="module", params=HTTP_IMPLEMENTATIONS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with hardening_server(
        request.param,
        TS_TOKENS=str(TOKENS),
        TS_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS),
        TS_SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
        TS_MAX_EVENTS="100000",
    ) as running_server:
        yield running_server


@pytest.fixture(scope="module", params=HTTP_IMPLEMENTATIONS)
def long_turn_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    # Turns of several seconds: a stalled client is seen dropped (after filling the buffers,
    # then SEND_TIMEOUT_S) long before its turn ends, even on a loaded machine.
    with hardening_server(
        request.param,
        TS_TOKENS=str(LONG_TOKENS),
        TS_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS),
        TS_SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
        TS_MAX_EVENTS="100000",
    ) as running_server:
        yield running_server


@pytest.fixture(scope="module", params=HTTP_IMPLEMENTATIONS)
def deadline_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with hardening_server(
        request.param,
        TS_TOKENS="3",
        TS_TOKEN_DELAY_MS="0",
        TS_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    ) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def limited_server() -> Iterator[ServerProcess]:
    with hardening_server(
        "httptools",
        TS_TOKENS="20",
        TS_TOKEN_DELAY_MS="0",
        TS_MAX_BODY_BYTES="2048",
        TS_MAX_MESSAGE_CHARS="100",
        TS_MAX_EVENTS="10",
    ) as running_server:
        yield running_server


_session_counter = iter(range(1_000_000))


def new_session() -> str:
    return f"h{os.getpid()}-{time.monotonic_ns()}-{next(_session_counter)}"


def chat_body(session: str, message: str = "hold on to this one") -> dict[str, Any]:
    return {"sessionId": session, "turnIndex": 0, "message": message}


def turn_url(execution_id: str, tail: str = "") -> str:
    return "/turns/" + quote(execution_id, safe="") + tail


def readers(client: httpx.Client) -> dict[str, int]:
    gauge: dict[str, int] = client.get("/debug/readers").json()
    return gauge


def status(client: httpx.Client, execution_id: str) -> dict[str, Any]:
    response = client.get(turn_url(execution_id))
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def assert_completes(
    client: httpx.Client, execution_id: str, message: str, tokens: int = TOKENS
) -> None:
    wait_for(lambda: status(client, execution_id)["status"] != "running", 30, "turn ends")
    final = status(client, execution_id)
    assert final["status"] == "completed"
    assert final["finalText"] == "".join(fake_reply(message, tokens))
    calls = client.get("/debug/producer-calls", params={"executionId": execution_id}).json()
    assert calls["calls"] == 1


# -- (a) a client that leaves ---------------------------------------------------------------


def test_uvicorn_send_after_disconnect_returns_silently(server: ServerProcess) -> None:
    # What TurnStreamResponse relies on: this uvicorn does not raise from `send` once the
    # client left (ASGI 2.4's OSError is optional), so `http.disconnect` is the only signal.
    with httpx.Client(base_url=server.base_url) as client:
        with client.stream("GET", "/debug/send-probe") as response:
            next(response.iter_bytes())
        wait_for(lambda: "result" in client.get("/debug/send-probe-result").json(), 5, "probe ends")
        assert client.get("/debug/send-probe-result").json()["result"] == "returned"


@pytest.mark.parametrize("route", ["chat", "resume"])
def test_reader_stops_promptly_when_the_client_leaves(server: ServerProcess, route: str) -> None:
    session = new_session()
    execution_id = f"demo:{session}:0"
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        assert readers(client)["open"] == 0
        closed_before = readers(client)["closed"]
        if route == "chat":
            request = client.build_request("POST", "/chat", json=chat_body(session))
        else:
            # Started by a client that leaves at once; then a resume stream is what is dropped.
            with client.stream("POST", "/chat", json=chat_body(session)) as response:
                next(response.iter_lines())
            wait_for(lambda: readers(client)["open"] == 0, 5, "the first reader ends")
            closed_before = readers(client)["closed"]
            request = client.build_request(
                "GET", turn_url(execution_id, "/stream"), headers={"Last-Event-ID": "1"}
            )
        with client.stream(
            request.method, request.url, headers=request.headers, content=request.content
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first, second = orjson.loads(next(lines)), orjson.loads(next(lines))
            assert second["seq"] == first["seq"] + 1
            assert readers(client)["open"] == 1
        # Leaving the block closed the connection with the body unread.
        took = wait_for(lambda: readers(client)["open"] == 0, 2, "the reader stops")
        assert took < 1.0, took
        assert readers(client)["closed"] == closed_before + 1
        # It stopped because its client left, not because the turn ended: the turn goes on.
        assert status(client, execution_id)["status"] == "running"
        assert_completes(client, execution_id, "hold on to this one")


# -- (b) a client that stops reading ---------------------------------------------------------


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
    long_turn_server: ServerProcess,
) -> None:
    server = long_turn_server
    session = new_session()
    execution_id = f"demo:{session}:0"
    payload = orjson.dumps(chat_body(session))
    request = (
        f"POST /chat?format=sse HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        closed_before = readers(client)["closed"]
        stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A tiny receive window, and never a recv(): the server's sends soon block.
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            stalled.connect(("127.0.0.1", server.port))
            stalled.sendall(request)
            wait_for(lambda: readers(client)["open"] == 1, 5, "the stream starts")
            started = time.monotonic()
            wait_for(lambda: readers(client)["open"] == 0, 10, "the stalled client is dropped")
            dropped_after = time.monotonic() - started
            assert readers(client)["closed"] == closed_before + 1
            # Dropped while the turn was still running: the pump never waited for it.
            assert status(client, execution_id)["status"] == "running"
            assert dropped_after >= SEND_TIMEOUT_S * 0.9, dropped_after
            # The server closed the connection without ending the chunked body.
            stalled.settimeout(5)
            received = bytearray()
            while chunk := stalled.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
            assert not received.endswith(b"0\r\n\r\n")
            assert b"session.run.completed" not in received
        finally:
            stalled.close()
        assert_completes(client, execution_id, "hold on to this one", LONG_TOKENS)


# -- (b2) a client that trickles its body ------------------------------------------------------


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "path", ["/chat", "/api/chat", turn_url("demo:nobody:0", "/cancel")], ids=str
)
def test_a_trickled_body_is_a_408_and_the_connection_is_closed(
    deadline_server: ServerProcess, path: str
) -> None:
    # A slowloris client: headers at once, then the body one byte every 50 ms, forever. The
    # route gives up after body_timeout_s, answers 408 with `Connection: close`, and the
    # server closes the connection, though the client keeps on sending.
    declared = 10_000  # never reached: 50 ms a byte would take over eight minutes
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{deadline_server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{"
    ).encode()
    received = bytearray()
    sent = 1
    closed = False
    with socket.create_connection(("127.0.0.1", deadline_server.port), timeout=5) as sock:
        sock.settimeout(0.05)
        sock.sendall(head)
        started = time.monotonic()
        answered_after: float | None = None
        while time.monotonic() - started < 6:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:
                closed = True
                break
            if chunk == b"":
                closed = True
                break
            if chunk:
                received += chunk
                if answered_after is None:
                    answered_after = time.monotonic() - started
            try:
                sock.sendall(b" ")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        closed_after = time.monotonic() - started
    assert received, "no answer"
    status_code, headers, body = split_response(bytes(received))
    assert status_code == 408, received
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    document = orjson.loads(body)
    assert document["status"] == 408
    assert document["type"] == "https://turnstream.dev/problems/request-timeout"
    assert document["field"] == "body"
    assert answered_after is not None
    assert BODY_TIMEOUT_S * 0.9 <= answered_after < BODY_TIMEOUT_S + 2.5, answered_after
    # Not held: the server closed it soon after the answer, while bytes still came in.
    assert closed, f"the connection was still open after {closed_after:.1f} s"
    assert closed_after - answered_after < 2.0, (answered_after, closed_after)
    assert sent < declared


def test_the_server_still_serves_after_trickled_bodies(deadline_server: ServerProcess) -> None:
    with httpx.Client(base_url=deadline_server.base_url, timeout=10) as client:
        response = client.post("/chat", json=chat_body(new_session()))
        assert response.status_code == 200
        assert orjson.loads(response.content.splitlines()[-1])["type"] == "session.run.completed"


# -- (c) cursor validation ---------------------------------------------------------------------


def raw_status(port: int, request_head: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_head)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return split_response(bytes(received))[0]


@pytest.mark.parametrize(
    ("header", "query", "status_code"),
    [
        (b"3", "3", 204),
        # Optional whitespace: h11 strips both sides of a header value, httptools only the
        # leading one; the parser ignores SP/HTAB around the number, so both servers, and the
        # query, give one answer.
        (b"  3 \t", "%20%203%20%09", 204),
        (b"\t3\t", "%093%09", 204),
        (b"1 2", "1%202", 400),
        (b"3\x0b", "3%0B", 400),
    ],
)
def test_cursor_whitespace_is_one_rule_on_every_server(
    server: ServerProcess, header: bytes, query: str, status_code: int
) -> None:
    path = turn_url("demo:nobody:0", "/stream")  # unknown: a valid cursor is a 204
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    by_header = (
        f"GET {path} HTTP/1.1\r\n".encode() + host
        + b"Last-Event-ID:" + header + b"\r\nConnection: close\r\n\r\n"
    )
    by_query = f"GET {path}?after={query} HTTP/1.1\r\n".encode() + host + (
        b"Connection: close\r\n\r\n"
    )
    assert raw_status(server.port, by_header) == status_code
    assert raw_status(server.port, by_query) == status_code


JUNK_CURSORS = [b"abc", b"-1", b"1.5", b"01", b"0x1", b"9" * 17, b"\xd9\xa3", b"1,2", b"1 2"]


@pytest.mark.parametrize("junk", JUNK_CURSORS, ids=lambda b: b.decode("latin-1"))
def test_junk_last_event_id_is_a_400_problem(server: ServerProcess, junk: bytes) -> None:
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        headers = [(b"Last-Event-ID", junk)]
        answers = [
            client.get(turn_url("demo:nobody:0", "/stream"), headers=headers),
            client.post("/chat", json=chat_body(new_session()), headers=headers),
            client.get(
                turn_url("demo:nobody:0", "/stream"), params={"after": junk.decode("latin-1")}
            ),
        ]
        for response in answers:
            assert response.status_code == 400, response.text
            assert response.headers["content-type"] == "application/problem+json"
            document = response.json()
            assert document["status"] == 400
            assert document["field"] in ("Last-Event-ID", "after")


# -- (d) limits ------------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status_code: int, field: str) -> None:
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document = response.json()
    assert document["status"] == status_code
    assert document["field"] == field


def test_body_over_the_limit_is_413(limited_server: ServerProcess) -> None:
    body = orjson.dumps(chat_body(new_session(), "m" * 3000))
    with httpx.Client(base_url=limited_server.base_url, timeout=10) as client:
        declared = client.post("/chat", content=body, headers={"Content-Type": "application/json"})
        assert_problem(declared, 413, "body")

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        chunked = client.post(
            "/chat", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in chunked.request.headers
        assert_problem(chunked, 413, "body")
        # Just under the limit is read (and then judged on its shape).
        fits = client.post(
            "/chat", content=b" " * 2040 + b"{}", headers={"Content-Type": "application/json"}
        )
        assert_problem(fits, 400, "sessionId")


def test_message_over_the_limit_is_413(limited_server: ServerProcess) -> None:
    with httpx.Client(base_url=limited_server.base_url, timeout=10) as client:
        too_long = client.post("/chat", json=chat_body(new_session(), "m" * 101))
        assert_problem(too_long, 413, "message")
        at_limit = client.post("/chat", json=chat_body(new_session(), "m" * 100))
        assert at_limit.status_code == 200


def test_too_many_events_fail_the_turn_in_band(limited_server: ServerProcess) -> None:
    session = new_session()
    with httpx.Client(base_url=limited_server.base_url, timeout=10) as client:
        response = client.post("/chat", json=chat_body(session))
        assert response.status_code == 200  # the stream had started: errors are in-band
        events = [orjson.loads(line) for line in response.content.splitlines()]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] for e in events[-2:]] == ["error", "session.run.failed"]
        assert events[-2]["code"] == "too_many_events"
        deltas = [e for e in events if e["type"] == "text-delta"]
        assert len(deltas) == 10  # the limit, then the failure
        assert status(client, f"demo:{session}:0")["status"] == "failed"
