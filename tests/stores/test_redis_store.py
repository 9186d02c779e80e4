"""What only the Redis store has: its key layout, stream ids, TTLs, bytes, errors and blocking.

The shared semantics are the conformance suite's (test_conformance.py). Each test here runs
on fakeredis and on the session's throwaway redis-server, never on the shared one on 6379.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import fakeredis
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from turnstream._events import LoggedEvent, NewEvent
from turnstream._exceptions import LeaseLost, StoreError, StoreUnavailable
from turnstream._identity import derive_execution_id
from turnstream._store import (
    AppendRequest,
    BeginOutcome,
    BeginResult,
    Lease,
    RunKey,
    RunStatus,
)
from turnstream.stores import RedisSettings, RedisStore
from turnstream.stores.redis._keys import run_key_from_tag


@dataclass
class Backend:
    """Makes clients of one Redis (fake or real) and closes them after the test."""

    name: str
    url: str | None = None
    server: fakeredis.FakeServer | None = None
    clients: list[aioredis.Redis] = field(default_factory=list)
    prefix: str = field(default_factory=lambda: f"turnstream-test-{uuid.uuid4().hex[:12]}")

    def client(self, **kwargs: Any) -> aioredis.Redis:
        if self.server is not None:
            made: aioredis.Redis = fakeredis.FakeAsyncRedis(server=self.server, **kwargs)
        else:
            assert self.url is not None
            made = aioredis.Redis.from_url(self.url, **kwargs)
        self.clients.append(made)
        return made

    def store(self, **kwargs: Any) -> RedisStore:
        kwargs.setdefault("prefix", self.prefix)
        return RedisStore(self.client(), blocking_client=self.client(), **kwargs)


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fakeredis":
        made = Backend("fakeredis", server=fakeredis.FakeServer())
    else:
        made = Backend("redis", url=request.getfixturevalue("redis_server").url)
    try:
        yield made
    finally:
        for client in made.clients:
            await client.aclose()


def event(event_id: str, event_type: str = "text-delta", **fields: Any) -> NewEvent:
    return NewEvent.build(event_id, {"type": event_type, **fields})


def new_key(tenant_id: str = "acme") -> RunKey:
    return RunKey(tenant_id, derive_execution_id("project", f"s-{uuid.uuid4().hex}", 1))


async def begin_result(store: RedisStore, key: RunKey, holder: str = "w1") -> BeginResult:
    return await store.begin(key, input_hash="h", user_id="u", holder=holder, lease_ms=60_000)


async def begin(store: RedisStore, key: RunKey, holder: str = "w1") -> Lease:
    result = await store.begin(key, input_hash="h", user_id="u", holder=holder, lease_ms=60_000)
    assert result.lease is not None
    return result.lease


def leases_key(backend: Backend) -> bytes:
    """The index of re-attachable runs (with a run handle)."""
    return f"{backend.prefix}:leases".encode()


def local_leases_key(backend: Backend) -> bytes:
    """The index of runs without a handle (local producers)."""
    return f"{backend.prefix}:leases:local".encode()


HANDLE = {"kind": "k", "runId": "r", "data": {}}


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- key layout ------------------------------------------------------------------------------


async def test_keys_of_a_run_share_one_hash_tag_and_slot(backend: Backend) -> None:
    store = backend.store()
    # Braces and slashes in the identity must neither break nor move the tag.
    key = RunKey("tenant/{odd}", derive_execution_id("p{1}", "s}/:x", 7))
    lease = await begin(store, key)
    await store.append(key, lease, [event("a")])
    raw = backend.client()

    tag = key.tag
    names = {s: f"{backend.prefix}:{{{tag}}}:{s}".encode() for s in ("run", "log", "ids")}
    assert "{" not in tag and "}" not in tag
    assert await raw.type(names["run"]) == b"hash"
    assert await raw.type(names["log"]) == b"stream"
    assert await raw.type(names["ids"]) == b"hash"
    assert await raw.hgetall(names["ids"]) == {b"a": b"1"}
    assert len({key_slot(name) for name in names.values()}) == 1
    # Nothing else was written under this prefix but the lease index (of runs without a
    # handle, like this one), which is no run's.
    leases = local_leases_key(backend)
    assert sorted(await raw.keys(f"{backend.prefix}:*")) == sorted([*names.values(), leases])
    assert await raw.zrange(leases, 0, -1) == [tag.encode()]


async def test_runs_of_other_tenants_and_turns_get_other_keys(backend: Backend) -> None:
    store = backend.store()
    execution_id = derive_execution_id("p", f"s-{uuid.uuid4().hex}", 1)
    first, second = RunKey("a", execution_id), RunKey("b", execution_id)
    await begin(store, first)
    assert (
        await store.begin(second, input_hash="other", user_id="u", holder="w", lease_ms=1000)
    ).outcome is BeginOutcome.FRESH


def test_prefix_may_not_hold_a_brace() -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(client, prefix="app{1}")
    with pytest.raises(ValueError, match="prefix"):
        RedisSettings.from_url("redis://localhost", prefix="")


def test_decoding_clients_are_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStore(fakeredis.FakeAsyncRedis(decode_responses=True))
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStore(
            fakeredis.FakeAsyncRedis(),
            blocking_client=fakeredis.FakeAsyncRedis(decode_responses=True),
        )


# -- run tags, parsed back -------------------------------------------------------------------

# Any str but lone surrogates, which no Redis key (UTF-8) can hold.
_TEXT = st.text(st.characters(blacklist_categories=["Cs"]))


@given(tenant_id=_TEXT, execution_id=_TEXT, user_id=st.none() | _TEXT)
def test_a_run_tag_parses_back_to_its_key(
    tenant_id: str, execution_id: str, user_id: str | None
) -> None:
    key = RunKey(tenant_id, execution_id, user_id)
    assert run_key_from_tag(key.tag) == key
    assert run_key_from_tag(key.tag.encode()) == key


@pytest.mark.parametrize(
    ("tenant_id", "execution_id"),
    [
        ("a/b", "p:s:1"),
        ("a%2Fb", "p:s:1"),
        ("100%", "p/with/slashes:1"),
        ("", ""),
        ("/", "/"),
        ("ünï 🌍", "é:%41:1"),
        ("%zz", "x"),
        ("~-._", "x"),
    ],
)
@pytest.mark.parametrize("user_id", [None, "ada", "a/b", "a@b", "", "ünï 🌍"])
def test_odd_tenants_parse_back_exactly(
    tenant_id: str, execution_id: str, user_id: str | None
) -> None:
    key = RunKey(tenant_id, execution_id, user_id)
    assert "/" not in key.tag.partition("/")[0]
    parsed = run_key_from_tag(key.tag)
    assert (parsed.tenant_id, parsed.execution_id, parsed.user_id) == (
        tenant_id,
        execution_id,
        user_id,
    )


@pytest.mark.parametrize(
    "tag",
    [
        "no-slash-at-all",
        "a b/x",  # a space RunKey.tag would have escaped
        "%2f/x",  # lower-case escape: RunKey.tag writes %2F
        "%41/x",  # an escape of something that needs none
        "%zz/x",
        "%C3/x",  # half a UTF-8 sequence
        "ü/x",
        b"\xff/x",
        "a@b@c/x",  # one user at most: RunKey.tag escapes '@'
        "a@b c/x",
        "a@%41/x",
    ],
)
def test_only_tags_run_key_tag_writes_parse(tag: str | bytes) -> None:
    with pytest.raises(ValueError):
        run_key_from_tag(tag)


# -- the lease index -------------------------------------------------------------------------


async def test_the_lease_index_follows_every_lease_change(backend: Backend) -> None:
    store = backend.store()
    raw = backend.client()
    key = new_key("tenant/ü%")
    member = key.tag.encode()

    async def indexed() -> float | None:
        score: float | None = await raw.zscore(leases_key(backend), member)
        return score

    async def expiry() -> int:
        run = await store.get_run(key)
        assert run is not None
        return run.lease_expires_at_ms

    lease = await begin(store, key)
    # Without a handle the run is in the local index; its handle moves it.
    assert await raw.zscore(local_leases_key(backend), member) == await expiry()
    assert await indexed() is None
    await store.set_handle(key, lease, HANDLE)
    assert await raw.zscore(local_leases_key(backend), member) is None
    assert await raw.type(leases_key(backend)) == b"zset"
    assert await indexed() == await expiry()
    before = await expiry()
    await store.renew(key, lease, lease_ms=120_000)
    assert await indexed() == await expiry() > before
    await store.release(key, lease)
    assert await indexed() == await expiry() <= (await store.get_run(key)).observed_at_ms  # type: ignore[union-attr]
    claimed = await store.claim(key, holder="w2", lease_ms=60_000)
    assert claimed is not None and claimed.lease is not None
    assert claimed.outcome is BeginOutcome.TAKEOVER
    assert await indexed() == claimed.run.lease_expires_at_ms == await expiry()
    # A stale lease's release and renewal leave the entry alone, like the run.
    await store.release(key, lease)
    with pytest.raises(LeaseLost):
        await store.renew(key, lease, lease_ms=1)
    assert await indexed() == await expiry()
    # Joins write nothing.
    joined = await store.claim(key, holder="w3", lease_ms=1)
    assert joined is not None and joined.outcome is BeginOutcome.LIVE
    assert (await begin_result(store, key, "w3")).outcome is BeginOutcome.LIVE
    assert await indexed() == await expiry()
    await store.finish(
        key,
        claimed.lease,
        status=RunStatus.COMPLETED,
        terminal=event("end", "session.run.completed"),
        final_text="x",
    )
    assert await indexed() is None


async def test_a_takeover_by_begin_is_indexed(backend: Backend) -> None:
    store = backend.store()
    raw = backend.client()
    key = new_key()
    lease = await begin(store, key, "w1")
    await store.renew(key, lease, lease_ms=1)
    await anyio.sleep(0.03)
    taken = await begin_result(store, key, "w2")
    assert taken.outcome is BeginOutcome.TAKEOVER
    score = await raw.zscore(local_leases_key(backend), key.tag.encode())
    assert score == taken.run.lease_expires_at_ms


async def test_claim_drops_index_entries_of_runs_gone_or_finished(backend: Backend) -> None:
    store = backend.store()
    raw = backend.client()
    gone, finished = new_key(), new_key("t/2")
    lease = await begin(store, finished)
    await store.finish(
        finished,
        lease,
        status=RunStatus.FAILED,
        terminal=event("end", "session.run.failed"),
        final_text=None,
    )
    # What a crashed client or a lost ZREM leaves behind: entries saying "lapsed" for a run
    # that expired and for one that finished.
    await raw.zadd(leases_key(backend), {gone.tag.encode(): 0, finished.tag.encode(): 0})
    assert await store.claim(gone, holder="sweeper", lease_ms=60_000) is None
    result = await store.claim(finished, holder="sweeper", lease_ms=60_000)
    assert result is not None and result.outcome is BeginOutcome.COMPLETED
    assert await raw.zrange(leases_key(backend), 0, -1) == []
    assert await store.get_run(gone) is None  # and the claim created nothing


async def test_lapsed_runs_checks_the_runs_and_mends_the_index(backend: Backend) -> None:
    store = backend.store()
    raw = backend.client()
    leases = leases_key(backend)
    orphan, live, gone, finished, squatted = (new_key(f"t{n}") for n in range(5))
    orphan_lease = await begin(store, orphan)
    await store.set_handle(orphan, orphan_lease, {"kind": "k", "runId": "r", "data": {}})
    await store.release(orphan, orphan_lease)
    await begin(store, live)
    lease = await begin(store, finished)
    await store.finish(
        finished,
        lease,
        status=RunStatus.COMPLETED,
        terminal=event("end", "session.run.completed"),
        final_text="x",
    )
    await raw.set(f"{backend.prefix}:{{{squatted.tag}}}:run", b"not a hash")
    # Entries that claim more than the runs' hashes say, all due before the real orphan's.
    await raw.zadd(
        leases,
        {
            live.tag.encode(): 0,
            gone.tag.encode(): 0,
            finished.tag.encode(): 0,
            squatted.tag.encode(): 0,
            b"not a run tag": 0,
            b"%zz/x": 0,
        },
    )
    assert await store.lapsed_runs() == [orphan]
    # Dropped: the gone, the finished and the foreign; the live one (no handle) moved to the
    # local index with its real expiry; a key squatted by something else is not the store's
    # to judge, so it stays.
    live_run = await store.get_run(live)
    assert live_run is not None
    assert await raw.zscore(local_leases_key(backend), live.tag.encode()) == (
        live_run.lease_expires_at_ms
    )
    assert sorted(await raw.zrange(leases, 0, -1)) == sorted(
        [orphan.tag.encode(), squatted.tag.encode()]
    )
    assert await store.lapsed_runs() == [orphan]


async def test_a_broken_lease_index_never_fails_a_run_write(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = backend.store()
    # Every ZADD and ZREM on the index now fails with WRONGTYPE (each update of the local
    # index also removes the run from this one).
    await backend.client().set(leases_key(backend), b"not a sorted set")
    key = new_key()
    with caplog.at_level(logging.WARNING, logger="turnstream.store.redis"):
        lease = await begin(store, key)
        assert await store.append(key, lease, [event("a")]) == [1]
        assert (await store.renew(key, lease, lease_ms=60_000)).cancel_requested is False
        await store.release(key, lease)
        claimed = await store.claim(key, holder="w2", lease_ms=60_000)
        assert claimed is not None and claimed.lease is not None
        assert claimed.outcome is BeginOutcome.TAKEOVER
        assert await store.append(key, claimed.lease, [event("b")]) == [2]
        seq = await store.finish(
            key,
            claimed.lease,
            status=RunStatus.COMPLETED,
            terminal=event("end", "session.run.completed"),
            final_text="ab",
        )
        assert seq == 3
        completed = await store.claim(key, holder="w3", lease_ms=60_000)
        assert completed is not None and completed.outcome is BeginOutcome.COMPLETED
    warned = [r for r in caplog.records if "sweeper index not updated" in r.getMessage()]
    # begin, renew, release, claim (takeover), finish, claim (completed): each one logged.
    assert len(warned) == 6, [r.getMessage() for r in caplog.records]
    run = await store.get_run(key)
    assert run is not None and (run.status, run.final_text) == (RunStatus.COMPLETED, "ab")
    # Reading the index is lapsed_runs' own work, so there a broken index is an error.
    with pytest.raises(StoreError):
        await store.lapsed_runs()


async def test_a_lost_index_write_is_swallowed(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.store()
    calls: list[str] = []
    real_pipeline = store._client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)

        async def lost(*args: Any, **kwargs: Any) -> Any:
            calls.append("index")
            raise rx.ConnectionError("connection lost while writing the index")

        pipe.execute = lost
        return pipe

    # The store's own client writes only the indexes through pipelines (the run scripts
    # go one by one or through the write client).
    lossy = type("Lossy", (), {"pipeline": staticmethod(pipeline)})()
    monkeypatch.setattr(store._index, "_client", lossy)
    key = new_key()
    lease = await begin(store, key)
    assert await store.append(key, lease, [event("a")]) == [1]
    assert (await store.renew(key, lease, lease_ms=60_000)).cancel_requested is False
    await store.release(key, lease)
    claimed = await store.claim(key, holder="w2", lease_ms=60_000)
    assert claimed is not None and claimed.lease is not None
    await store.finish(
        key,
        claimed.lease,
        status=RunStatus.CANCELLED,
        terminal=event("end", "session.run.cancelled"),
        final_text=None,
    )
    assert len(calls) == 5
    assert await backend.client().exists(leases_key(backend)) == 0
    assert await backend.client().exists(local_leases_key(backend)) == 0


async def test_a_resent_claim_gets_the_lease_it_was_granted(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    await store.release(key, await begin(store, key, "w1"))
    keys = [f"{backend.prefix}:{{{key.tag}}}:{s}".encode() for s in ("run", "log", "ids")]
    args = [b"w2", b"60000", b"claim-1", b"86400000"]
    # As redis-py does when the reply to the first was lost: the very same call again.
    first = await store._scripts.claim(keys=keys, args=args)
    again = await store._scripts.claim(keys=keys, args=args)
    assert (first[0], again[0]) == (b"takeover", b"takeover")
    for reply in (first, again):
        assert dict(zip(reply[2][::2], reply[2][1::2], strict=True))[b"lease_token"] == b"2"
    other = await store.claim(key, holder="w2", lease_ms=60_000)
    assert other is not None and other.outcome is BeginOutcome.LIVE  # a new request joins
    assert other.run.lease_token == 2


async def test_a_resent_begin_does_not_get_a_later_claims_lease(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    keys = [f"{backend.prefix}:{{{key.tag}}}:{s}".encode() for s in ("run", "log", "ids")]
    args = [b"h", b"u", b"w1", b"60000", b"request-1", b"86400000"]
    assert (await store._scripts.begin(keys=keys, args=args))[0] == b"fresh"
    await store.release(key, Lease("w1", 1))
    claimed = await store.claim(key, holder="w1", lease_ms=60_000)
    assert claimed is not None and claimed.lease == Lease("w1", 2)
    # The first begin's resend arrives late: the claim's lease is not the one it was granted.
    assert (await store._scripts.begin(keys=keys, args=args))[0] == b"live"


# -- stream ids and bytes --------------------------------------------------------------------


async def test_stream_entry_ids_are_the_seqs(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    lease = await begin(store, key)
    assert await store.append(key, lease, [event("a"), event("b"), event("a")]) == [1, 2, 1]
    terminal = event("end", "session.run.completed", finalText="")
    assert (
        await store.finish(key, lease, status=RunStatus.COMPLETED, terminal=terminal, final_text="")
        == 3
    )
    raw = backend.client()
    entries = await raw.xrange(f"{backend.prefix}:{{{key.tag}}}:log".encode())
    assert [entry_id for entry_id, _ in entries] == [b"0-1", b"0-2", b"0-3"]
    assert entries[2][1] == {b"i": b"end", b"t": b"session.run.completed", b"d": terminal.data}
    assert [e.seq for e in await store.read(key)] == [1, 2, 3]


ODD_JSON = [
    (
        b'{"type":"text-delta","delta":"\xc3\xa9\xf0\x9f\x98\x80 \\u0000 \\ud83d\\ude00 '
        b'\xe2\x80\xa8","eventId":"u"}'
    ),
    b'{"type":"big","n":123456789012345678901234567890,"m":-9223372036854775809,"eventId":"i"}',
    b'{"type":"float","a":0.1,"b":1e308,"c":-0.0,"d":5e-324,"e":1.0E+2,"eventId":"f"}',
    b'{"type":"space" , "nested" : { "k" : [ 1 ,2 ] } ,"eventId":"s"}',
]


async def test_event_data_round_trips_byte_for_byte(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    lease = await begin(store, key)
    # Built by hand, not by NewEvent.build: the store must keep what it is given verbatim,
    # never parse or re-encode it (a big int or a float's spelling would not survive).
    sent = [
        NewEvent(event_id=orjson.loads(data)["eventId"], type=orjson.loads(data)["type"], data=data)
        for data in ODD_JSON
    ]
    assert await store.append(key, lease, sent) == [1, 2, 3, 4]
    expected = [LoggedEvent(i + 1, e.event_id, e.type, e.data) for i, e in enumerate(sent)]
    assert await store.read(key) == expected
    assert await store.follow(key, after=0, block_ms=100) == expected
    assert (await store.read(key, after=1))[0].to_json().startswith(b'{"seq":2,"type":"big"')


async def test_text_fields_round_trip_exactly(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    holder = "wörker-\U0001f600"
    result = await store.begin(key, input_hash="h", user_id="ü\x00", holder=holder, lease_ms=60_000)
    assert result.lease == Lease(holder, 1)
    await store.set_handle(key, result.lease, {"kind": "x", "cursor": "é", "n": 2**60})
    await store.finish(
        key,
        result.lease,
        status=RunStatus.FAILED,
        terminal=event("end", "session.run.failed"),
        final_text="line\n\u2028\x00end",
    )
    run = await store.get_run(key)
    assert run is not None
    assert run.user_id == "ü\x00"
    assert run.final_text == "line\n\u2028\x00end"
    assert run.handle == {"kind": "x", "cursor": "é", "n": 2**60}


# -- retention -------------------------------------------------------------------------------


async def test_unfinished_runs_expire_unless_their_lease_is_written(backend: Backend) -> None:
    store = backend.store(running_ttl_ms=300_000)
    raw = backend.client()
    key = new_key()
    names = [f"{backend.prefix}:{{{key.tag}}}:{s}".encode() for s in ("run", "log", "ids")]
    lease = await begin(store, key)
    assert 290_000 < await raw.pttl(names[0]) <= 300_000
    await store.append(key, lease, [event("a")])  # creates the log and the ids: same TTL
    for name in names:
        assert 290_000 < await raw.pttl(name) <= 300_000
    await raw.pexpire(names[0], 1_000)
    await raw.pexpire(names[1], 1_000)
    await store.renew(key, lease, lease_ms=60_000)  # every renewal extends all three
    for name in names:
        assert 290_000 < await raw.pttl(name) <= 300_000
    await store.release(key, lease)
    await raw.pexpire(names[2], 1_000)
    claimed = await store.claim(key, holder="w2", lease_ms=60_000)
    assert claimed is not None and claimed.outcome is BeginOutcome.TAKEOVER
    for name in names:
        assert 290_000 < await raw.pttl(name) <= 300_000
    # A run that nobody writes again is gone after its TTL, log and ids with it.
    for name in names:
        await raw.pexpire(name, 1)
    await anyio.sleep(0.05)
    assert await store.get_run(key) is None
    assert await store.read(key) == []


async def test_finish_sets_the_retention_ttl_and_drops_the_dedup_index(backend: Backend) -> None:
    store = backend.store(retention_ms=600_000, running_ttl_ms=3_600_000)
    raw = backend.client()
    key = new_key()
    names = [f"{backend.prefix}:{{{key.tag}}}:{s}".encode() for s in ("run", "log")]
    lease = await begin(store, key)
    await store.append(key, lease, [event("a")])
    for name in names:  # the running TTL, longer than the retention here
        assert 3_590_000 < await raw.pttl(name) <= 3_600_000
    await store.finish(
        key,
        lease,
        status=RunStatus.COMPLETED,
        terminal=event("end", "session.run.completed"),
        final_text="x",
    )
    for name in names:
        assert 590_000 < await raw.pttl(name) <= 600_000
    assert not await raw.exists(f"{backend.prefix}:{{{key.tag}}}:ids".encode())


async def test_a_finished_run_is_gone_after_its_retention(backend: Backend) -> None:
    store = backend.store(retention_ms=50)
    key = new_key()
    lease = await begin(store, key)
    await store.append(key, lease, [event("a")])
    await store.finish(
        key,
        lease,
        status=RunStatus.COMPLETED,
        terminal=event("end", "session.run.completed"),
        final_text="x",
    )
    await anyio.sleep(0.2)
    assert await store.get_run(key) is None
    assert await store.read(key) == []
    # The execution id can be used again from scratch: seqs start at 1.
    again = await begin(store, key, holder="w2")
    assert again == Lease("w2", 1)
    assert await store.append(key, again, [event("a")]) == [1]


# -- clock -----------------------------------------------------------------------------------


async def test_lease_times_come_from_the_server_clock(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.store()
    seconds, micros = await backend.client().time()
    server_ms = seconds * 1000 + micros // 1000
    if backend.server is None:
        # A worker whose clock is an hour off must not move the lease (fakeredis's TIME is
        # this process's clock, so only the real server can show it).
        monkeypatch.setattr(time, "time", lambda: server_ms / 1000 + 3600)
    key = new_key()
    await begin(store, key)
    run = await store.get_run(key)
    assert run is not None and run.lease_live
    assert abs(run.created_at_ms - server_ms) < 5_000
    assert abs(run.lease_expires_at_ms - (server_ms + 60_000)) < 5_000


# -- errors ----------------------------------------------------------------------------------


async def test_unreachable_server_is_store_unavailable() -> None:
    client = aioredis.Redis(
        host="127.0.0.1", port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    store = RedisStore(client, prefix="unreachable")
    key = new_key()
    lease = Lease("w", 1)
    try:
        for call in (
            store.ping,
            lambda: store.begin(key, input_hash="h", user_id="u", holder="w", lease_ms=1),
            lambda: store.append(key, lease, [event("a")]),
            lambda: store.append_batch([AppendRequest(key, lease, [event("a")])]),
            lambda: store.read(key),
            lambda: store.follow(key, after=0, block_ms=100),
            lambda: store.get_run(key),
        ):
            with pytest.raises(StoreUnavailable) as caught:
                await call()
            assert isinstance(caught.value.__cause__, rx.ConnectionError | OSError)
    finally:
        await store.aclose()
        await client.aclose()


async def test_from_url_to_an_unreachable_server_is_store_unavailable() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{closed_port()}/0", retries=0)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.aclose()


async def test_a_disconnected_fake_server_is_store_unavailable() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    store = RedisStore(client, prefix="gone")
    try:
        server.connected = False
        with pytest.raises(StoreUnavailable):
            await store.begin(new_key(), input_hash="h", user_id="u", holder="w", lease_ms=1)
    finally:
        await client.aclose()


async def test_other_redis_errors_are_store_errors_not_fence_errors(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    # Something else squats on the run's key: the script fails with WRONGTYPE.
    await backend.client().set(f"{backend.prefix}:{{{key.tag}}}:run", b"not a hash")
    with pytest.raises(StoreError) as caught:
        await store.append(key, Lease("w", 1), [event("a")])
    assert not isinstance(caught.value, StoreUnavailable | LeaseLost)
    results = await store.append_batch([AppendRequest(key, Lease("w", 1), [event("a")])])
    assert isinstance(results[0], StoreError) and not isinstance(results[0], StoreUnavailable)


async def test_a_malformed_run_record_is_a_store_error(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    await backend.client().hset(f"{backend.prefix}:{{{key.tag}}}:run", b"status", b"running")
    with pytest.raises(StoreError, match="malformed run record"):
        await store.get_run(key)


# -- scripts ---------------------------------------------------------------------------------


async def test_append_batch_survives_a_script_flush(backend: Backend) -> None:
    store = backend.store()
    first, second = new_key(), new_key()
    lease_one, lease_two = await begin(store, first), await begin(store, second)
    await backend.client().script_flush()
    results = await store.append_batch(
        [
            AppendRequest(first, lease_one, [event("a"), event("b")]),
            AppendRequest(second, Lease("w1", 9), [event("a")]),
            AppendRequest(second, lease_two, [event("a")]),
        ]
    )
    assert results[0] == [1, 2]
    assert isinstance(results[1], LeaseLost)
    assert results[2] == [1]
    await backend.client().script_flush()
    assert await store.append(first, lease_one, [event("c")]) == [3]


@pytest.mark.redis
async def test_append_batch_is_one_round_trip(redis_server: Any) -> None:
    backend = Backend("redis", url=redis_server.url)
    try:
        store = backend.store()
        raw = backend.client()
        keys = [new_key() for _ in range(3)]
        leases = [await begin(store, key) for key in keys]
        await store.append_batch([AppendRequest(keys[0], leases[0], [event("warm")])])

        async def calls(command: str) -> int:
            stats = await raw.info("commandstats")
            return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

        before = (await calls("evalsha"), await calls("script|exists"), await calls("script"))
        batch = [
            AppendRequest(key, lease, [event("x")]) for key, lease in zip(keys, leases, strict=True)
        ]
        assert await store.append_batch(batch) == [[2], [1], [1]]
        after = (await calls("evalsha"), await calls("script|exists"), await calls("script"))
        # Three EVALSHAs and nothing else: no SCRIPT EXISTS before the pipeline.
        assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (3, 0, 0)
    finally:
        for client in backend.clients:
            await client.aclose()


async def test_a_resent_begin_gets_the_lease_it_was_granted(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    keys = [f"{backend.prefix}:{{{key.tag}}}:{s}".encode() for s in ("run", "log", "ids")]
    args = [b"h", b"u", b"w1", b"60000", b"request-1", b"86400000"]
    # As redis-py does when the reply to the first was lost: the very same call again.
    first = await store._scripts.begin(keys=keys, args=args)
    again = await store._scripts.begin(keys=keys, args=args)
    assert (first[0], again[0]) == (b"fresh", b"fresh")
    other = await store.begin(key, input_hash="h", user_id="u", holder="w1", lease_ms=60_000)
    assert other.outcome is BeginOutcome.LIVE  # a new request of the same holder joins


async def test_a_resent_restart_counts_once(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    lease = await begin(store, key)
    run_key = f"{backend.prefix}:{{{key.tag}}}:run".encode()
    args = [b"w1", b"1"]
    # As redis-py does when the reply to the first was lost: the very same call again.
    assert await store._scripts.restart(keys=[run_key], args=args) == [b"ok", 2]
    assert await store._scripts.restart(keys=[run_key], args=args) == [b"ok", 2]
    assert await store.restart(key, lease) == 2  # the pump's own retry: the same lease


# -- follow ----------------------------------------------------------------------------------


async def test_follow_blocks_until_another_client_appends(backend: Backend) -> None:
    writer, reader = backend.store(), backend.store()
    key = new_key()
    lease = await begin(writer, key)
    await writer.append(key, lease, [event("a")])
    got: list[LoggedEvent] = []

    async def follow() -> None:
        got.extend(await reader.follow(key, after=1, block_ms=10_000))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.sleep(0.2)
        assert not got  # still blocked
        await writer.append(key, lease, [event("b"), event("c")])
    assert [(e.seq, e.event_id) for e in got] == [(2, "b"), (3, "c")]
    assert time.monotonic() - started < 5


async def test_follow_waits_out_its_block_and_returns_nothing(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    await begin(store, key)
    started = time.monotonic()
    assert await store.follow(key, after=0, block_ms=300) == []
    assert time.monotonic() - started >= 0.25


async def test_follow_does_not_block_on_unknown_or_finished_runs(backend: Backend) -> None:
    store = backend.store()
    key = new_key()
    started = time.monotonic()
    assert await store.follow(key, after=0, block_ms=5_000) == []
    lease = await begin(store, key)
    await store.finish(
        key,
        lease,
        status=RunStatus.CANCELLED,
        terminal=event("end", "session.run.cancelled"),
        final_text=None,
    )
    assert await store.follow(key, after=1, block_ms=5_000) == []
    assert time.monotonic() - started < 2


async def test_follow_may_share_the_command_client(backend: Backend) -> None:
    client = backend.client()
    store = RedisStore(client, prefix=backend.prefix)
    writer = backend.store()
    key = new_key()
    lease = await begin(writer, key)

    async def append_later() -> None:
        await anyio.sleep(0.1)
        await writer.append(key, lease, [event("a")])

    async with anyio.create_task_group() as tg:
        tg.start_soon(append_later)
        assert [e.seq for e in await store.follow(key, after=0, block_ms=5_000)] == [1]
    await store.aclose()
    await client.ping()  # a client the store was given stays open


async def test_a_block_is_cut_to_what_the_socket_timeout_allows(backend: Backend) -> None:
    blocking = backend.client(socket_timeout=0.6)
    store = RedisStore(backend.client(), prefix=backend.prefix, blocking_client=blocking)
    key = new_key()
    await begin(store, key)
    started = time.monotonic()
    # Asked for 10 s; the socket would time out after 0.6 s, so the block ends first, empty.
    assert await store.follow(key, after=0, block_ms=10_000) == []
    assert time.monotonic() - started < 2


# -- building from a URL ---------------------------------------------------------------------


def test_settings_from_url() -> None:
    settings = RedisSettings.from_url("rediss://h:6380/2", prefix="app", max_block_ms=2_000)
    assert settings.url == "rediss://h:6380/2"
    assert (settings.prefix, settings.retention_ms) == ("app", 24 * 3600 * 1000)
    assert settings.blocking_socket_timeout_s > 2.0
    with pytest.raises(ValueError, match="redis://"):
        RedisSettings.from_url("http://h")
    with pytest.raises(ValueError):
        RedisSettings.from_url("redis://h", max_block_ms=0)


@pytest.mark.redis
async def test_from_url_builds_a_blocking_pool_that_outlasts_the_block(
    redis_server: Any,
) -> None:
    store = RedisStore.from_url(
        redis_server.url, prefix=f"t-{uuid.uuid4().hex}", max_block_ms=700, socket_timeout_s=0.3
    )
    try:
        commands = store._client.connection_pool.connection_kwargs
        blocking = store._blocking_client.connection_pool.connection_kwargs
        assert store._client.connection_pool is not store._blocking_client.connection_pool
        assert commands["socket_timeout"] == 0.3
        assert blocking["socket_timeout"] > 0.7
        assert commands["decode_responses"] is False
        key = new_key()
        await begin(store, key)
        started = time.monotonic()
        # The command socket would time out after 0.3 s; the block runs its 0.7 s undisturbed.
        assert await store.follow(key, after=0, block_ms=60_000) == []
        assert 0.6 <= time.monotonic() - started < 3
    finally:
        await store.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await store.ping()


@pytest.mark.redis
async def test_from_url_store_works_end_to_end(redis_server: Any) -> None:
    async with RedisStore.from_url(redis_server.url, prefix=f"t-{uuid.uuid4().hex}") as store:
        await store.ping()
        key = new_key()
        lease = await begin(store, key)
        assert await store.append(key, lease, [event("a")]) == [1]
        seq = await store.finish(
            key,
            lease,
            status=RunStatus.COMPLETED,
            terminal=event("e", "session.run.completed"),
            final_text="done",
        )
        assert seq == 2
        assert (
            await store.finish(
                key,
                lease,
                status=RunStatus.COMPLETED,
                terminal=event("e", "session.run.completed"),
                final_text="done",
            )
            == 2
        )


# -- a client that dies between a finish and its index write ---------------------------------


async def finish_with_persistence(store: RedisStore, key: RunKey, lease: Lease) -> None:
    await store.finish(
        key,
        lease,
        status=RunStatus.COMPLETED,
        terminal=event("end", "session.run.completed"),
        final_text="x",
        persist_after_ms=1,
    )


async def test_a_pending_persistence_is_listed_before_the_finish_lands(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner dies right after its finish script ran: the index write after it never
    # happens. The entry written before the finish is what lets a sweeper find the run.
    store = backend.store()
    key = new_key()
    lease = await begin(store, key)

    async def died(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(store._index, "finished", died)
    await finish_with_persistence(store, key, lease)
    await anyio.sleep(0.02)
    assert await store.pending_persists() == [key]
    assert await store.claim_persist(key, holder="sweeper", lease_ms=60_000) is not None


async def test_a_finished_run_left_in_the_lease_index_is_moved_to_the_persistence_index(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both index writes around the finish lost (an older client, or a crash in between): the
    # lease index still holds the run, and reading it moves the run where it belongs.
    store = backend.store()
    key = new_key()
    begun = await store.begin(key, input_hash="h", user_id="u", holder="w1", lease_ms=1)
    assert begun.lease is not None
    lease = begun.lease

    async def lost(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(store._index, "finished", lost)
    monkeypatch.setattr(store._index, "persist_due", lost)
    await finish_with_persistence(store, key, lease)
    monkeypatch.undo()
    await anyio.sleep(0.02)
    assert await store.pending_persists() == []  # not listed yet
    assert await store.lapsed_runs(local_after_ms=0) == []  # finished: no orphan
    assert await store.pending_persists() == [key]
