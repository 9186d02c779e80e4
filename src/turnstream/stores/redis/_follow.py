"""Blocking reads of many run logs, shared by every follower in one process (docs/configuration.md).

One ``XREAD BLOCK`` per remote reader would hold a connection per reader, and the pool runs
out long before the readers do. A :class:`StreamFollower` keeps a few *lanes* instead: one
connection each, with one ``XREAD BLOCK … STREAMS k1 k2 … id1 id2 …`` in flight listing up
to ``max_streams_per_read`` streams. Followers of one stream share its place in that read,
at the smallest of their cursors; each takes only what lies after its own cursor.

Re-arming: a read lists the streams its lane had when it was sent. A follower the read
does not serve (its stream is new to the lane, or its cursor is below the read's) bumps
the lane's version and kicks the one kicker task, which sends ``CLIENT UNBLOCK <id>
TIMEOUT`` from the control client: the read answers "nothing" at once and the lane sends
it again, newcomers included. All newcomers of one loop tick cost one unblock.

redis-py's asyncio client runs on asyncio only, so lanes and kicker are asyncio tasks; the
waiting itself is anyio's.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection

__all__ = ["Entry", "StreamFollower"]

logger = logging.getLogger("turnstream.store.redis")

Entry = tuple[bytes, Mapping[bytes, bytes]]
_Id = tuple[int, int]

# A reader that got entries is back with its next follow within milliseconds: keeping its
# stream in the read meanwhile spares an unblock and a re-sent XREAD per event.
_LINGER_S: Final = 1.0
# CLIENT UNBLOCK answers 0 while the XREAD it should cut is still on its way to the server:
# tried again after 1, 2, 4 … 50 ms. Past that a newcomer waits for the read's end instead.
_UNBLOCK_TRIES: Final = 8


def _read_group(stream: bytes) -> int:
    """Streams of one group may share a read. Redis Cluster would need the key's hash slot
    here (one XREAD may list keys of one slot only); one server takes them all together."""
    return 0


def _parse_id(value: bytes | str) -> _Id:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    parsed = int(ms), int(seq or 0)
    if min(parsed) < 0:
        raise ValueError(f"not a stream id: {text!r}")
    return parsed


def _xread_reply(reply: Any) -> Iterator[tuple[bytes, list[Entry]]]:
    # RESP2 answers [[stream, entries], …], RESP3 {stream: entries}; a timeout answers nil.
    for key, raw in (reply or {}).items() if isinstance(reply, dict) else reply or ():
        yield key, [(entry_id, _fields(fields)) for entry_id, fields in raw]


def _fields(flat: Any) -> Mapping[bytes, bytes]:
    return flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))


def _fresh(exc: BaseException) -> BaseException:
    # One error reaches many followers: each raises its own copy, so the tracebacks of
    # hundreds of tasks do not pile up on one shared object.
    try:
        return type(exc)(*exc.args)
    except Exception:
        return rx.ConnectionError(str(exc))


@dataclass(eq=False, slots=True)
class _Waiter:
    cursor: _Id
    count: int
    event: anyio.Event = field(default_factory=anyio.Event)  # set once: entries or error
    entries: list[Entry] = field(default_factory=list)
    error: BaseException | None = None


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@dataclass(eq=False, slots=True)
class _Stream:
    """One stream's place in a lane (``lane`` None: dropped)."""

    key: bytes
    waiters: set[_Waiter]
    lane: _Lane | None = None
    last_id: _Id = (0, 0)  # where it is read from while it lingers without waiters
    idle_since: float = 0.0
    listed_in: int = -1  # read_no of the last read that listed it
    # Its part of the next read, rebuilt only when `dirty`: the read re-sent after each
    # event then costs ~0.2 ms for 512 streams instead of ~1.5 ms.
    dirty: bool = True
    cursor: _Id = (0, 0)  # the cursor the last read that listed it used
    count: int = 1
    key_bulk: bytes = b""
    id_bulk: bytes = b""


