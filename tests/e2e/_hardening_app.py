"""The demo app with test-chosen limits and a gauge of open readers, for real uvicorn.

    python -m tests.e2e._hardening_app --port PORT --http h11|httptools

It serves on 127.0.0.1 from a listening socket whose send buffer is small (accepted sockets
inherit it), so that a client that never reads blocks the server's ``send`` after a few
hundred kilobytes rather than after the megabytes Linux's loopback autotuning would buffer.

Settings come from the environment (the test sets them before starting the server):
``TS_TOKENS``, ``TS_TOKEN_DELAY_MS``, ``TS_SEND_TIMEOUT_S``, ``TS_MAX_BODY_BYTES``,
``TS_MAX_MESSAGE_CHARS``, ``TS_MAX_EVENTS``, ``TS_BODY_TIMEOUT_S``. ``GET /debug/readers``
answers ``{"open": n, "closed": m}``: how many readers (one per streaming response) are running now
and how many have ended, so a test can see a reader stop after its client left.

``GET /debug/send-probe`` streams a chunk every 10 ms for up to 5 s, watching for
``http.disconnect``; once the client left it sends once more and records what that ``send``
did (``"returned"`` or ``"raised <type>"``), which ``GET /debug/send-probe-result`` tells:
how this uvicorn reports a disconnect on ``send``.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import orjson
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from turnstream import Limits, _handler
from turnstream._demo import create_demo_app
from turnstream._events import LoggedEvent
from turnstream._reader import read_batches
from turnstream._store import RunKey
from turnstream._supervisor import Supervisor


@dataclass
class ReaderGauge:
    open: int = 0
    closed: int = 0


def _limits() -> Limits:
    defaults = Limits()
    env = os.environ
    return Limits(
        send_timeout_s=float(env.get("TS_SEND_TIMEOUT_S", defaults.send_timeout_s)),
        max_body_bytes=int(env.get("TS_MAX_BODY_BYTES", defaults.max_body_bytes)),
        max_message_chars=int(env.get("TS_MAX_MESSAGE_CHARS", defaults.max_message_chars)),
        max_events_per_turn=int(env.get("TS_MAX_EVENTS", defaults.max_events_per_turn)),
        body_timeout_s=float(env.get("TS_BODY_TIMEOUT_S", defaults.body_timeout_s)),
    )


def create() -> ASGIApp:
    gauge = ReaderGauge()

    async def counted_read_batches(
        supervisor: Supervisor, key: RunKey, *, after: int = 0
    ) -> AsyncIterator[list[LoggedEvent]]:
        gauge.open += 1
        events = read_batches(supervisor, key, after=after)
        try:
            async for batch in events:
                yield batch
        finally:
            try:
                await events.aclose()  # type: ignore[attr-defined]
            finally:
                gauge.open -= 1
                gauge.closed += 1

    # Only in this server process: every stream (chat route and resume route alike) is built
    # by _handler.stream_run, which looks read_batches up at call time.
    _handler.read_batches = counted_read_batches  # type: ignore[attr-defined]

    demo = create_demo_app(
        tokens=int(os.environ.get("TS_TOKENS", "20")),
        token_delay_ms=int(os.environ.get("TS_TOKEN_DELAY_MS", "20")),
        limits=_limits(),
    )

    probe: dict[str, str] = {}

    async def send_json(send: Send, value: object) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(value)})

    async def send_probe(receive: Receive, send: Send) -> None:
        left = anyio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            left.set()

        await send({"type": "http.response.start", "status": 200, "headers": []})
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(listen)
            with anyio.move_on_after(5):
                while not left.is_set():
                    await send({"type": "http.response.body", "body": b"x\n", "more_body": True})
                    await anyio.sleep(0.01)
            task_group.cancel_scope.cancel()
        if not left.is_set():
            probe["result"] = "client never left"
            return
        try:
            await send({"type": "http.response.body", "body": b"late\n", "more_body": True})
        except BaseException as exc:  # what this server does is what we want to know
            probe["result"] = f"raised {type(exc).__name__}"
            raise
        probe["result"] = "returned"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/debug/readers":
            await send_json(send, {"open": gauge.open, "closed": gauge.closed})
        elif scope["type"] == "http" and scope["path"] == "/debug/send-probe":
            await send_probe(receive, send)
        elif scope["type"] == "http" and scope["path"] == "/debug/send-probe-result":
            await send_json(send, probe)
        else:
            await demo(scope, receive, send)

    return app


SERVER_SEND_BUFFER = 16 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", choices=["h11", "httptools"], default="httptools")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SEND_BUFFER)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(create, factory=True, http=args.http, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
