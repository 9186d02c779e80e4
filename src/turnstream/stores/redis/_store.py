"""The production store: one hash, one stream and one dedup hash per run, on Redis.

Every write is one Lua script that checks the fence and the dedup before it writes, so each
method is atomic exactly like its :class:`~turnstream.MemoryStore` counterpart, whose
semantics this store follows method by method. The sweeper's indexes beside the runs are
the one exception (see ``_index``): best effort, always checked against the run hashes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.commands.core import AsyncScript

from ..._events import LoggedEvent, NewEvent
from ..._exceptions import LeaseLost, RunFinished, StoreError, TurnstreamError
from ..._store import (
    AppendRequest,
    BeginOutcome,
    BeginResult,
    Lease,
    RenewRequest,
    RenewResult,
    RunKey,
    RunRecord,
    RunStatus,
)
from . import _keys as k
from ._codec import as_str, as_text, logged_event, run_record, translated
from ._follow import StreamFollower
from ._index import SweepIndex
from ._keys import DEFAULT_PREFIX, RunKeys, check_prefix, run_keys
from ._scripts import Scripts, evalsha_pipelined, pack_append, pack_evalsha
from ._settings import DEFAULT_RETENTION_MS, DEFAULT_RUNNING_TTL_MS, RedisSettings

__all__ = ["RedisStore"]

# Seqs are counted by Lua in doubles, so none ever exceeds 2**53; clamping a cursor to it
# keeps an absurd `after` from turning into an invalid stream id.
_MAX_SEQ: Final = 2**53
# Least headroom between a blocking read's end and its socket timeout, when the store has
# to derive the longest block from a client it was given.
_MIN_BLOCK_MARGIN_MS: Final = 1000
_RUNNING: Final = RunStatus.RUNNING.value.encode()


def _require_bytes(client: aioredis.Redis, name: str) -> None:
    if client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError(
            f"RedisStore needs its {name} built with decode_responses=False: event data must "
            "round-trip byte for byte"
        )


def _block_cap_ms(client: aioredis.Redis, max_block_ms: int | None) -> int | None:
    """The longest XREAD BLOCK that ``client``'s socket timeout lets finish (None: no bound).

    A block longer than the socket timeout would end in a TimeoutError instead of an empty
    answer, and redis-py would then retry the read on a fresh connection.
    """
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    cap = max_block_ms
    if timeout is not None:
        timeout_ms = int(timeout * 1000)
        safe = max(timeout_ms - min(_MIN_BLOCK_MARGIN_MS, timeout_ms // 2), 1)
        cap = safe if cap is None else min(cap, safe)
    return cap


def _ms(value: int) -> bytes:
    return str(int(value)).encode()


class RedisStore:
    """A :class:`~turnstream.TurnStore` on Redis Streams (Redis >= 5; fakeredis works too).

    Clients must be built with ``decode_responses=False`` (the default): event data is kept
    and replayed as bytes.

    * ``client`` serves requests: begin, claim, reads, status, the sweeper.
    * ``write_client`` (default ``client``) serves the pumps' writes: appends, renewals,
      handles, restarts, finishes. Give it a pool of its own so that no burst of requests
      or readers can make a pump wait for a connection (``from_url`` does).
    * ``blocking_client`` (default ``client``) serves :meth:`follow`'s ``XREAD BLOCK``; a
      block is cut to what its ``socket_timeout`` allows (and to ``max_block_ms``), and
      returns empty when cut, which a follower takes as "nothing yet". Each waiting follower
      holds one of its connections.

    Clients that were given are the caller's: :meth:`aclose` closes only the clients
    :meth:`from_url` / :meth:`from_settings` created.

    Every script is safe to resend: redis-py retries a command whose reply was lost, so
    ``begin``, ``claim`` and ``restart`` carry a request id that makes a resent call answer
    like the first one instead of acting twice.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_ms: int = DEFAULT_RETENTION_MS,
        running_ttl_ms: int = DEFAULT_RUNNING_TTL_MS,
        blocking_client: aioredis.Redis | None = None,
        write_client: aioredis.Redis | None = None,
        max_block_ms: int | None = None,
        follow_connections: int = 4,
    ) -> None:
        _require_bytes(client, "client")
        for name, other in (("blocking_client", blocking_client), ("write_client", write_client)):
            if other is not None:
                _require_bytes(other, name)
        if retention_ms < 0:
            raise ValueError("retention_ms must not be negative")
        if running_ttl_ms <= 0:
            raise ValueError("running_ttl_ms must be positive")
        if max_block_ms is not None and max_block_ms <= 0:
            raise ValueError("max_block_ms must be positive")
        self.prefix = check_prefix(prefix)
        self.retention_ms = retention_ms
        self.running_ttl_ms = running_ttl_ms
        self._client = client
        self._writes = write_client if write_client is not None else client
        self._blocking_client = blocking_client if blocking_client is not None else client
        self._max_block_ms = _block_cap_ms(self._blocking_client, max_block_ms)
        timeout = self._blocking_client.connection_pool.connection_kwargs.get("socket_timeout")
        # Followers of every run share a few blocking connections (see _follow): the margin
        # is how much longer than its block a read may stay unanswered before it is
        # declared dead (a black-holed server), within the socket timeout if there is one.
        margin_s = 2.0 if timeout is None else max(min(2.0, timeout / 4), 0.001)
        self._follower = StreamFollower(
            self._blocking_client,
            client,
            max_connections=follow_connections,
            block_ms=self._max_block_ms or 30_000,
            timeout_margin_s=margin_s,
        )
        self._scripts = Scripts(client)
        self._index = SweepIndex(client, self.prefix)
        self._owned: tuple[aioredis.Redis, ...] = ()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> RedisStore:
        """A store with its own three connection pools, closed by :meth:`aclose`.

        Each pool is bounded and *waits* up to ``pool_timeout_s`` for a free connection
        (then the call fails as :class:`~turnstream.StoreUnavailable`) instead of failing at
        once when it is full.
        """

        def build(socket_timeout: float | None, max_connections: int) -> aioredis.Redis:
            pool = aioredis.BlockingConnectionPool.from_url(
                settings.url,
                max_connections=max_connections,
                timeout=settings.pool_timeout_s,
                decode_responses=False,
                socket_timeout=socket_timeout,
                socket_connect_timeout=settings.connect_timeout_s,
                retry=Retry(EqualJitterBackoff(cap=0.5, base=0.01), settings.retries),
            )
            return aioredis.Redis.from_pool(pool)

        client = build(settings.socket_timeout_s, settings.max_connections)
        write_client = build(settings.socket_timeout_s, settings.write_connections)
        # Its own pool: a block must never run into a socket timeout shorter than itself.
        blocking_client = build(settings.blocking_socket_timeout_s, settings.follow_connections)
        store = cls(
            client,
            prefix=settings.prefix,
            retention_ms=settings.retention_ms,
            running_ttl_ms=settings.running_ttl_ms,
            blocking_client=blocking_client,
            write_client=write_client,
            max_block_ms=settings.max_block_ms,
            follow_connections=settings.follow_connections,
        )
        store._owned = (client, write_client, blocking_client)
        return store

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> RedisStore:
        """``from_settings(RedisSettings.from_url(url, **settings))``."""
        return cls.from_settings(RedisSettings.from_url(url, **settings))

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- helpers ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")

    def _keys(self, key: RunKey) -> RunKeys:
        return run_keys(self.prefix, key)

    async def _call(
        self,
        script: AsyncScript,
        operation: str,
        keys: Sequence[bytes],
        args: Sequence[Any],
        *,
        write: bool = False,
    ) -> Any:
        self._check_open()
        with translated(operation):
            # AsyncScript sends EVALSHA and loads the script on NOSCRIPT (a restarted or
            # flushed server), then sends it again.
            return await script(keys=keys, args=args, client=self._writes if write else None)

    @staticmethod
    def _refusal(code: bytes, key: RunKey, lease: Lease) -> TurnstreamError:
        if code == b"lease_lost":
            return LeaseLost(f"lease on {key.execution_id} is not held by {lease.holder}")
        if code == b"finished":
            return RunFinished(f"run {key.execution_id} is finished")
        return StoreError(f"unexpected reply from a store script: {code!r}")

    def _fenced(self, reply: Any, key: RunKey, lease: Lease) -> list[Any]:
        if isinstance(reply, Exception):
            error = StoreError(f"redis failed: {reply}")
            error.__cause__ = reply
            raise error
        if reply[0] != b"ok":
            raise self._refusal(reply[0], key, lease)
        return list(reply)

    @staticmethod
    def _lease_args(lease: Lease) -> list[bytes]:
        return [as_text(lease.holder), str(lease.token).encode()]

    def _leased(self, key: RunKey, result: BeginResult) -> tuple[RunKey, int, bool]:
        return (key, result.run.lease_expires_at_ms, result.run.handle is not None)

    # -- protocol --------------------------------------------------------------------------

    async def begin(
        self,
        key: RunKey,
        *,
        input_hash: str,
        user_id: str,
        holder: str,
        lease_ms: int,
        reopen_failed: bool = False,
    ) -> BeginResult:
        reply = await self._call(
            self._scripts.begin,
            "begin",
            self._keys(key).all(),
            [
                as_text(input_hash),
                as_text(user_id),
                as_text(holder),
                _ms(lease_ms),
                secrets.token_hex(12).encode(),
                _ms(self.running_ttl_ms),
                b"1" if reopen_failed else b"0",
            ],
        )
        outcome = BeginOutcome(as_str(reply[0]))
        record = run_record(key, reply[2], int(reply[1]))
        lease = None
        if outcome is BeginOutcome.FRESH or outcome is BeginOutcome.TAKEOVER:
            lease = Lease(holder, record.lease_token)
        result = BeginResult(outcome, record, lease)
        if lease is not None:
            await self._index.leased("begin", [self._leased(key, result)])
        return result

    async def append(self, key: RunKey, lease: Lease, events: Sequence[NewEvent]) -> list[int]:
        [result] = await self.append_batch([AppendRequest(key, lease, events)])
        if isinstance(result, TurnstreamError):
            raise result
        return result

    async def append_batch(
        self, requests: Sequence[AppendRequest]
    ) -> list[list[int] | TurnstreamError]:
        self._check_open()
        # MemoryStore applies the requests before a terminal event and then raises; so does
        # this store, sending only those.
        bad = next((i for i, r in enumerate(requests) if any(e.terminal for e in r.events)), None)
        valid = requests[:bad] if bad is not None else requests
        results: list[list[int] | TurnstreamError] = []
        if valid:
            script = self._scripts.append
            commands = [
                pack_append(script, self._keys(r.key).all(), self._lease_args(r.lease), r.events)
                for r in valid
            ]
            replies = await evalsha_pipelined(self._writes, script, commands, "append")
            for request, reply in zip(valid, replies, strict=True):
                try:
                    results.append(
                        [int(seq) for seq in self._fenced(reply, request.key, request.lease)[1]]
                    )
                except TurnstreamError as exc:
                    results.append(exc)
        if bad is not None:
            raise ValueError("terminal events are written by finish(), not append()")
        return results

    async def read(self, key: RunKey, *, after: int = 0, limit: int = 512) -> list[LoggedEvent]:
        self._check_open()
        if limit <= 0:
            return []
        start = min(max(after, 0), _MAX_SEQ) + 1
        with translated("read"):
            entries: Any = await self._client.xrange(
                self._keys(key).log, min=f"0-{start}", max="+", count=limit
            )
        return [logged_event(entry_id, fields) for entry_id, fields in entries]

    async def follow(
        self, key: RunKey, *, after: int, block_ms: int, limit: int = 512
    ) -> list[LoggedEvent]:
        self._check_open()
        if block_ms <= 0 or limit <= 0:
            return await self.read(key, after=after, limit=limit)
        keys = self._keys(key)
        after = min(max(after, 0), _MAX_SEQ)
        with translated("follow"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xrange(keys.log, min=f"0-{after + 1}", max="+", count=limit)
                pipe.hget(keys.run, k.STATUS)
                entries, status = await pipe.execute()
        if entries or status != _RUNNING:
            # Something to return, or nothing will ever come: no run, or a finished one.
            return [logged_event(entry_id, fields) for entry_id, fields in entries]
        block = block_ms if self._max_block_ms is None else min(block_ms, self._max_block_ms)
        with translated("follow"):
            # An explicit id, not `$`: whatever was appended since the look above is returned
            # at once, so no event can slip between the look and the block.
            entries = await self._follower.follow(
                keys.log, f"0-{after}", block_ms=block, count=limit
            )
        return [logged_event(entry_id, fields) for entry_id, fields in entries]

    def _renew_call(self, key: RunKey, lease: Lease, lease_ms: int) -> bytes:
        args = [*self._lease_args(lease), _ms(lease_ms), _ms(self.running_ttl_ms)]
        return pack_evalsha(self._scripts.renew, self._keys(key).all(), args)

    async def renew(self, key: RunKey, lease: Lease, *, lease_ms: int) -> RenewResult:
        [result] = await self.renew_batch([RenewRequest(key, lease)], lease_ms=lease_ms)
        if isinstance(result, TurnstreamError):
            raise result
        return result

    async def renew_batch(
        self, requests: Sequence[RenewRequest], *, lease_ms: int
    ) -> list[RenewResult | TurnstreamError]:
        self._check_open()
        if not requests:
            return []
        calls = [self._renew_call(r.key, r.lease, lease_ms) for r in requests]
        replies = await evalsha_pipelined(self._writes, self._scripts.renew, calls, "renew")
        results: list[RenewResult | TurnstreamError] = []
        leased: list[tuple[RunKey, int, bool]] = []
        for request, reply in zip(requests, replies, strict=True):
            try:
                _, cancel_requested, expires_at, has_handle = self._fenced(
                    reply, request.key, request.lease
                )
            except TurnstreamError as exc:
                results.append(exc)
                continue
            results.append(RenewResult(cancel_requested=cancel_requested == b"1"))
            leased.append((request.key, int(expires_at), bool(has_handle)))
        await self._index.leased("renew", leased)
        return results

    async def set_handle(self, key: RunKey, lease: Lease, handle: Mapping[str, Any]) -> None:
        self._check_open()
        try:
            data = orjson.dumps(dict(handle))
        except TypeError as exc:
            raise TypeError(f"a run handle must be JSON-serialisable: {exc}") from exc
        reply = await self._call(
            self._scripts.set_handle,
            "set_handle",
            [self._keys(key).run],
            [*self._lease_args(lease), data],
            write=True,
        )
        expires_at = self._fenced(reply, key, lease)[1]
        await self._index.leased("set_handle", [(key, int(expires_at or b"0"), True)])

    async def restart(self, key: RunKey, lease: Lease) -> int:
        reply = await self._call(
            self._scripts.restart,
            "restart",
            [self._keys(key).run],
            self._lease_args(lease),
            write=True,
        )
        return int(self._fenced(reply, key, lease)[1])

    async def request_cancel(self, key: RunKey) -> bool:
        reply = await self._call(self._scripts.cancel, "request_cancel", [self._keys(key).run], [])
        return bool(reply)

    async def finish(
        self,
        key: RunKey,
        lease: Lease,
        *,
        status: RunStatus,
        terminal: NewEvent,
        final_text: str | None,
        persist_after_ms: int | None = None,
    ) -> int:
        self._check_open()
        if not status.finished or not terminal.terminal:
            raise ValueError("finish() takes a terminal status and a terminal event")
        if persist_after_ms is not None:
            # Listed before the finish, not only after it: a client that dies between its
            # finish landing and its index write would otherwise leave a pending persistence
            # no sweeper ever finds. Until the run is finished the entry is stale and dropped
            # by whoever reads it; the score is this client's estimate, the hash says when.
            due = int(time.time() * 1000) + persist_after_ms
            await self._index.persist_due("finish", key, due)
        reply = await self._call(
            self._scripts.finish,
            "finish",
            self._keys(key).all(),
            [
                *self._lease_args(lease),
                status.value.encode(),
                as_text(terminal.event_id),
                as_text(terminal.type),
                terminal.data,
                b"0" if final_text is None else b"1",
                b"" if final_text is None else as_text(final_text),
                _ms(self.retention_ms),
                b"" if persist_after_ms is None else _ms(persist_after_ms),
            ],
            write=True,
        )
        _, seq, due = self._fenced(reply, key, lease)
        await self._index.finished("finish", key, int(due) or None)
        return int(seq)

    async def release(self, key: RunKey, lease: Lease) -> None:
        released, has_handle, expires_at = await self._call(
            self._scripts.release,
            "release",
            [self._keys(key).run],
            self._lease_args(lease),
            write=True,
        )
        if released:
            await self._index.leased("release", [(key, int(expires_at), bool(has_handle))])

    async def claim(self, key: RunKey, *, holder: str, lease_ms: int) -> BeginResult | None:
        reply = await self._call(
            self._scripts.claim,
            "claim",
            self._keys(key).all(),
            [
                as_text(holder),
                _ms(lease_ms),
                secrets.token_hex(12).encode(),
                _ms(self.running_ttl_ms),
            ],
        )
        if reply[0] == b"none":
            # Most likely the sweeper following a stale index entry of an expired run.
            await self._index.forget("claim", key)
            return None
        outcome = BeginOutcome(as_str(reply[0]))
        record = run_record(key, reply[2], int(reply[1]))
        if outcome is BeginOutcome.TAKEOVER:
            result = BeginResult(outcome, record, Lease(holder, record.lease_token))
            await self._index.leased("claim", [self._leased(key, result)])
            return result
        if outcome is BeginOutcome.COMPLETED:
            await self._index.finished("claim", key, None)
        return BeginResult(outcome, record, None)

    async def lapsed_runs(
        self, *, limit: int = 100, local_after_ms: int | None = None
    ) -> list[RunKey]:
        if limit <= 0:
            return []  # ZRANGEBYSCORE reads LIMIT 0 -1 as "no limit"
        # One page per index: entries dropped as stale make the answer shorter than `limit`
        # this once; they are gone by the next call.
        return await self._index.lapsed(
            self._call, self._scripts.lapsed_runs, limit=limit, local_after_ms=local_after_ms
        )

    async def claim_persist(self, key: RunKey, *, holder: str, lease_ms: int) -> RunRecord | None:
        reply = await self._call(
            self._scripts.claim_persist,
            "claim_persist",
            [self._keys(key).run],
            [as_text(holder), _ms(lease_ms)],
        )
        if reply[0] == b"none":
            await self._index.persist_due("claim_persist", key, None)
            return None
        if reply[0] == b"later":
            await self._index.persist_due("claim_persist", key, int(reply[1]))
            return None
        record = run_record(key, reply[2], int(reply[1]))
        await self._index.persist_due("claim_persist", key, int(reply[1]) + lease_ms)
        return record

    async def mark_persisted(self, key: RunKey) -> None:
        await self._call(
            self._scripts.mark_persisted, "mark_persisted", [self._keys(key).run], [], write=True
        )
        await self._index.persist_due("mark_persisted", key, None)

    async def pending_persists(self, *, limit: int = 100) -> list[RunKey]:
        if limit <= 0:
            return []
        return await self._index.pending_persists(
            self._call, self._scripts.lapsed_runs, limit=limit
        )

    async def get_run(self, key: RunKey) -> RunRecord | None:
        reply = await self._call(self._scripts.get_run, "get_run", [self._keys(key).run], [])
        if not reply[1]:
            return None
        return run_record(key, reply[1], int(reply[0]))

    async def ping(self) -> None:
        self._check_open()
        with translated("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._follower.aclose()
        owned, self._owned = self._owned, ()
        for client in owned:
            await client.aclose()
