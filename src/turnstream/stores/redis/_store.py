"""The production store: one hash, one stream and one dedup hash per run, on Redis (DESIGN §7).

Every write is one Lua script that checks the fence and the dedup before it writes, so each
method is atomic exactly like its :class:`~turnstream.MemoryStore` counterpart, whose
semantics this store follows method by method.

The one exception is the lease index the orphan sweeper reads (:meth:`RedisStore.lapsed_runs`):
a sorted set across all runs, so outside any run's cluster slot. The client updates it after
the run script has answered, best effort; a failed update is logged, never raised, and the
sweeper checks every candidate against the run hash, which stays the truth.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.commands.core import AsyncScript

from ..._events import LoggedEvent, NewEvent
from ..._exceptions import LeaseLost, RunFinished, StoreError, StoreUnavailable, TurnstreamError
from ..._store import (
    AppendRequest,
    BeginOutcome,
    BeginResult,
    Lease,
    RenewResult,
    RunKey,
    RunRecord,
    RunStatus,
)
from . import _keys as k
from ._keys import (
    DEFAULT_PREFIX,
    RunKeys,
    check_prefix,
    leases_key,
    run_key_from_tag,
    run_keys,
)
from ._settings import DEFAULT_RETENTION_MS, RedisSettings

__all__ = ["RedisStore"]

logger = logging.getLogger("turnstream.store.redis")

_PACKAGE: Final = __name__.rpartition(".")[0]
# Seqs are counted by Lua in doubles, so none ever exceeds 2**53; clamping a cursor to it
# keeps an absurd `after` from turning into an invalid stream id.
_MAX_SEQ: Final = 2**53
# Least headroom between a blocking read's end and its socket timeout, when the store has
# to derive the longest block from a client it was given.
_MIN_BLOCK_MARGIN_MS: Final = 1000


def _text(value: str) -> bytes:
    # surrogatepass: any Python str round-trips, as it does through MemoryStore.
    return value.encode("utf-8", "surrogatepass")


def _str(value: bytes) -> str:
    return value.decode("utf-8", "surrogatepass")


@contextmanager
def _translated(operation: str) -> Iterator[None]:
    """redis-py errors become the store's own, at the boundary (STYLE: translate there)."""
    try:
        yield
    except (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, OSError) as exc:
        # ReadOnlyError: a failover is under way and a replica answered; worth a retry.
        raise StoreUnavailable(f"redis is unavailable ({operation}): {exc}") from exc
    except rx.RedisError as exc:
        raise StoreError(f"redis failed ({operation}): {exc}") from exc


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


class _Scripts:
    """The Lua scripts, each registered once on the command client."""

    def __init__(self, client: aioredis.Redis) -> None:
        lua = resources.files(_PACKAGE).joinpath("lua")
        prelude = lua.joinpath("_prelude.lua").read_text(encoding="utf-8")

        def load(name: str) -> AsyncScript:
            return client.register_script(prelude + lua.joinpath(name).read_text(encoding="utf-8"))

        self.begin = load("begin.lua")
        self.append = load("append.lua")
        self.finish = load("finish.lua")
        self.renew = load("renew.lua")
        self.set_handle = load("set_handle.lua")
        self.restart = load("restart.lua")
        self.release = load("release.lua")
        self.claim = load("claim.lua")
        self.lapsed_runs = load("lapsed_runs.lua")
        self.cancel = load("cancel.lua")
        self.get_run = load("get_run.lua")


