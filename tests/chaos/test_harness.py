"""The chaos harness itself: the fault proxy does each fault, the Redis control brings data
back from its AOF, and the checker catches each kind of broken log (a checker that passes
everything would make every scenario pass)."""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from turnstream._demo import fake_reply

from ._check import check_turn, read_turn, run_tag, tenant_runs
from ._client import TurnClient, TurnSpec
from ._proxy import FaultProxy
from ._redis import RedisProcess

pytestmark = [pytest.mark.redis, pytest.mark.chaos]

PREFIX = "harness"
NO_RETRY = Retry(NoBackoff(), 0)  # redis-py resends on connection errors by default


@pytest.fixture
def proxy(redis_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.port) as started:
        yield started


def through(proxy: FaultProxy, **options: Any) -> redis.Redis:
    options.setdefault("socket_timeout", 5)
    return redis.Redis(host="127.0.0.1", port=proxy.port, **options)


# -- the proxy --------------------------------------------------------------------------------


def test_the_proxy_passes_traffic_through_and_counts_it(proxy: FaultProxy) -> None:
    with through(proxy) as client:
        assert client.ping()
        client.set("harness:pass", b"x" * 1000)
        assert client.get("harness:pass") == b"x" * 1000
    stats = proxy.stats()
    assert stats.connections == 1
    assert stats.bytes_up > 1000 and stats.bytes_down > 1000


def test_latency_delays_each_way(proxy: FaultProxy) -> None:
    with through(proxy) as client:
        client.ping()
        proxy.latency(100)
        started = time.monotonic()
        client.ping()
        assert time.monotonic() - started >= 0.2  # 100 ms up, 100 ms down
        proxy.pass_through()
        started = time.monotonic()
        client.ping()
        assert time.monotonic() - started < 0.1


def test_a_stall_holds_everything_until_it_ends(proxy: FaultProxy) -> None:
    with through(proxy) as client:
        client.ping()
        proxy.stall_for(0.5)
        started = time.monotonic()
        assert client.ping()  # held, then answered: a healed partition
        assert time.monotonic() - started >= 0.45
        proxy.stall()
        held = through(proxy, socket_timeout=0.3, retry=NO_RETRY)
        with pytest.raises(redis.TimeoutError), held:
            held.ping()  # a new connection is held too
        proxy.unstall()
        assert client.ping()
    assert proxy.stats().stalled_chunks >= 1


def test_reset_cuts_every_connection(proxy: FaultProxy) -> None:
    # A raw socket: redis-py would quietly replace a connection it finds reset.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(16) == b"+PONG\r\n"
        assert proxy.reset() == 1
        try:
            data = sock.recv(16)
        except ConnectionResetError:
            data = b""
        assert data == b""
    assert proxy.stats().resets == 1


def test_a_swallowed_reply_landed_but_never_reached_the_client(
    proxy: FaultProxy, redis_server: Any
) -> None:
    key = f"harness:swallow:{uuid.uuid4().hex}"
    done = proxy.swallow_next_reply(key.encode())
    with through(proxy, retry=NO_RETRY) as client:
        client.ping()  # not matched: answered
        with pytest.raises(redis.ConnectionError):
            client.incr(key)
    assert done.is_set()
    with redis.Redis(port=redis_server.port) as direct:
        assert direct.get(key) == b"1"  # the write landed
    assert proxy.stats().swallowed == 1


def test_refused_connections_are_reset(proxy: FaultProxy) -> None:
    proxy.refuse(True)
    with pytest.raises(redis.ConnectionError), through(proxy, retry=NO_RETRY) as client:
        client.ping()
    proxy.refuse(False)
    with through(proxy) as client:
        assert client.ping()
    assert proxy.stats().refused == 1


def test_the_proxy_outlives_a_blocked_control_thread(proxy: FaultProxy) -> None:
    # Controls come from any thread (a scenario's worker threads among them).
    errors: list[BaseException] = []

    def poke() -> None:
        try:
            proxy.latency(0)
            proxy.stats()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=poke) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


# -- Redis control ----------------------------------------------------------------------------


def test_a_killed_redis_comes_back_on_its_port_with_its_data() -> None:
    server = RedisProcess()
    try:
        server.start()
        port, pid = server.port, server.pid
        with server.client() as client:
            client.set("harness:aof", b"kept")
        server.restart(0.1)
        assert server.port == port and server.pid != pid
        with server.client() as client:
            assert client.get("harness:aof") == b"kept"  # fsynced before the SIGKILL
            server.client_pause(300)
            started = time.monotonic()
            with redis.Redis(port=port) as other:
                other.ping()
            assert time.monotonic() - started >= 0.25
    finally:
        server.close()


# -- the checker ------------------------------------------------------------------------------


MESSAGE = "the checker"
TOKENS = 3


def spec(tenant: str) -> TurnSpec:
    return TurnSpec(tenant, f"s-{uuid.uuid4().hex[:8]}", MESSAGE, TOKENS, 0)