@dataclass(eq=False, slots=True)
class _Lane:
    """One blocking connection and the streams its reads list."""

    group: int
    streams: dict[bytes, _Stream] = field(default_factory=dict)
    version: int = 0  # bumped by every follower the read in flight does not serve
    busy: int = 0  # streams with waiters that the read in flight was built with
    armed: int = -1  # the version the read in flight was built from; -1: none in flight
    read_no: int = 0
    unblocked: int = 0  # read_no of the last read CLIENT UNBLOCK cut short
    client_id: int | None = None
    task: asyncio.Task[None] | None = None


class StreamFollower:
    """Waits for new entries of many streams on at most ``max_connections`` connections.

    ``blocking`` lends the lanes their connections (``decode_responses=False``); ``control``
    sends ``CLIENT UNBLOCK`` and may be any client of the same server. A read blocks for at
    most ``block_ms`` (less if ``blocking``'s socket timeout would cut it) and must answer
    within ``timeout_margin_s`` after that, or its connection is dropped and its followers
    get a :class:`redis.exceptions.TimeoutError`. A read lists streams with waiters first,
    oldest first: beyond ``max_connections * max_streams_per_read`` of them, the rest wait
    for a place (or time out) without costing an unblock each.
    """

    def __init__(
        self,
        blocking: aioredis.Redis,
        control: aioredis.Redis,
        *,
        max_connections: int = 4,
        max_streams_per_read: int = 512,
        block_ms: int = 5_000,
        timeout_margin_s: float = 2.0,
    ) -> None:
        if min(max_connections, max_streams_per_read, block_ms) < 1 or timeout_margin_s <= 0:
            raise ValueError("limits must be >= 1 and timeout_margin_s positive")
        kwargs = blocking.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("StreamFollower needs a blocking client with decode_responses=False")
        if (socket_timeout := kwargs.get("socket_timeout")) is not None:
            block_ms = min(block_ms, int((socket_timeout - timeout_margin_s) * 1000))
            if block_ms < 1:
                raise ValueError("the blocking client's socket_timeout must exceed the margin")
        self._pool = blocking.connection_pool
        self._control = control
        self._max_connections = max_connections
        self._max_streams = max_streams_per_read
        self._block_ms = block_ms
        self._deadline_s = block_ms / 1000 + timeout_margin_s
        self._margin = timeout_margin_s
        self._streams: dict[bytes, _Stream] = {}
        self._lanes: list[_Lane] = []
        self._kicks: tuple[MemoryObjectSendStream[None], MemoryObjectReceiveStream[None]] | None
        self._kicks = None  # made with the kicker; holds one item while a kick is pending
        self._kicker: asyncio.Task[None] | None = None
        self._closed = False

    async def follow(
        self, stream: bytes, after_id: bytes | str, *, block_ms: int, count: int
    ) -> list[Entry]:
        """Entries of ``stream`` with ids above ``after_id`` (``ms-seq``; at most ``count``),
        as soon as there is one, or ``[]`` once ``block_ms`` passed without any.

        Raises the redis-py error (``ConnectionError``, ``TimeoutError``, …) of the read it
        waited on; the store translates it.
        """
        if self._closed:
            raise RuntimeError("stream follower is closed")
        if block_ms < 1 or count < 1:
            raise ValueError("block_ms and count must be >= 1")
        waiter = _Waiter(_parse_id(after_id), count)
        self._add(stream, waiter)
        try:
            with anyio.move_on_after(block_ms / 1000):
                await waiter.event.wait()
        finally:
            self._remove(stream, waiter)
        if waiter.error is not None:
            raise _fresh(waiter.error) from waiter.error
        return waiter.entries

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending = {lane.task for lane in self._lanes if lane.task is not None}
        pending |= {self._kicker} if self._kicker is not None else set()
        for _ in range(100):
            if not pending:
                break
            # Again and again: on Python 3.11 the asyncio.wait_for inside redis-py's send
            # swallows a cancel that lands just as the send completes.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.05)
        for end in self._kicks or ():
            end.close()
        error = rx.ConnectionError("stream follower is closed")
        for entry in self._streams.values():
            for waiter in entry.waiters:
                waiter.error = error
                waiter.event.set()
        self._streams.clear()

    # -- the registry: synchronous methods, so no task ever sees it half-changed -------------

    def _add(self, key: bytes, waiter: _Waiter) -> None:
        entry = self._streams.get(key)
        if entry is None:
            entry = self._streams[key] = _Stream(key, {waiter}, key_bulk=_bulk(key))
            self._place(entry)
        else:
            entry.waiters.add(waiter)
            entry.dirty = True
            if not self._listed(entry):
                self._offer(entry)
            elif waiter.cursor < entry.cursor:
                self._touch(entry.lane)
        entry.last_id = max(entry.last_id, waiter.cursor)

    @staticmethod
    def _listed(entry: _Stream) -> bool:
        """Whether the read in flight lists ``entry`` (then at ``entry.cursor``)."""
        lane = entry.lane
        return lane is not None and lane.armed >= 0 and entry.listed_in == lane.read_no

    def _remove(self, key: bytes, waiter: _Waiter) -> None:
        entry = self._streams.get(key)
        if entry is not None and waiter in entry.waiters:  # else: served or failed already
            entry.waiters.remove(waiter)
            entry.dirty = True
            if not entry.waiters:
                self._idle(entry)

    def _idle(self, entry: _Stream) -> None:
        """``entry``'s last waiter left: it lingers, and gives its place to one that waits."""
        entry.idle_since = anyio.current_time()
        lane = entry.lane
        if lane is not None and self._listed(entry) and len(lane.streams) > self._max_streams:
            self._touch(lane)

    def _place(self, entry: _Stream) -> None:
        group = _read_group(entry.key)
        lane = min(
            (lane for lane in self._lanes if lane.group == group),
            key=lambda lane: len(lane.streams),
            default=None,
        )
        if lane is None or (lane.streams and len(self._lanes) < self._max_connections):
            # Spread over connections: the read re-sent after each event lists fewer streams.
            lane = _Lane(group)
            self._lanes.append(lane)
            lane.task = asyncio.get_running_loop().create_task(self._run(lane))
        lane.streams[entry.key] = entry
        entry.lane = lane
        self._offer(entry)

    def _offer(self, entry: _Stream) -> None:
        # An unlisted stream is worth an unblock only if the read has room for it.
        if entry.lane is not None and entry.lane.busy < self._max_streams:
            self._touch(entry.lane)

    def _drop(self, entry: _Stream) -> None:
        if self._streams.get(entry.key) is entry:
            del self._streams[entry.key]
        if entry.lane is not None:
            del entry.lane.streams[entry.key]
            entry.lane = None

    def _touch(self, lane: _Lane | None) -> None:
        if lane is None:
            return
        lane.version += 1
        if lane.armed < 0 or self._closed:
            return  # no read in flight: the next one is built from the lane as it is then
        if self._kicks is None:
            self._kicks = anyio.create_memory_object_stream[None](1)
            self._kicker = asyncio.get_running_loop().create_task(self._kick_loop(self._kicks[1]))
        try:
            self._kicks[0].send_nowait(None)
        except anyio.WouldBlock:
            pass  # a kick is pending already: it will see this lane too

    # -- lanes and the kicker -----------------------------------------------------------------

    async def _run(self, lane: _Lane) -> None:
        conn: AbstractConnection | None = None
        clean = True  # False while a reply may be unread: such a connection must not go back
        try:
            while not self._closed:
                now = anyio.current_time()
                for entry in list(lane.streams.values()):
                    if not entry.waiters and now - entry.idle_since > _LINGER_S:
                        self._drop(entry)
                if not lane.streams:
                    return
                reply: Any = None
                try:
                    with anyio.move_on_after(self._deadline_s) as scope:
                        if conn is None:
                            conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                            clean = False
                            await conn.send_command("CLIENT", "ID")
                            lane.client_id = int(await conn.read_response())
                        # Built once connected: whoever comes while it connects needs no kick.
                        command = self._arm(lane)
                        clean = False
                        await conn.send_packed_command(command)
                        reply = await conn.read_response()
                        clean = True
                    if scope.cancelled_caught:
                        raise rx.TimeoutError(f"no answer to XREAD in {self._deadline_s:g} s")
                except (rx.RedisError, OSError) as exc:
                    self._fail(lane, exc)
                    if conn is not None:
                        dead, conn, lane.client_id, clean = conn, None, None, True
                        await self._discard(dead, clean=False)
                    continue
                finally:
                    lane.armed = -1
                self._deliver(lane, reply)
        except Exception as exc:  # a bug: fail loudly, not by leaving followers to time out
            logger.exception("stream follower lane failed")
            self._fail(lane, exc)
        finally:
            if lane in self._lanes:
                self._lanes.remove(lane)
            if conn is not None:
                await self._discard(conn, clean=clean)

    def _arm(self, lane: _Lane) -> bytes:
        """The next read of ``lane``: streams with waiters first, oldest first."""
        lane.read_no += 1
        lane.armed = lane.version
        busy: list[_Stream] = []
        idle: list[_Stream] = []
        for entry in lane.streams.values():
            (busy if entry.waiters else idle).append(entry)
        listed = busy[: self._max_streams]
        lane.busy = len(listed)
        listed += idle[: self._max_streams - len(listed)]
        for entry in listed:
            entry.listed_in = lane.read_no
            if entry.dirty:
                entry.dirty = False
                entry.cursor = min((w.cursor for w in entry.waiters), default=entry.last_id)
                entry.count = max((w.count for w in entry.waiters), default=1)
                entry.id_bulk = _bulk(b"%d-%d" % entry.cursor)
        count = max(entry.count for entry in listed)
        head = [b"XREAD", b"COUNT", b"%d" % count, b"BLOCK", b"%d" % self._block_ms, b"STREAMS"]
        return b"".join([
            b"*%d\r\n" % (len(head) + 2 * len(listed)),
            *map(_bulk, head),
            *(entry.key_bulk for entry in listed),
            *(entry.id_bulk for entry in listed),
        ])

    def _deliver(self, lane: _Lane, reply: Any) -> None:
        for key, entries in _xread_reply(reply):
            entry = lane.streams.get(key)
            if entry is None or not entries:
                continue  # dropped while the read was in flight
            ids = [_parse_id(entry_id) for entry_id, _ in entries]
            entry.last_id = max(entry.last_id, ids[-1])
            entry.dirty = True
            had_waiters = bool(entry.waiters)
            for waiter in tuple(entry.waiters):
                if waiter.cursor < entry.cursor:
                    # It came after this read was sent, with a cursor below the read's: the
                    # entries between the two are not in this answer. Serving it from here
                    # would be a gap; the next read starts at its cursor.
                    entry.dirty = True
                    continue
                start = bisect.bisect_right(ids, waiter.cursor)
                if start < len(ids):
                    waiter.entries = entries[start : start + waiter.count]
                    waiter.event.set()
                    entry.waiters.remove(waiter)
            if had_waiters and not entry.waiters:
                self._idle(entry)

    def _fail(self, lane: _Lane, exc: BaseException) -> None:
        for entry in list(lane.streams.values()):
            for waiter in entry.waiters:
                waiter.error = exc
                waiter.event.set()
            entry.waiters.clear()
            self._drop(entry)

    async def _discard(self, conn: AbstractConnection, *, clean: bool) -> None:
        # Shielded: a connection that never goes back would shrink the pool for good.
        with anyio.CancelScope(shield=True):
            if not clean:
                await conn.disconnect(nowait=True)
            await self._pool.release(conn)

    async def _kick_loop(self, kicks: MemoryObjectReceiveStream[None]) -> None:
        async with kicks:
            async for _ in kicks:
                pause = 0.001
                for _ in range(_UNBLOCK_TRIES):
                    stale = [
                        lane for lane in self._lanes
                        if 0 <= lane.armed < lane.version and lane.unblocked != lane.read_no
                    ]
                    if all([await self._unblock(lane) for lane in stale]):
                        break  # a kick that came meanwhile waits in the stream
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 0.05)

    async def _unblock(self, lane: _Lane) -> bool:
        """False when the server answered that the lane's read was not blocked (yet)."""
        read_no, client_id = lane.read_no, lane.client_id
        if client_id is None:
            return True
        # Bounded, and not tried again on failure: the read ends by its deadline anyway, so
        # a newcomer then waits no longer than a block.
        with anyio.move_on_after(self._margin):
            try:
                if not await self._control.client_unblock(client_id):
                    return False
                lane.unblocked = read_no
            except (rx.RedisError, OSError) as exc:
                logger.warning("CLIENT UNBLOCK failed, newcomers wait for the read's end: %s", exc)
        return True
