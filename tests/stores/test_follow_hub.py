"""The shared follower of blocking reads (stores/redis/_follow.py), against real redis-servers.

Reads are watched on the wire: the blocking client's connections record every XREAD they
send, and ``CLIENT LIST`` / ``INFO commandstats`` show what the server saw.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import fakeredis
import pytest
import redis.asyncio as aioredis
from redis import exceptions as rx

from tests._redis_process import RedisProcess, redis_binary
from turnstream.stores.redis import _follow
from turnstream.stores.redis._follow import StreamFollower

LANE_NAME = "follow-lane"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Recording(aioredis.Connection):
    """Records each XREAD it sends in ``log``; holds it back ``delay`` seconds if asked."""

    log: list[tuple[Any, ...]]
    delay = 0.0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if isinstance(command, bytes) and command.split(b"\r\n", 3)[2] == b"XREAD":
            # *N, then $len / value pairs: the values are every other line.
            parts = command.split(b"\r\n")
            self.log.append(tuple(parts[2::2][: int(parts[0][1:])]))
            if self.delay:
                await asyncio.sleep(self.delay)
        await super().send_packed_command(command, check_health)


def streams_of(xread: tuple[Any, ...]) -> dict[bytes, bytes]:
    """{stream: id} of one recorded ``XREAD COUNT n BLOCK ms STREAMS k… id…``."""
    rest = list(xread[6:])
    half = len(rest) // 2
    return dict(zip(rest[:half], rest[half:], strict=True))


@dataclass
class Env:
    url: str
    admin: aioredis.Redis
    reads: list[tuple[Any, ...]] = field(default_factory=list)
    recording: type[Recording] = Recording
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    prefix: bytes = field(default_factory=lambda: f"fh-{uuid.uuid4().hex[:8]}:".encode())

    def key(self, name: object) -> bytes:
        return self.prefix + str(name).encode()

    def follower(self, *, socket_timeout: float = 30.0, **kwargs: Any) -> StreamFollower:
        self.recording = type("Recording", (Recording,), {"log": self.reads})
        pool = aioredis.ConnectionPool.from_url(
            self.url,
            connection_class=self.recording,
            client_name=LANE_NAME,
            socket_timeout=socket_timeout,
        )
        blocking = aioredis.Redis.from_pool(pool)
        control = aioredis.Redis.from_url(self.url, socket_timeout=2)
        made = StreamFollower(blocking, control, **kwargs)
        self.closers += [made.aclose, blocking.aclose, control.aclose]
        return made

    async def lanes(self, *, blocked: bool = False) -> list[dict[str, Any]]:
        return [
            c for c in await self.admin.client_list()
            if c.get("name") == LANE_NAME and (not blocked or "b" in c["flags"])
        ]

    async def until_blocked(self, lanes: int = 1) -> None:
        with anyio.fail_after(5):
            while len(await self.lanes(blocked=True)) < lanes:
                await anyio.sleep(0.005)

    async def calls(self, command: str) -> int:
        stats = await self.admin.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def make_env(url: str) -> Env:
    return Env(url, aioredis.Redis.from_url(url))


async def close_env(env: Env) -> None:
    for close in reversed(env.closers):
        await close()
    await env.admin.aclose()


@pytest.fixture
async def env(redis_server: Any) -> AsyncIterator[Env]:
    made = await make_env(redis_server.url)
    try:
        yield made
    finally:
        await close_env(made)


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of the test's own, on a port that survives a restart."""
    server = RedisProcess(redis_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def xadd(env: Env, key: bytes, n: int = 1) -> list[bytes]:
    return [await env.admin.xadd(key, {b"n": str(i).encode()}) for i in range(n)]


# -- 1. latency ---------------------------------------------------------------------------


@pytest.mark.redis
async def test_a_newcomer_to_a_read_in_flight_gets_its_entry_at_once(env: Env) -> None:
    follower = env.follower(max_connections=1, block_ms=5_000)
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: follower.follow(env.key("quiet"), "0-0", block_ms=20_000, count=1))
        await env.until_blocked()
        for i in range(40):
            key = env.key(f"new{i}")
            got: list[Any] = []

            async def newcomer(key: bytes = key, got: list[Any] = got) -> None:
                got.extend(await follower.follow(key, "0-0", block_ms=10_000, count=10))

            async with anyio.create_task_group() as inner:
                inner.start_soon(newcomer)
                await anyio.sleep(0.002 * (i % 5))  # XADD before, during and after the re-arm
                start = time.perf_counter()
                await env.admin.xadd(key, {b"i": b"%d" % i})
            latencies.append(time.perf_counter() - start)
            assert [fields for _, fields in got] == [{b"i": b"%d" % i}]
        tg.cancel_scope.cancel()
    print(f"\nnewcomer latency p50 {statistics.median(latencies) * 1000:.1f} ms,"
          f" max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < 0.5  # a block period is 5 s
    assert await env.calls("client|unblock") >= 1


@pytest.mark.redis
async def test_a_burst_of_newcomers_costs_one_unblock(env: Env) -> None:
    follower = env.follower(max_connections=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: follower.follow(env.key("quiet"), "0-0", block_ms=20_000, count=1))
        await env.until_blocked()
        before = await env.calls("client|unblock")
        reads_before = len(env.reads)
        got: list[bytes] = []

        async def newcomer(key: bytes) -> None:
            got.extend(entry_id for entry_id, _ in await follower.follow(
                key, "0-0", block_ms=10_000, count=10))

        keys = [env.key(f"burst{i}") for i in range(100)]
        for key in keys:
            tg.start_soon(newcomer, key)  # all register in one loop tick
        with anyio.fail_after(5):
            while len(env.reads) == reads_before or len(streams_of(env.reads[-1])) < 101:
                await anyio.sleep(0.005)
        await env.until_blocked()
        assert await env.calls("client|unblock") - before <= 2  # 2: a retried unblock
        async with env.admin.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xadd(key, {b"f": b"v"})
            await pipe.execute()
        with anyio.fail_after(5):
            while len(got) < 100:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()


@pytest.mark.redis
async def test_an_unblock_that_comes_before_the_read_is_tried_again(env: Env) -> None:
    follower = env.follower(max_connections=1, block_ms=5_000)
    got: dict[str, list[Any]] = {}

    async def one(name: str) -> None:
        got[name] = await follower.follow(env.key(name), "0-0", block_ms=10_000, count=1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "quiet")
        await env.until_blocked()
        before = await env.calls("client|unblock")
        env.recording.delay = 0.05  # each XREAD leaves 50 ms after the lane built it
        tg.start_soon(one, "first")  # cuts the read; the next one is held back
        await anyio.sleep(0.02)
        tg.start_soon(one, "second")  # its unblock finds no read blocked: 0, tried again
        await anyio.sleep(0.005)
        start = time.perf_counter()
        await env.admin.xadd(env.key("second"), {b"f": b"v"})
        with anyio.fail_after(2):
            while "second" not in got:
                await anyio.sleep(0.002)
        took = time.perf_counter() - start
        env.recording.delay = 0.0
        print(f"\nheld-back read: newcomer served {took * 1000:.0f} ms after its XADD")
        assert took < 0.5  # not a block period
        assert await env.calls("client|unblock") - before >= 3
        tg.cancel_scope.cancel()


# -- 2. bounded connections ---------------------------------------------------------------


@pytest.mark.redis
async def test_2000_followers_share_4_connections(env: Env) -> None:
    follower = env.follower(max_connections=4, max_streams_per_read=512)
    keys = [env.key(f"many{i}") for i in range(2000)]
    got: dict[bytes, list[Any]] = {}

    async def one(key: bytes) -> None:
        got[key] = await follower.follow(key, "0-0", block_ms=20_000, count=10)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(one, key)
        await env.until_blocked(lanes=4)
        registered = time.perf_counter()
        assert len(await env.lanes()) == 4
        async with env.admin.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xadd(key, {b"k": key})
            await pipe.execute()
        added = time.perf_counter()
    done = time.perf_counter()
    print(f"\n2000 followers: registered and blocked in {(registered - start) * 1000:.0f} ms,"
          f" all served {(done - added) * 1000:.0f} ms after the XADDs,"
          f" {len(env.reads)} XREADs")
    assert sorted(got) == sorted(keys)
    assert all([fields for _, fields in got[key]] == [{b"k": key}] for key in keys)
    assert max(len(streams_of(read)) for read in env.reads) <= 512
    assert len(await env.lanes()) <= 4


@pytest.mark.redis
async def test_streams_beyond_every_lane_queue_for_a_place(env: Env) -> None:
    follower = env.follower(max_connections=2, max_streams_per_read=3)
    keys = [env.key(f"q{i}") for i in range(10)]
    got: dict[bytes, list[Any]] = {}

    async def one(key: bytes) -> None:
        got[key] = await follower.follow(key, "0-0", block_ms=10_000, count=10)

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(one, key)
        await env.until_blocked(lanes=2)
        for key in keys:
            await env.admin.xadd(key, {b"f": b"v"})
    assert sorted(got) == sorted(keys) and all(len(v) == 1 for v in got.values())
    assert max(len(streams_of(read)) for read in env.reads) <= 3
    assert len(await env.lanes()) <= 2


# -- 3. sharing ---------------------------------------------------------------------------


@pytest.mark.redis
async def test_followers_of_one_stream_share_its_place_at_the_smallest_cursor(env: Env) -> None:
    follower = env.follower(max_connections=2)
    key = env.key("shared")
    for seq in (1, 2, 3):
        await env.admin.xadd(key, {b"s": b"%d" % seq}, id=f"0-{seq}")
    cursors_counts = [("0-3", 10), ("0-5", 2), ("0-7", 10), ("0-9", 10)]
    got: dict[str, list[bytes]] = {}

    async def one(cursor: str, count: int) -> None:
        entries = await follower.follow(key, cursor, block_ms=1_000, count=count)
        got[cursor] = [entry_id for entry_id, _ in entries]

    async with anyio.create_task_group() as tg:
        for cursor, count in cursors_counts:
            tg.start_soon(one, cursor, count)
        await env.until_blocked()
        last = env.reads[-1]
        assert list(streams_of(last).items()) == [(key, b"0-3")]
        async with env.admin.pipeline(transaction=True) as pipe:  # one wake-up for all six
            for seq in range(4, 10):
                pipe.xadd(key, {b"s": b"%d" % seq}, id=f"0-{seq}")
            await pipe.execute()
    assert got == {
        "0-3": [b"0-%d" % s for s in range(4, 10)],
        "0-5": [b"0-6", b"0-7"],
        "0-7": [b"0-8", b"0-9"],
        "0-9": [],  # nothing after its cursor: timed out
    }


# -- 4. block_ms --------------------------------------------------------------------------


@pytest.mark.redis
async def test_followers_with_different_block_ms_each_get_nothing_on_time(env: Env) -> None:
    follower = env.follower(block_ms=5_000)
    took: dict[int, float] = {}

    async def one(block_ms: int) -> None:
        start = time.perf_counter()
        assert await follower.follow(env.key(block_ms), "0-0", block_ms=block_ms, count=1) == []
        took[block_ms] = time.perf_counter() - start

    async with anyio.create_task_group() as tg:
        for block_ms in (150, 400, 800):
            tg.start_soon(one, block_ms)
    for block_ms, seconds in took.items():
        assert block_ms / 1000 <= seconds < block_ms / 1000 + 0.4


# -- 5. cancellation ----------------------------------------------------------------------


@pytest.mark.redis
async def test_a_cancelled_follower_leaves_cleanly_and_aclose_leaves_no_tasks(env: Env) -> None:
    follower = env.follower(max_connections=2)
    key, other = env.key("c"), env.key("other")
    got: list[list[Any]] = []

    async def one(stream: bytes) -> None:
        got.append(await follower.follow(stream, "0-0", block_ms=10_000, count=1))

    async with anyio.create_task_group() as tg:
        leaving = anyio.CancelScope()

        async def leaver() -> None:
            with leaving:
                await follower.follow(key, "0-0", block_ms=10_000, count=1)
            got.append(["left"])

        tg.start_soon(leaver)
        tg.start_soon(one, key)
        tg.start_soon(one, other)
        await env.until_blocked(lanes=2)
        leaving.cancel()
        await anyio.sleep(0.05)
        assert got == [["left"]]
        assert len(follower._streams[key].waiters) == 1
        await env.admin.xadd(key, {b"f": b"v"})
        await env.admin.xadd(other, {b"f": b"v"})
    assert len(got) == 3 and all(len(entries) == 1 for entries in got[1:])
    await follower.aclose()
    ours = [
        t for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").startswith("StreamFollower.")
    ]
    assert all(t.done() for t in ours)
    assert not follower._lanes and not follower._streams
    with pytest.raises(RuntimeError):
        await follower.follow(key, "0-0", block_ms=100, count=1)


@pytest.mark.redis
async def test_aclose_wakes_waiting_followers_with_an_error(env: Env) -> None:
    follower = env.follower()
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await follower.follow(env.key("x"), "0-0", block_ms=10_000, count=1)
        except rx.ConnectionError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        await env.until_blocked()
        await follower.aclose()
    assert len(errors) == 1
    with anyio.fail_after(1):  # the socket is closed; the server notices a moment later
        while await env.lanes(blocked=True):
            await anyio.sleep(0.01)


# -- 6. failures --------------------------------------------------------------------------


async def expect_errors(
    follower: StreamFollower, keys: list[bytes], kind: type[BaseException], errors: list[float]
) -> None:
    start = time.perf_counter()

    async def one(key: bytes) -> None:
        with pytest.raises(kind):
            await follower.follow(key, "0-0", block_ms=20_000, count=1)
        errors.append(time.perf_counter() - start)

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(one, key)


@pytest.mark.redis
async def test_a_killed_connection_fails_every_follower_of_its_read(env: Env) -> None:
    follower = env.follower(max_connections=1)
    keys = [env.key(f"k{i}") for i in range(3)]
    took: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(expect_errors, follower, keys, rx.ConnectionError, took)
        await env.until_blocked()
        (lane,) = await env.lanes()
        await env.admin.client_kill_filter(_id=lane["id"])
    assert len(took) == 3 and max(took) < 2
    async with anyio.create_task_group() as tg:  # and it works again
        got: list[Any] = []

        async def one() -> None:
            got.extend(await follower.follow(keys[0], "0-0", block_ms=5_000, count=1))

        tg.start_soon(one)
        await env.until_blocked()
        await env.admin.xadd(keys[0], {b"f": b"v"})
    assert len(got) == 1


@pytest.mark.redis
async def test_a_restarted_server_fails_the_followers_then_follows_work_again(
    own_redis: RedisProcess,
) -> None:
    env = await make_env(own_redis.url)
    try:
        follower = env.follower(max_connections=2)
        keys = [env.key(f"r{i}") for i in range(4)]
        took: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(expect_errors, follower, keys, rx.ConnectionError, took)
            await env.until_blocked(lanes=2)
            own_redis.stop()
        assert len(took) == 4 and max(took) < 2
        with pytest.raises(rx.ConnectionError):  # down: an error, not a hang
            with anyio.fail_after(10):
                await follower.follow(keys[0], "0-0", block_ms=5_000, count=1)
        own_redis.start()
        await env.admin.connection_pool.disconnect()  # the test's own client: not under test
        got: list[Any] = []

        async def one() -> None:
            got.extend(await follower.follow(keys[0], "0-0", block_ms=5_000, count=1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await env.until_blocked()
            await env.admin.xadd(keys[0], {b"f": b"v"})
        assert len(got) == 1
    finally:
        await close_env(env)


@pytest.mark.redis
async def test_a_black_holed_server_fails_the_read_by_its_deadline(own_redis: RedisProcess) -> None:
    env = await make_env(own_redis.url)
    assert own_redis.process is not None
    pid = own_redis.process.pid
    try:
        # The socket would wait 30 s; the read's own deadline is 0.4 + 0.4 s.
        follower = env.follower(block_ms=400, timeout_margin_s=0.4, socket_timeout=30)
        took: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(expect_errors, follower, [env.key("b1"), env.key("b2")],
                          rx.TimeoutError, took)
            await env.until_blocked(lanes=2)
            os.kill(pid, signal.SIGSTOP)
        assert len(took) == 2 and max(took) < 0.4 + 0.4 + 0.5
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        got: list[Any] = []

        async def one() -> None:
            got.extend(await follower.follow(env.key("b1"), "0-0", block_ms=5_000, count=1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await env.until_blocked()
            await env.admin.xadd(env.key("b1"), {b"f": b"v"})
        assert len(got) == 1
    finally:
        await close_env(env)


# -- 7. idle ------------------------------------------------------------------------------


@pytest.mark.redis
async def test_no_followers_no_commands(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_follow, "_LINGER_S", 0.1)
    follower = env.follower(block_ms=200)
    await anyio.sleep(0.3)
    assert env.reads == [] and await env.lanes() == []  # never used: never connected
    assert await follower.follow(env.key("i"), "0-0", block_ms=100, count=1) == []
    with anyio.fail_after(3):
        while follower._lanes:  # the read in flight ends, the lingering stream expires
            await anyio.sleep(0.02)
    reads, xreads = len(env.reads), await env.calls("xread")
    await anyio.sleep(0.5)
    assert (len(env.reads), await env.calls("xread")) == (reads, xreads)
    assert await env.lanes(blocked=True) == []


# -- 9. fakeredis -------------------------------------------------------------------------


async def test_fakeredis_serves_a_newcomer_and_shares_a_stream() -> None:
    server = fakeredis.FakeServer()
    blocking = fakeredis.FakeAsyncRedis(server=server)
    control = fakeredis.FakeAsyncRedis(server=server)
    follower = StreamFollower(blocking, control, max_connections=1, block_ms=5_000)
    got: dict[str, list[Any]] = {}

    async def one(name: str, key: bytes, cursor: str) -> None:
        got[name] = await follower.follow(key, cursor, block_ms=5_000, count=10)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "quiet", b"a", "0-0")
            await anyio.sleep(0.1)
            start = time.perf_counter()
            tg.start_soon(one, "new1", b"b", "0-0")
            tg.start_soon(one, "new2", b"b", "0-1")
            await anyio.sleep(0.05)
            await control.xadd(b"b", {b"f": b"1"}, id="0-1")
            await control.xadd(b"b", {b"f": b"2"}, id="0-2")
            with anyio.fail_after(2):
                while len(got) < 2:
                    await anyio.sleep(0.005)
            assert time.perf_counter() - start < 1
            await control.xadd(b"a", {b"f": b"v"})
        assert [i for i, _ in got["new2"]] == [b"0-2"]
        assert next(i for i, _ in got["new1"]) == b"0-1"  # 0-2 may come in a later read
        assert len(got["quiet"]) == 1
    finally:
        await follower.aclose()
        await blocking.aclose()
        await control.aclose()


# -- regression: a newcomer below the read's cursor ---------------------------------------


@pytest.mark.redis
async def test_a_newcomer_below_the_reads_cursor_is_never_served_with_a_gap(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A follower at 0-3 blocks; a second one of the same stream comes at 0-1 while that read
    # is in flight, and an entry lands before the unblock does (held back here). The answer
    # (entries after 0-3) serves the first; the second must wait for a read from 0-1 — once,
    # 1,000 remote readers on one worker saw a delta go missing exactly like this.
    follower = env.follower(max_connections=1, block_ms=5_000)
    key = env.key("shared")
    ids = await xadd(env, key, 3)
    release_unblock, unblocked = anyio.Event(), anyio.Event()
    real_unblock = follower._unblock

    async def late_unblock(lane: Any) -> bool:
        await release_unblock.wait()
        try:
            return await real_unblock(lane)
        finally:
            unblocked.set()

    monkeypatch.setattr(follower, "_unblock", late_unblock)
    ahead: list[Any] = []
    behind: list[Any] = []

    async def follow(into: list[Any], cursor: bytes) -> None:
        into.extend(await follower.follow(key, cursor, block_ms=5_000, count=100))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow, ahead, ids[2])
        await env.until_blocked()
        tg.start_soon(follow, behind, ids[0])
        await anyio.sleep(0.05)  # registered: its kick waits on the held-back unblock
        new = await xadd(env, key, 1)
        with anyio.fail_after(5):
            while not ahead:
                await anyio.sleep(0.005)
        release_unblock.set()
    with anyio.fail_after(5):
        await unblocked.wait()  # not cut short by the follower's aclose: no socket left open
    assert [entry_id for entry_id, _ in ahead] == new
    assert [entry_id for entry_id, _ in behind] == [ids[1], ids[2], *new]