def write_log(
    client: redis.Redis, spec: TurnSpec, events: list[tuple[int, str, dict[str, Any]]],
    status: str = "completed",
) -> None:
    tag = run_tag(spec.tenant, spec.execution_id)
    for seq, event_id, data in events:
        payload = orjson.dumps({"type": data["type"], **data, "eventId": event_id})
        client.xadd(
            f"{PREFIX}:{{{tag}}}:log",
            {"i": event_id, "t": data["type"], "d": payload},
            id=f"0-{seq}",
        )
    client.hset(
        f"{PREFIX}:{{{tag}}}:run", mapping={"status": status, "last_seq": str(len(events))}
    )


def good_events(spec: TurnSpec) -> list[tuple[int, str, dict[str, Any]]]:
    words = fake_reply(MESSAGE, TOKENS)
    events: list[tuple[int, str, dict[str, Any]]] = [
        (1, "ts:started", {"type": "session.run.started", "attempt": 1})
    ]
    for i, word in enumerate(words, start=1):
        events.append((i + 1, f"1.{i}", {"type": "text-delta", "delta": word}))
    events.append(
        (len(words) + 2, "ts:terminal",
         {"type": "session.run.completed", "attempt": 1, "finalText": "".join(words)})
    )
    return events


@pytest.fixture
def direct(redis_server: Any) -> Iterator[redis.Redis]:
    with redis.Redis(port=redis_server.port) as client:
        yield client


def verdict_of(direct: redis.Redis, spec: TurnSpec, **options: Any) -> Any:
    turn = read_turn(direct, PREFIX, spec.tenant, spec.execution_id)
    return check_turn(spec, turn, calls=options.pop("calls", 1), **options)


def test_a_whole_log_passes(direct: redis.Redis) -> None:
    turn = spec("checker-ok")
    write_log(direct, turn, good_events(turn))
    verdict = verdict_of(direct, turn, persists=1)
    assert verdict.ok, verdict.describe()
    assert tenant_runs(direct, PREFIX, "checker-ok") == [turn.execution_id]


@pytest.mark.parametrize(
    ("damage", "category"),
    [
        ("gap", "lost"),
        ("missing run", "lost"),
        ("duplicate event id", "duplicated"),
        ("two terminals", "duplicated"),
        ("no terminal", "abandoned"),
        ("stale attempt", "zombie"),
        ("wrong text", "corrupt"),
        ("two calls", "extra_calls"),
        ("not persisted", "unpersisted"),
    ],
)
def test_the_checker_catches(direct: redis.Redis, damage: str, category: str) -> None:
    turn = spec(f"checker-{uuid.uuid4().hex[:6]}")
    events = good_events(turn)
    status, calls, persists = "completed", 1, 1
    if damage == "gap":
        events = [e for e in events if e[0] != 3]
    elif damage == "missing run":
        events = []
    elif damage == "duplicate event id":
        events[2] = (3, "1.1", events[2][2])
    elif damage == "two terminals":
        events.append((len(events) + 1, "ts:terminal2", events[-1][2]))
    elif damage == "no terminal":
        events, status = events[:-1], "running"
    elif damage == "stale attempt":
        # A restart, then an event of the superseded attempt, then the new attempt's text.
        restarted = (2, "ts:restarted:2", {"type": "session.run.restarted", "attempt": 2})
        stale = (3, "1.9", {"type": "data-x"})
        fresh = [(4 + i, f"2.{i}", e[2]) for i, e in enumerate(events[1:-1])]
        end = events[-1][2] | {"attempt": 2}
        events = [events[0], restarted, stale, *fresh, (4 + len(fresh), "ts:terminal", end)]
        calls = 2
    elif damage == "wrong text":
        events[1] = (2, "1.1", {"type": "text-delta", "delta": "x" * len(events[1][2]["delta"])})
        events[-1][2]["finalText"] = "".join(e[2]["delta"] for e in events[1:-1])
    elif damage == "two calls":
        calls = 2
    elif damage == "not persisted":
        persists = 0
    if events:
        write_log(direct, turn, events, status)
    verdict = verdict_of(
        direct, turn, calls=calls, persists=persists, restarts_allowed=damage == "stale attempt"
    )
    assert category in verdict.problems, verdict.describe()


def test_the_checker_holds_the_client_to_the_log(direct: redis.Redis) -> None:
    turn = spec("checker-client")
    events = good_events(turn)
    write_log(direct, turn, events)

    async def nowhere(client: TurnClient) -> str | None:
        return None

    def client_with(seqs: list[int]) -> TurnClient:
        client = TurnClient(turn, nowhere, random.Random(0))
        by_seq = {seq: (event_id, data) for seq, event_id, data in events}
        client.received = [
            {"seq": s, "eventId": by_seq[s][0], **by_seq[s][1]} for s in seqs
        ]
        client.done = bool(seqs) and seqs[-1] == len(events)
        client.outcome = "terminal" if client.done else "gave up"
        return client

    log = read_turn(direct, PREFIX, turn.tenant, turn.execution_id)
    whole = list(range(1, len(events) + 1))
    assert check_turn(client_with(whole), log, calls=1).ok
    assert "duplicated" in check_turn(client_with([1, 2, 2, *whole[2:]]), log, calls=1).problems
    assert "lost" in check_turn(client_with([1, 3, *whole[3:]]), log, calls=1).problems
    assert "lost" in check_turn(client_with(whole[:2]), log, calls=1).problems
