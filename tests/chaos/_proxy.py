"""A fault proxy: ``127.0.0.1:<port>`` → a redis-server, with faults switched at runtime.

It runs an asyncio loop in a thread of the test process, so it outlives every worker the
suite kills, and the test drives it with plain (thread-safe, blocking) method calls:

* pass-through (the default);
* ``latency(ms)`` — each chunk waits ``ms`` before it is forwarded, each way;
* ``stall()`` / ``unstall()`` (or ``stall_for(s)``) — hold every byte in both directions and
  answer nothing (new connections are accepted and held too); on ``unstall`` the held bytes
  flow in order, as after a healed partition;
* ``reset()`` — close every open connection abruptly (``SO_LINGER 0``: an RST);
* ``swallow_next_reply(match)`` — the next client command (a chunk containing ``match``, any
  when ``None``) is forwarded, Redis's reply is dropped and that client's connection is reset:
  the write landed, the client never learns it;
* ``refuse(True)`` — new connections are reset at once.

Counters (``stats()``) show that a fault really happened: connections, bytes each way, resets,
refusals, swallowed replies, chunks held by a stall.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

_CHUNK = 65536
_CALL_TIMEOUT_S = 10.0
T = TypeVar("T")


@dataclass
class ProxyStats:
    connections: int = 0
    open: int = 0
    bytes_up: int = 0  # client → redis
    bytes_down: int = 0  # redis → client
    resets: int = 0
    refused: int = 0
    swallowed: int = 0
    stalled_chunks: int = 0
    upstream_failures: int = 0


@dataclass
class _Swallow:
    match: bytes | None
    done: threading.Event = field(default_factory=threading.Event)
    command: bytes = b""  # the start of the command whose reply was swallowed
    claimed: bool = False


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.swallow: _Swallow | None = None  # armed on this connection: drop the next reply
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        """A clean close (FIN), after what was written is flushed."""
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.transport.is_closing():
                writer.close()

    def abort(self) -> None:
        _abort(self.client)
        if self.upstream is not None:
            _abort(self.upstream)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._stats = ProxyStats()
        self._latency_s = 0.0
        self._refusing = False
        self._swallow: _Swallow | None = None
        self._connections: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy")

    # -- lifecycle (called from the test's thread) -----------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with suppress(Exception):
            self._call(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- controls --------------------------------------------------------------------------

    def stats(self) -> ProxyStats:
        return self._call(self._snapshot)

    def pass_through(self) -> None:
        """Undo every fault mode (a stall's held bytes flow on)."""

        async def clear() -> None:
            self._latency_s = 0.0
            self._refusing = False
            self._swallow = None
            assert self._flowing is not None
            self._flowing.set()

        self._call(clear)

    def latency(self, ms: float) -> None:
        async def set_latency() -> None:
            self._latency_s = ms / 1000

        self._call(set_latency)

    def stall(self) -> None:
        async def hold() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._call(hold)

    def unstall(self) -> None:
        async def release() -> None:
            assert self._flowing is not None
            self._flowing.set()

        self._call(release)

    def stall_for(self, seconds: float) -> None:
        """Stall now and unstall after ``seconds`` (returns at once)."""
        self.stall()
        self._loop.call_soon_threadsafe(self._loop.call_later, seconds, self._release_now)

    def _release_now(self) -> None:
        assert self._flowing is not None
        self._flowing.set()

    def reset(self) -> int:
        """Reset every open connection; returns how many."""

        async def reset_all() -> int:
            connections = list(self._connections)
            for connection in connections:
                connection.abort()
            self._stats.resets += len(connections)
            return len(connections)

        return self._call(reset_all)

    def refuse(self, refusing: bool = True) -> None:
        async def set_refusing() -> None:
            self._refusing = refusing

        self._call(set_refusing)

    def swallow_next_reply(self, match: bytes | None = None) -> threading.Event:
        """Arm: the next command containing ``match`` loses its reply. The event is set once
        it happened (``swallowed_command()`` then tells which command it was)."""
        swallow = _Swallow(match)

        async def arm() -> None:
            self._swallow = swallow

        self._call(arm)
        return swallow.done

    def disarm(self) -> bool:
        """Drop an armed swallow that has not fired; True when one was pending."""

        async def drop() -> bool:
            pending = self._swallow is not None and not self._swallow.claimed
            self._swallow = None
            return pending

        return self._call(drop)

    # -- the loop side ---------------------------------------------------------------------

    def _call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        future = asyncio.run_coroutine_threadsafe(factory(), self._loop)
        return future.result(timeout=_CALL_TIMEOUT_S)

    async def _snapshot(self) -> ProxyStats:
        stats = ProxyStats(**vars(self._stats))
        stats.open = len(self._connections)
        return stats

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        assert self._server is not None and self._flowing is not None
        self._server.close()
        self._flowing.set()
        for connection in list(self._connections):
            connection.abort()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        if self._refusing:
            self._stats.refused += 1
            _abort(writer)
            return
        connection = _Connection(writer)
        self._connections.add(connection)
        self._stats.connections += 1
        try:
            # A stalled network answers nothing, not even by connecting onwards.
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.upstream_port), timeout=5
                )
            except (OSError, TimeoutError):
                self._stats.upstream_failures += 1
                _abort(writer)  # Redis is down: the client sees its connection dropped
                return
            connection.upstream = up_writer
            up = asyncio.create_task(self._pipe(connection, reader, up_writer, upward=True))
            down = asyncio.create_task(self._pipe(connection, up_reader, writer, upward=False))
            connection.tasks = [up, down]
            await asyncio.wait(connection.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._connections.discard(connection)
            connection.close()  # one side closed: close the other (an abort already did)
            for task in connection.tasks:
                task.cancel()

    async def _pipe(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upward: bool,
    ) -> None:
        assert self._flowing is not None
        # Chunks are read as they come and forwarded in order by a writer task, so a latency
        # delays each chunk without serialising the delays.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            assert self._flowing is not None
            while True:
                arrived, data = await queue.get()
                if not data:
                    return
                if self._latency_s:
                    await asyncio.sleep(max(0.0, arrived + self._latency_s - time.monotonic()))
                if not self._flowing.is_set():
                    self._stats.stalled_chunks += 1
                    await self._flowing.wait()
                if upward:
                    swallow = self._swallow
                    if (
                        swallow is not None
                        and not swallow.claimed
                        and (swallow.match is None or swallow.match in data)
                    ):
                        swallow.claimed = True
                        swallow.command = data[:200]
                        connection.swallow = swallow
                        self._swallow = None
                    self._stats.bytes_up += len(data)
                else:
                    swallow = connection.swallow
                    if swallow is not None:
                        # The command ran; its reply never reaches the client.
                        self._stats.swallowed += 1
                        connection.abort()
                        swallow.done.set()
                        return
                    self._stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(forward())
        try:
            while True:
                data = await reader.read(_CHUNK)
                await queue.put((time.monotonic(), data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with suppress(asyncio.CancelledError, OSError):
                await sender
