"""The sweeper's indexes beside the runs: which runs lapsed, which await persistence.

Three sorted sets (see ``_keys``): re-attachable leases, local leases, pending persistence.
They span every run, so no run script can write them (one cluster slot per script): the
client updates them after the run script answered, never atomically with it. Two updates of
one run's entry may land in the other order (a heartbeat's ZADD after the finish's ZREM), and
a client that dies in between leaves an entry behind. Hence every answer is checked against
the run hashes, which are the truth; a stale entry is mended or dropped there, and every
lease write rewrites its run's entry. A stale entry costs a check, never a wrong takeover:
``claim`` and ``claim_persist`` decide by the hash.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from ..._store import RunKey, RunStatus
from . import _keys as k
from ._codec import translated
from ._keys import leases_key, local_leases_key, persists_key, run_key_from_tag, run_keys

__all__ = ["SweepIndex"]

logger = logging.getLogger("turnstream.store.redis")

_RUNNING = RunStatus.RUNNING.value.encode()

CallScript = Callable[[AsyncScript, str, Sequence[bytes], Sequence[Any]], Awaitable[Any]]


@dataclass
class _Mend:
    """Index edits decided while checking candidates, sent in one pipeline."""

    drop: dict[bytes, list[bytes]] = field(default_factory=dict)  # index -> members
    score: dict[bytes, dict[bytes, int]] = field(default_factory=dict)  # index -> scores
    # Scores of entries that stay where they are: XX, so a check that raced with a finish's
    # ZREM never brings the entry back.
    rescore: dict[bytes, dict[bytes, int]] = field(default_factory=dict)

    def remove(self, index: bytes, member: bytes) -> None:
        self.drop.setdefault(index, []).append(member)

    def put(self, index: bytes, member: bytes, score: int) -> None:
        self.score.setdefault(index, {})[member] = score

    def keep(self, index: bytes, member: bytes, score: int) -> None:
        self.rescore.setdefault(index, {})[member] = score

    def __bool__(self) -> bool:
        return bool(self.drop or self.score or self.rescore)


class SweepIndex:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self.reconnectable = leases_key(prefix)
        self.local = local_leases_key(prefix)
        self.persists = persists_key(prefix)

    # -- writes (never raise: the run write they follow has landed) -----------------------

    async def leased(self, operation: str, entries: Sequence[tuple[RunKey, int, bool]]) -> None:
        """Record lease expiries: ``(key, expires_at_ms, reconnectable)`` per run."""
        if not entries:
            return
        mend = _Mend()
        for key, expires_at_ms, reconnectable in entries:
            member = key.tag.encode()
            into, other = (
                (self.reconnectable, self.local)
                if reconnectable
                else (self.local, self.reconnectable)
            )
            mend.put(into, member, expires_at_ms)
            mend.remove(other, member)
        await self._send(mend, operation, entries[0][0])

    async def finished(self, operation: str, key: RunKey, persist_due_ms: int | None) -> None:
        """The run finished: out of the lease indexes; into the persistence one if pending."""
        member = key.tag.encode()
        mend = _Mend()
        mend.remove(self.reconnectable, member)
        mend.remove(self.local, member)
        if persist_due_ms:
            mend.put(self.persists, member, persist_due_ms)
        await self._send(mend, operation, key)

    async def forget(self, operation: str, key: RunKey) -> None:
        """The run is gone: out of every index."""
        member = key.tag.encode()
        mend = _Mend()
        for index in (self.reconnectable, self.local, self.persists):
            mend.remove(index, member)
        await self._send(mend, operation, key)

    async def persist_due(self, operation: str, key: RunKey, due_ms: int | None) -> None:
        """A pending persistence is due again at ``due_ms`` (None: no longer pending)."""
        mend = _Mend()
        if due_ms is None:
            mend.remove(self.persists, key.tag.encode())
        else:
            mend.put(self.persists, key.tag.encode(), due_ms)
        await self._send(mend, operation, key)

    async def _send(self, mend: _Mend, operation: str, key: RunKey | None) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for index, members in mend.drop.items():
                    pipe.zrem(index, *members)
                for index, scores in mend.score.items():
                    pipe.zadd(index, dict(scores))
                for index, scores in mend.rescore.items():
                    pipe.zadd(index, dict(scores), xx=True)
                await pipe.execute()
        except Exception:
            # Broad on purpose, see the module docstring: the next lease write of this run
            # rewrites its entry, and its next request finds it anyway.
            logger.warning(
                "sweeper index not updated after %s of %s",
                operation,
                key.execution_id if key is not None else "several runs",
                exc_info=True,
            )

    # -- reads -----------------------------------------------------------------------------

    async def lapsed(
        self, call: CallScript, script: AsyncScript, *, limit: int, local_after_ms: int | None
    ) -> list[RunKey]:
        """Re-attachable runs whose lease lapsed, then (with ``local_after_ms``) local runs
        lapsed that long; each confirmed by its run hash."""
        now, members = await self._due(call, script, self.reconnectable, limit, 0)
        found = await self._check_leases(members, now, reconnectable=True, offset_ms=0)
        if local_after_ms is not None and len(found) < limit:
            now, members = await self._due(
                call, script, self.local, limit - len(found), local_after_ms
            )
            found += await self._check_leases(
                members, now, reconnectable=False, offset_ms=local_after_ms
            )
        return found

    async def pending_persists(
        self, call: CallScript, script: AsyncScript, *, limit: int
    ) -> list[RunKey]:
        now, members = await self._due(call, script, self.persists, limit, 0)
        parsed, mend = self._parse(members, self.persists)
        fields = (k.STATUS, k.PERSIST, k.PERSIST_DUE_AT)
        replies = await self._hmget([key for _, key in parsed], fields)
        found: list[RunKey] = []
        for (member, key), reply in zip(parsed, replies, strict=True):
            if isinstance(reply, Exception):
                continue  # not a run hash these scripts wrote: neither ours to take nor drop
            status, persist, due = reply
            if status is None or status == _RUNNING or persist != b"pending":
                mend.remove(self.persists, member)
            elif int(due or b"0") > now:
                mend.keep(self.persists, member, int(due))
            else:
                found.append(key)
        if mend:
            await self._send(mend, "pending_persists", None)
        return found

    async def _due(
        self, call: CallScript, script: AsyncScript, index: bytes, limit: int, offset_ms: int
    ) -> tuple[int, list[bytes]]:
        reply = await call(
            script, "sweep", [index], [str(int(limit)).encode(), str(int(offset_ms)).encode()]
        )
        return int(reply[0]), list(reply[1])

    def _parse(
        self, members: Sequence[bytes], index: bytes
    ) -> tuple[list[tuple[bytes, RunKey]], _Mend]:
        parsed: list[tuple[bytes, RunKey]] = []
        mend = _Mend()
        for member in members:
            try:
                parsed.append((member, run_key_from_tag(member)))
            except ValueError:
                mend.remove(index, member)  # foreign: no run tag at all
        return parsed, mend

    async def _hmget(self, keys: Sequence[RunKey], fields: Sequence[bytes]) -> list[Any]:
        if not keys:
            return []
        with translated("sweep"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(run_keys(self._prefix, key).run, *fields)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _check_leases(
        self, members: Sequence[bytes], now_ms: int, *, reconnectable: bool, offset_ms: int
    ) -> list[RunKey]:
        """The candidates whose run hash agrees; the others' entries mended or dropped.

        Gone or finished: dropped. Live again: its real expiry. In the wrong index (a handle
        was set, or a takeover restarted it locally): moved. A member that is no run tag at
        all is foreign and dropped.
        """
        index, other = (
            (self.reconnectable, self.local) if reconnectable else (self.local, self.reconnectable)
        )
        parsed, mend = self._parse(members, index)
        fields = (
            k.STATUS,
            k.LEASE_HOLDER,
            k.LEASE_EXPIRES_AT,
            k.HANDLE,
            k.PERSIST,
            k.PERSIST_DUE_AT,
        )
        replies = await self._hmget([key for _, key in parsed], fields)
        found: list[RunKey] = []
        for (member, key), reply in zip(parsed, replies, strict=True):
            if isinstance(reply, Exception):
                continue
            status, holder, expires_at, handle, persist, due = reply
            if status != _RUNNING:
                mend.remove(index, member)  # gone (None) or finished
                if status is not None and persist == b"pending":
                    # Finished by a client that died before it could list it: list it now.
                    mend.put(self.persists, member, int(due or b"0"))
                continue
            try:
                expiry = int(expires_at or b"0")
            except ValueError:
                continue
            if (handle is not None) != reconnectable:
                mend.remove(index, member)
                mend.put(other, member, expiry)
            elif holder is not None and expiry > now_ms - offset_ms:
                mend.keep(index, member, expiry)  # renewed since: not lapsed (long enough)
            else:
                found.append(key)
        if mend:
            await self._send(mend, "lapsed_runs", None)
        return found
