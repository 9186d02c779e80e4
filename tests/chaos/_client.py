"""The chaos clients: a raw-socket HTTP/1.1 streaming client and a chat client on top of it.

Raw asyncio sockets rather than httpx: a thousand concurrent streams must cost the test
process little (two cores, shared with the worker under test). One connection per request
(``Connection: close``): a connection to a worker that was just killed is never reused.

A :class:`TurnClient` plays one user's turn the way a well-behaved app would: it POSTs the
turn, keeps its cursor (the last seq it got), and after a broken read resumes with
``GET /turns/{id}/stream?after=<seq>`` (or ``Last-Event-ID``), or POSTs the turn again (a
retry: it joins a live turn, replays a finished one, restarts a dead local one). Everything it
received is kept for the checker, which compares it with the log.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from turnstream import derive_execution_id

PROJECT_ID = "chaos"
TERMINALS = frozenset({"session.run.completed", "session.run.failed", "session.run.cancelled"})
FORMATS = ("ndjson", "sse", "ai-sdk")


class BrokenStream(Exception):
    """The connection ended (or went silent) before the response did."""


# -- HTTP/1.1 ---------------------------------------------------------------------------------


class HttpResponse:
    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle_s: float,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer
        self._idle_s = idle_s

    async def _read(self, coro: Awaitable[bytes]) -> bytes:
        try:
            return await asyncio.wait_for(coro, self._idle_s)
        except TimeoutError:
            raise BrokenStream(f"nothing for {self._idle_s:.1f} s") from None
        except asyncio.IncompleteReadError as exc:
            raise BrokenStream("the connection closed mid-body") from exc
        except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
            raise BrokenStream(f"read failed: {exc!r}") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, de-chunked, as it arrives."""
        reader = self._reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await self._read(reader.readuntil(b"\r\n"))
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self._read(reader.readuntil(b"\r\n"))
                    return
                data = await self._read(reader.readexactly(size + 2))
                yield data[:-2]
        elif "content-length" in self.headers:
            remaining = int(self.headers["content-length"])
            while remaining > 0:
                data = await self._read(reader.read(min(remaining, 65536)))
                if not data:
                    raise BrokenStream("the connection closed mid-body")
                remaining -= len(data)
                yield data
        else:
            while data := await self._read(reader.read(65536)):
                yield data

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        self._writer.transport.abort()


async def request(
    base_url: str,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    idle_s: float = 30.0,
) -> HttpResponse:
    """Send one request and read the response head; raises :class:`BrokenStream`."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout=5
        )
    except (OSError, TimeoutError) as exc:
        raise BrokenStream(f"connect failed: {exc!r}") from exc
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    try:
        writer.write(head + (body or b""))
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_s)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.transport.abort()
        raise BrokenStream(f"no response head: {exc!r}") from exc
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    response_headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            name, _, value = line.partition(":")
            response_headers[name.strip().lower()] = value.strip()
    return HttpResponse(int(status_line.split()[1]), response_headers, reader, writer, idle_s)


# -- the wire formats -------------------------------------------------------------------------


class LineSplitter:
    """Bytes in, whole lines out (NDJSON); a partial last line waits for the next chunk."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line for line in lines if line.strip()]


class SseSplitter:
    """Bytes in, whole SSE messages out, each a dict of its fields (``data`` lines joined)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, str]]:
        self._buffer += data.replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        messages = []
        for block in blocks:
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if not line or line.startswith(":"):
                    continue  # a keep-alive comment
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                fields[name] = fields[name] + "\n" + value if name in fields else value
            if fields:
                messages.append(fields)
        return messages


# -- one user's turn --------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnSpec:
    tenant: str
    session: str
    message: str
    tokens: int
    delay_ms: int
    mode: str = "local"  # "local": the app's own producer; "substrate": reconnectable
    fmt: str = "ndjson"

    @property
    def execution_id(self) -> str:
        return derive_execution_id(PROJECT_ID, self.session, 0)

    @property
    def chat_path(self) -> str:
        return "/chat" if self.mode == "local" else "/substrate/chat"

    def body(self) -> bytes:
        return orjson.dumps({"sessionId": self.session, "turnIndex": 0, "message": self.message})

    def headers(self) -> dict[str, str]:
        return {
            "X-Chaos-Tenant": self.tenant,
            "X-Chaos-Tokens": str(self.tokens),
            "X-Chaos-Delay-Ms": str(self.delay_ms),
        }


@dataclass
class Attempt:
    """One request the client made and how it ended."""

    method: str
    base_url: str
    status: int = 0
    mode: str = ""
    events: int = 0
    end: str = ""  # "terminal", "error:<code>", "broken: …", "status <n>", "empty"
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0


@dataclass
class AiStream:
    """The chunks of one AI SDK response and whether it ended with ``[DONE]``."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def text(self) -> str:
        """What a client shows: the text parts after the last ``start-step``."""
        text = ""
        for chunk in self.chunks:
            if chunk.get("type") == "start-step":
                text = ""
            elif chunk.get("type") == "text-delta":
                text += chunk.get("delta", "")
        return text


