"""Small producers and helpers shared by the handler, pump and supervisor tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import anyio
import orjson
from starlette.types import ASGIApp, Message

from turnstream import ChatTurnResult, TurnContext


class WordProducer:
    """A fake model: ``words`` text deltas, ``delay`` seconds apart; counts its calls."""

    def __init__(self, words: int = 5, delay: float = 0.0, fail_after: int | None = None) -> None:
        self.words = words
        self.delay = delay
        self.fail_after = fail_after
        self.calls = 0
        self.closed = 0
        self.gate: anyio.Event | None = None

    def expected_text(self) -> str:
        return "".join(f"w{i} " for i in range(self.words))

    async def __call__(self, context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        self.calls += 1
        try:
            for i in range(self.words):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("the model broke")
                if self.gate is not None and i == 2:
                    await self.gate.wait()
                if self.delay:
                    await anyio.sleep(self.delay)
                yield {"type": "text-delta", "delta": f"w{i} "}
        finally:
            self.closed += 1


async def collect(result: ChatTurnResult) -> bytes:
    assert not isinstance(result.body, bytes), result.body
    chunks = [chunk async for chunk in result.body]
    return b"".join(chunks)


def ndjson(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text-delta")


# One cursor and what it means, whether it comes as `?after=` or as `Last-Event-ID`: the seq
# it resumes after, or None for a 400. ASCII only, so that every value can travel both as a
# query value and as a header value. Surrounding spaces and tabs are HTTP's optional
# whitespace, ignored in both sources (see turnstream._framing.parse_cursor).
CURSOR_CASES: list[tuple[str, int | None]] = [
    ("", 0),
    ("0", 0),
    ("3", 3),
    ("9007199254740991", 2**53 - 1),
    (" 3", 3),
    ("3 ", 3),
    ("\t3\t", 3),
    ("  3  ", 3),
    (" ", 0),
    ("\t", 0),
    ("-1", None),
    ("+1", None),
    ("-0", None),
    ("01", None),
    ("00", None),
    ("1.0", None),
    ("1e3", None),
    ("0x10", None),
    ("1_000", None),
    ("abc", None),
    ("1 2", None),
    (" 1 2 ", None),
    ("1\n", None),
    ("\n1", None),
    ("1\r", None),
    ("\x0b1", None),  # a vertical tab is whitespace to str.strip(), not to HTTP
    ("\x0c1", None),
    ("\x00", None),
    ("9007199254740992", None),
    ("99999999999999999999", None),
    ("1" * 5000, None),
]


@dataclass(frozen=True)
class StalledAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call_with_a_stalled_body(
    app: ASGIApp,
    path: str,
    *,
    first_chunk: bytes = b'{"sessionId": "s',
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"application/json"),),
    limit_s: float = 5.0,
) -> StalledAnswer:
    """POST to ``app`` a body whose first chunk arrives and whose rest never does.

    Plain ASGI, as a server calls the app: httpx's ASGITransport would have to be fed by a
    generator left suspended. Once the response is complete, ``receive`` says the client
    left, as a server does; the call must end within ``limit_s``.
    """
    sent: list[Message] = []
    responded = anyio.Event()
    chunks = [first_chunk]

    async def receive() -> Message:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": True}
        await responded.wait()  # the rest of the body never comes
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            responded.set()

    path_only, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": unquote(path_only),  # decoded, as a server gives it
        "raw_path": path_only.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    started = anyio.current_time()
    with anyio.fail_after(limit_s):
        await app(scope, receive, send)
    seconds = anyio.current_time() - started
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return StalledAnswer(
        status=start["status"],
        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]},
        body=body,
        seconds=seconds,
    )


async def wait_for(predicate: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``limit`` seconds (a bound, not a timing
    assertion: the tests poll stores and processes that have no event to wait on)."""
    with anyio.fail_after(limit):
        while not await predicate():
            await anyio.sleep(0.01)