class RedisStore:
    """A :class:`~turnstream.TurnStore` on Redis Streams (Redis >= 5; fakeredis works too).

    ``client`` must be built with ``decode_responses=False`` (the default): event data is kept
    and replayed as bytes. :meth:`follow` blocks on ``blocking_client`` (``XREAD BLOCK``), or
    on ``client`` when none is given; a block is cut to what that client's ``socket_timeout``
    allows (and to ``max_block_ms``), and returns empty when cut, which a follower takes as
    "nothing yet". Sharing ``client`` for blocking reads holds one of its pool connections per
    waiting follower, so give a separate ``blocking_client`` when many followers wait at once
    or the pool is bounded. :meth:`from_url` builds both clients.

    Clients that were given are the caller's: :meth:`aclose` closes only the clients
    :meth:`from_url` / :meth:`from_settings` created.

    Every script is safe to resend: redis-py retries a command whose reply was lost, so
    ``begin``, ``claim`` and ``restart`` carry a request id that makes a resent call answer
    like the first one instead of acting twice.

    :meth:`lapsed_runs` reads ``{prefix}:leases``, a sorted set of lease expiries beside the
    runs (see the module docstring): a crashed client or a failed update can leave it behind
    the run hashes for a while, so its answer is a list of candidates to :meth:`claim`.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_ms: int = DEFAULT_RETENTION_MS,
        blocking_client: aioredis.Redis | None = None,
        max_block_ms: int | None = None,
    ) -> None:
        _require_bytes(client, "client")
        if blocking_client is not None:
            _require_bytes(blocking_client, "blocking_client")
        if retention_ms < 0:
            raise ValueError("retention_ms must not be negative")
        if max_block_ms is not None and max_block_ms <= 0:
            raise ValueError("max_block_ms must be positive")
        self.prefix = check_prefix(prefix)
        self.retention_ms = retention_ms
        self._leases = leases_key(self.prefix)
        self._client = client
        self._blocking_client = blocking_client if blocking_client is not None else client
        self._max_block_ms = _block_cap_ms(self._blocking_client, max_block_ms)
        self._scripts = _Scripts(client)
        self._owned: tuple[aioredis.Redis, ...] = ()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> RedisStore:
        """A store with its own two connection pools, closed by :meth:`aclose`."""

        def build(socket_timeout: float | None) -> aioredis.Redis:
            return aioredis.Redis.from_url(
                settings.url,
                decode_responses=False,
                socket_timeout=socket_timeout,
                socket_connect_timeout=settings.connect_timeout_s,
                max_connections=settings.max_connections,
                retry=Retry(EqualJitterBackoff(cap=0.5, base=0.01), settings.retries),
            )

        client = build(settings.socket_timeout_s)
        # Its own pool: a block must never run into a socket timeout shorter than itself.
        blocking_client = build(settings.blocking_socket_timeout_s)
        store = cls(
            client,
            prefix=settings.prefix,
            retention_ms=settings.retention_ms,
            blocking_client=blocking_client,
            max_block_ms=settings.max_block_ms,
        )
        store._owned = (client, blocking_client)
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
        self, script: AsyncScript, operation: str, keys: Sequence[bytes], args: Sequence[Any]
    ) -> Any:
        self._check_open()
        with _translated(operation):
            # AsyncScript sends EVALSHA and loads the script on NOSCRIPT (a restarted or
            # flushed server), then sends it again.
            return await script(keys=keys, args=args)

    @staticmethod
    def _refusal(code: bytes, key: RunKey, lease: Lease) -> TurnstreamError:
        if code == b"lease_lost":
            return LeaseLost(f"lease on {key.execution_id} is not held by {lease.holder}")
        if code == b"finished":
            return RunFinished(f"run {key.execution_id} is finished")
        return StoreError(f"unexpected reply from a store script: {code!r}")

    def _fenced(self, reply: Any, key: RunKey, lease: Lease) -> list[Any]:
        if reply[0] != b"ok":
            raise self._refusal(reply[0], key, lease)
        return list(reply)

    @staticmethod
    def _lease_args(lease: Lease) -> list[bytes]:
        return [_text(lease.holder), str(lease.token).encode()]

    @staticmethod
    def _append_args(lease: Lease, events: Sequence[NewEvent]) -> list[bytes]:
        args = RedisStore._lease_args(lease)
        for event in events:
            args += (_text(event.event_id), _text(event.type), event.data)
        return args

    def _append_result(self, reply: Any, key: RunKey, lease: Lease) -> list[int] | TurnstreamError:
        if reply[0] != b"ok":
            return self._refusal(reply[0], key, lease)
        return [int(seq) for seq in reply[1]]

    @staticmethod
    def _record(key: RunKey, flat: Sequence[bytes], now_ms: int) -> RunRecord:
        try:
            return RedisStore._parse_record(
                key, dict(zip(flat[::2], flat[1::2], strict=True)), now_ms
            )
        except (KeyError, ValueError) as exc:
            # Not written by these scripts (another tool under the same prefix?): a store
            # failure, not a reason to crash the caller with a KeyError.
            raise StoreError(f"malformed run record for {key.execution_id}: {exc!r}") from exc

    @staticmethod
    def _parse_record(key: RunKey, fields: dict[bytes, bytes], now_ms: int) -> RunRecord:
        holder = fields.get(k.LEASE_HOLDER)
        expires_at = int(fields.get(k.LEASE_EXPIRES_AT, b"0"))
        handle = fields.get(k.HANDLE)
        final_text = fields.get(k.FINAL_TEXT)
        finished_at = fields.get(k.FINISHED_AT)
        return RunRecord(
            key=key,
            status=RunStatus(_str(fields[k.STATUS])),
            input_hash=_str(fields[k.INPUT_HASH]),
            user_id=_str(fields[k.USER_ID]),
            attempt=int(fields[k.ATTEMPT]),
            last_seq=int(fields[k.LAST_SEQ]),
            lease_holder=None if holder is None else _str(holder),
            lease_token=int(fields[k.LEASE_TOKEN]),
            lease_expires_at_ms=expires_at,
            lease_live=holder is not None and expires_at > now_ms,
            cancel_requested=fields.get(k.CANCEL_REQUESTED) == b"1",
            handle=None if handle is None else orjson.loads(handle),
            final_text=None if final_text is None else _str(final_text),
            created_at_ms=int(fields[k.CREATED_AT]),
            finished_at_ms=None if finished_at is None else int(finished_at),
        )

    @staticmethod
    def _logged(entry_id: bytes, fields: Mapping[bytes, bytes]) -> LoggedEvent:
        return LoggedEvent(
            seq=int(entry_id.partition(b"-")[2]),
            event_id=_str(fields[k.ENTRY_EVENT_ID]),
            type=_str(fields[k.ENTRY_TYPE]),
            data=fields[k.ENTRY_DATA],
        )

    # -- the lease index -------------------------------------------------------------------
    #
    # Written after the run script answered, so never atomically with it: two writes of one
    # run's entry may land in the other order (a heartbeat's ZADD after the finish's ZREM),
    # which leaves an entry that says less than the run hash. lapsed_runs() checks every
    # candidate against its hash and mends or drops the entry, and every heartbeat rewrites
    # it, so such an entry costs a check, never a wrong takeover: claim() decides by the hash.

    async def _index(self, operation: str, key: RunKey, expires_at_ms: int | None) -> None:
        """Record ``key``'s lease expiry in the index (None: the run is finished, drop it).

        Never raises: the run write it follows has landed, and a caller told otherwise would
        act on a failure that did not happen (a pump that stops, a heartbeat that gives up).
        """
        member = key.tag.encode()
        try:
            if expires_at_ms is None:
                await self._client.zrem(self._leases, member)
            else:
                await self._client.zadd(self._leases, {member: expires_at_ms})
        except Exception:
            # Broad on purpose, see above; the sweeper only finds this run later (its next
            # heartbeat rewrites the entry) or through a resume request's claim().
            logger.warning(
                "lease index not updated after %s of %s",
                operation,
                key.execution_id,
                exc_info=True,
            )

    async def _checked_candidates(self, members: Sequence[bytes], now_ms: int) -> list[RunKey]:
        """The candidates whose run hash agrees that the lease lapsed; mend the others' entries.

        An entry whose run is gone or finished, or lapsed without a handle, is dropped; one
        whose run is live again gets its real expiry (XX: never re-adding an entry a finish
        dropped meanwhile); a member that is no run tag at all is foreign and dropped.
        """
        parsed: list[tuple[bytes, RunKey]] = []
        drop: list[bytes] = []
        for member in members:
            try:
                parsed.append((member, run_key_from_tag(member)))
            except ValueError:
                drop.append(member)
        replies: list[Any] = []
        if parsed:
            with _translated("lapsed_runs"):
                async with self._client.pipeline(transaction=False) as pipe:
                    for _, key in parsed:
                        fields = (k.STATUS, k.LEASE_HOLDER, k.LEASE_EXPIRES_AT, k.HANDLE)
                        pipe.hmget(self._keys(key).run, *fields)
                    replies = await pipe.execute(raise_on_error=False)
        lapsed: list[RunKey] = []
        repair: dict[bytes, int] = {}
        for (member, key), reply in zip(parsed, replies, strict=True):
            if isinstance(reply, Exception):
                continue  # not a run hash these scripts wrote: neither ours to take nor drop
            status, holder, expires_at, handle = reply
            if status != RunStatus.RUNNING.value.encode():
                drop.append(member)  # gone (None) or finished
                continue
            try:
                expiry = int(expires_at or b"0")
            except ValueError:
                continue
            if holder is not None and expiry > now_ms:
                repair[member] = expiry
            elif handle is None:
                # Lapsed but not re-attachable: only its next request can restart it. Dropped
                # so a pile of these never starves the sweeper; a renew or takeover re-adds it.
                drop.append(member)
            else:
                lapsed.append(key)
        if drop or repair:
            await self._mend(drop, repair)
        return lapsed

    async def _mend(self, drop: Sequence[bytes], repair: Mapping[bytes, int]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                if drop:
                    pipe.zrem(self._leases, *drop)
                if repair:
                    pipe.zadd(self._leases, dict(repair), xx=True)
                await pipe.execute()
        except Exception:
            logger.warning("lease index not mended", exc_info=True)

    # -- protocol --------------------------------------------------------------------------

    async def begin(
        self, key: RunKey, *, input_hash: str, user_id: str, holder: str, lease_ms: int
    ) -> BeginResult:
        keys = self._keys(key)
        reply = await self._call(
            self._scripts.begin,
            "begin",
            keys.all(),
            [
                _text(input_hash),
                _text(user_id),
                _text(holder),
                str(int(lease_ms)).encode(),
                secrets.token_hex(12).encode(),
            ],
        )
        outcome = BeginOutcome(_str(reply[0]))
        record = self._record(key, reply[2], int(reply[1]))
        lease = None
        if outcome is BeginOutcome.FRESH or outcome is BeginOutcome.TAKEOVER:
            lease = Lease(holder, record.lease_token)
            await self._index("begin", key, record.lease_expires_at_ms)
        return BeginResult(outcome, record, lease)

    async def append(self, key: RunKey, lease: Lease, events: Sequence[NewEvent]) -> list[int]:
        self._check_open()
        for event in events:
            if event.terminal:
                raise ValueError("terminal events are written by finish(), not append()")
        reply = await self._call(
            self._scripts.append, "append", self._keys(key).all(), self._append_args(lease, events)
        )
        result = self._append_result(reply, key, lease)
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
        valid = requests if bad is None else requests[:bad]
        results = await self._append_pipelined(valid) if valid else []
        if bad is not None:
            raise ValueError("terminal events are written by finish(), not append()")
        return results

    async def _append_pipelined(
        self, requests: Sequence[AppendRequest]
    ) -> list[list[int] | TurnstreamError]:
        # EVALSHA calls in one non-transactional pipeline: one round trip, each script atomic
        # on its own. Not registered with the pipeline on purpose: redis-py would then send
        # SCRIPT EXISTS first, a second round trip on every batch. NOSCRIPT is rare (a
        # restarted or flushed server), so it is handled after the fact: load, resend those.
        script = self._scripts.append
        results: list[list[int] | TurnstreamError | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for resend in (False, True):
            if resend:
                with _translated("append_batch"):
                    script.sha = await self._client.script_load(script.script)
            async with self._client.pipeline(transaction=False) as pipe:
                for i in pending:
                    request = requests[i]
                    keys = self._keys(request.key).all()
                    args = self._append_args(request.lease, request.events)
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                with _translated("append_batch"):
                    replies = await pipe.execute(raise_on_error=False)
            missing: list[int] = []
            for i, reply in zip(pending, replies, strict=True):
                request = requests[i]
                if isinstance(reply, rx.NoScriptError) and not resend:
                    missing.append(i)
                elif isinstance(reply, Exception):
                    error = StoreError(f"redis failed (append_batch): {reply}")
                    error.__cause__ = reply
                    results[i] = error
                else:
                    results[i] = self._append_result(reply, request.key, request.lease)
            if not missing:
                break
            pending = missing
        return [r if r is not None else StoreError("no reply") for r in results]

    async def read(self, key: RunKey, *, after: int = 0, limit: int = 512) -> list[LoggedEvent]:
        self._check_open()
        if limit <= 0:
            return []
        start = min(max(after, 0), _MAX_SEQ) + 1
        with _translated("read"):
            entries: Any = await self._client.xrange(
                self._keys(key).log, min=f"0-{start}", max="+", count=limit
            )
        return [self._logged(entry_id, fields) for entry_id, fields in entries]

    async def follow(
        self, key: RunKey, *, after: int, block_ms: int, limit: int = 512
    ) -> list[LoggedEvent]:
        self._check_open()
        if block_ms <= 0 or limit <= 0:
            return await self.read(key, after=after, limit=limit)
        keys = self._keys(key)
        after = min(max(after, 0), _MAX_SEQ)
        with _translated("follow"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xrange(keys.log, min=f"0-{after + 1}", max="+", count=limit)
                pipe.hget(keys.run, k.STATUS)
                entries, status = await pipe.execute()
        if entries or status != RunStatus.RUNNING.value.encode():
            # Something to return, or nothing will ever come: no run, or a finished one.
            return [self._logged(entry_id, fields) for entry_id, fields in entries]
        block = block_ms if self._max_block_ms is None else min(block_ms, self._max_block_ms)
        with _translated("follow"):
            # An explicit id, not `$`: whatever was appended since the look above is returned
            # at once, so no event can slip between the look and the block.
            reply = await self._blocking_client.xread(
                {keys.log: f"0-{after}"}, count=limit, block=block
            )
        return [self._logged(entry_id, fields) for entry_id, fields in _xread_entries(reply)]

    async def renew(self, key: RunKey, lease: Lease, *, lease_ms: int) -> RenewResult:
        reply = await self._call(
            self._scripts.renew,
            "renew",
            [self._keys(key).run],
            [*self._lease_args(lease), str(int(lease_ms)).encode()],
        )
        _, cancel_requested, expires_at = self._fenced(reply, key, lease)
        await self._index("renew", key, int(expires_at))
        return RenewResult(cancel_requested=cancel_requested == b"1")

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
        )
        self._fenced(reply, key, lease)

    async def restart(self, key: RunKey, lease: Lease) -> int:
        reply = await self._call(
            self._scripts.restart,
            "restart",
            [self._keys(key).run],
            [*self._lease_args(lease), secrets.token_hex(12).encode()],
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
    ) -> int:
        self._check_open()
        if not status.finished or not terminal.terminal:
            raise ValueError("finish() takes a terminal status and a terminal event")
        reply = await self._call(
            self._scripts.finish,
            "finish",
            self._keys(key).all(),
            [
                *self._lease_args(lease),
                status.value.encode(),
                _text(terminal.event_id),
                _text(terminal.type),
                terminal.data,
                b"0" if final_text is None else b"1",
                b"" if final_text is None else _text(final_text),
                str(self.retention_ms).encode(),
            ],
        )
        seq = int(self._fenced(reply, key, lease)[1])
        await self._index("finish", key, None)
        return seq

    async def release(self, key: RunKey, lease: Lease) -> None:
        released = await self._call(
            self._scripts.release, "release", [self._keys(key).run], self._lease_args(lease)
        )
        if released:
            # Expiry 0, as in the run hash: lapsed since forever, first in the sweeper's line.
            await self._index("release", key, 0)

    async def claim(self, key: RunKey, *, holder: str, lease_ms: int) -> BeginResult | None:
        reply = await self._call(
            self._scripts.claim,
            "claim",
            [self._keys(key).run],
            [_text(holder), str(int(lease_ms)).encode(), secrets.token_hex(12).encode()],
        )
        if reply[0] == b"none":
            # Most likely the sweeper following a stale index entry of an expired run.
            await self._index("claim", key, None)
            return None
        outcome = BeginOutcome(_str(reply[0]))
        record = self._record(key, reply[2], int(reply[1]))
        if outcome is BeginOutcome.COMPLETED:
            await self._index("claim", key, None)
            return BeginResult(outcome, record, None)
        if outcome is BeginOutcome.TAKEOVER:
            await self._index("claim", key, record.lease_expires_at_ms)
            return BeginResult(outcome, record, Lease(holder, record.lease_token))
        return BeginResult(outcome, record, None)

    async def lapsed_runs(self, *, limit: int = 100) -> list[RunKey]:
        if limit <= 0:
            return []  # ZRANGEBYSCORE reads LIMIT 0 -1 as "no limit"
        reply = await self._call(
            self._scripts.lapsed_runs, "lapsed_runs", [self._leases], [str(int(limit)).encode()]
        )
        # One page: entries dropped as stale make the answer shorter than `limit` this once;
        # they are gone by the next call.
        return await self._checked_candidates(list(reply[1]), int(reply[0]))

    async def get_run(self, key: RunKey) -> RunRecord | None:
        reply = await self._call(self._scripts.get_run, "get_run", [self._keys(key).run], [])
        if not reply[1]:
            return None
        return self._record(key, reply[1], int(reply[0]))

    async def ping(self) -> None:
        self._check_open()
        with _translated("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        owned, self._owned = self._owned, ()
        for client in owned:
            await client.aclose()


def _xread_entries(reply: Any) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
    """The entries of a one-stream XREAD reply, whatever shape redis-py parsed it into.

    RESP2 gives ``[[stream, entries]]``; RESP3 a dict, whose value redis-py's legacy RESP3
    parser wraps in one more list. Entries themselves are always ``(id, fields)`` tuples.
    """
    if not reply:
        return []
    entries: Any = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if entries and isinstance(entries[0], list):
        entries = entries[0]
    return list(entries)