Pick = Callable[["TurnClient"], Awaitable[str | None]]


class TurnClient:
    """Runs one turn to its end through broken reads, resumes and retries.

    * ``pick(client)`` — the worker to talk to next (a base URL), or None to give up;
    * ``repost`` — after a break, POST again (instead of a resume GET) with this probability;
      0 never re-POSTs a turn (a reader that must not restart anything);
    * ``stop_on_error`` — end at the first in-band error or broken read (a stall's reader);
    * ``idle_s`` — a read that gets nothing for this long is a broken read;
    * ``deadline_s`` — the whole turn, all attempts.
    """

    def __init__(
        self,
        spec: TurnSpec,
        pick: Pick,
        rng: random.Random,
        *,
        repost: float = 0.3,
        stop_on_error: bool = False,
        idle_s: float = 10.0,
        deadline_s: float = 60.0,
        max_requests: int = 40,
        pause_s: float = 0.05,
    ) -> None:
        self.spec = spec
        self.pick = pick
        self.rng = random.Random(rng.getrandbits(64))
        self.repost = repost
        self.stop_on_error = stop_on_error
        self.idle_s = idle_s
        self.deadline_s = deadline_s
        self.max_requests = max_requests
        self.pause_s = pause_s
        self.received: list[dict[str, Any]] = []  # ndjson / sse: every event, in arrival order
        self.ai_streams: list[AiStream] = []  # ai-sdk: one per 200 response
        self.errors: list[str] = []  # in-band errors (not logged: no seq)
        self.attempts: list[Attempt] = []
        self.cursor = 0
        self.done = False
        self.outcome = ""  # "terminal", "gave up: …", "stopped: …"
        self.started = time.monotonic()
        self.first_event_at: float | None = None
        self.ended_at = 0.0
        self._must_post = True
        self._progress = asyncio.Event()
        self._response: HttpResponse | None = None

    @property
    def execution_id(self) -> str:
        return self.spec.execution_id

    @property
    def events_seen(self) -> int:
        if self.spec.fmt == "ai-sdk":
            return max((len(s.chunks) for s in self.ai_streams), default=0)
        return len(self.received)

    async def wait_for(self, events: int, within_s: float) -> bool:
        """Until this client got ``events`` events (or its turn ended); False after
        ``within_s``."""
        deadline = time.monotonic() + within_s
        while self.events_seen < events and not self.ended_at:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def interrupt(self) -> None:
        """Drop the connection being read (a tab reload, a network change): a broken read."""
        if self._response is not None:
            self._response.close()

    def _target(self, method: str) -> tuple[str, dict[str, str]]:
        spec = self.spec
        headers = spec.headers()
        query: list[str] = []
        if spec.fmt == "sse" and self.rng.random() < 0.5:
            headers["Accept"] = "text/event-stream"
        elif spec.fmt != "ndjson":
            query.append(f"format={spec.fmt}")
        if self.cursor:
            if method == "GET" and spec.fmt == "sse" and self.rng.random() < 0.5:
                headers["Last-Event-ID"] = str(self.cursor)
            else:
                query.append(f"after={self.cursor}")
        if method == "POST":
            path = spec.chat_path
        else:
            path = f"/turns/{quote(spec.execution_id, safe='')}/stream"
        return path + ("?" + "&".join(query) if query else ""), headers

    async def run(self) -> None:
        try:
            await asyncio.wait_for(self._run(), self.deadline_s)
        except TimeoutError:
            self.outcome = f"gave up: deadline {self.deadline_s:.0f} s"
        finally:
            self.ended_at = time.monotonic()
            self._progress.set()

    async def read_rest(self, *, requests: int, deadline_s: float) -> None:
        """Go on reading after :meth:`run` stopped: resume GETs only (never a POST)."""
        self._must_post = False
        self.repost = 0.0
        self.stop_on_error = False
        self.max_requests = len(self.attempts) + requests
        self.deadline_s = deadline_s
        self.ended_at = 0.0
        await self.run()

    async def _run(self) -> None:
        while len(self.attempts) < self.max_requests:
            base_url = await self.pick(self)
            if base_url is None:
                self.outcome = "gave up: no worker"
                return
            method = "POST" if self._must_post else "GET"
            attempt = Attempt(method, base_url)
            self.attempts.append(attempt)
            result = await self._one(attempt)
            attempt.ended = time.monotonic()
            if result == "terminal":
                self.done = True
                self.outcome = "terminal"
                return
            if self.stop_on_error and result in ("error", "broken"):
                self.outcome = f"stopped: {attempt.end}"
                return
            # What to do next. A resume that found nothing to follow, or a dead owner that
            # cannot be re-attached, needs the turn itself again.
            if result == "repost":
                self._must_post = self.repost > 0
            else:
                self._must_post = self.repost > 0 and self.rng.random() < self.repost
            await asyncio.sleep(self.pause_s * self.rng.uniform(0.5, 1.5))
        self.outcome = f"gave up: {self.max_requests} requests"

    async def _one(self, attempt: Attempt) -> str:
        """One request: "terminal", "repost", "error", "broken" or "retry"."""
        path, headers = self._target(attempt.method)
        body = self.spec.body() if attempt.method == "POST" else None
        try:
            response = await request(
                attempt.base_url,
                attempt.method,
                path,
                body=body,
                headers=headers,
                idle_s=self.idle_s,
            )
        except BrokenStream as exc:
            attempt.end = f"broken: {exc}"
            return "broken"
        self._response = response
        attempt.status = response.status
        attempt.mode = response.headers.get("x-turn-mode", "")
        try:
            if response.status == 204:
                attempt.end = "empty"
                return "repost"
            if response.status != 200:
                text = await response.body()
                attempt.end = f"status {response.status}: {text[:200]!r}"
                if response.status == 503:
                    await asyncio.sleep(0.2)
                return "retry"
            if self.spec.fmt == "ai-sdk":
                return await self._read_ai_sdk(response, attempt)
            return await self._read_events(response, attempt)
        except BrokenStream as exc:
            attempt.end = f"broken: {exc}"
            return "broken"
        finally:
            self._response = None
            response.close()

    def _record(self, event: dict[str, Any], attempt: Attempt) -> None:
        self.received.append(event)
        attempt.events += 1
        if self.first_event_at is None:
            self.first_event_at = time.monotonic()
        if isinstance(event.get("seq"), int):
            self.cursor = max(self.cursor, event["seq"])
        self._progress.set()

    async def _read_events(self, response: HttpResponse, attempt: Attempt) -> str:
        sse = self.spec.fmt == "sse"
        splitter: LineSplitter | SseSplitter = SseSplitter() if sse else LineSplitter()
        async for chunk in response.chunks():
            for item in splitter.feed(chunk):
                if isinstance(item, dict):
                    if "data" not in item:
                        continue
                    event = orjson.loads(item["data"])
                    event["_sseId"] = item.get("id")
                    event["_sseEvent"] = item.get("event")
                else:
                    event = orjson.loads(item)
                if "seq" not in event:
                    # An in-band error that is not logged: the store or the owner failed.
                    code = str(event.get("code"))
                    self.errors.append(code)
                    attempt.end = f"error:{code}"
                    return "repost" if code == "owner_lost" else "error"
                self._record(event, attempt)
                if event.get("type") in TERMINALS:
                    attempt.end = "terminal"
                    return "terminal"
        attempt.end = "broken: the body ended before a terminal event"
        return "broken"

    async def _read_ai_sdk(self, response: HttpResponse, attempt: Attempt) -> str:
        stream = AiStream()
        self.ai_streams.append(stream)
        splitter = SseSplitter()
        async for chunk in response.chunks():
            for item in splitter.feed(chunk):
                data = item.get("data")
                if data is None:
                    continue
                if data == "[DONE]":
                    stream.done = True
                    attempt.end = "terminal"
                    return "terminal"
                value = orjson.loads(data)
                stream.chunks.append(value)
                attempt.events += 1
                if self.first_event_at is None:
                    self.first_event_at = time.monotonic()
                self._progress.set()
                if value.get("type") == "error":
                    self.errors.append(str(value.get("errorText")))
        attempt.end = "broken: no [DONE]"
        # The SDK's resume replays the whole turn; a POST retry restarts a dead local one.
        return "repost" if attempt.method == "GET" else "broken"
