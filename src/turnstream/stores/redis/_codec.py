"""What crosses between redis-py and the store: text encoding, error translation, records.

Pure helpers with no connection of their own, shared by the store and its sweeper indexes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import orjson
from redis import exceptions as rx

from ..._events import LoggedEvent, fast_logged_event
from ..._exceptions import StoreError, StoreUnavailable
from ..._store import RunKey, RunRecord, RunStatus
from . import _keys as k

__all__ = ["as_str", "as_text", "logged_event", "run_record", "translated"]


def as_text(value: str) -> bytes:
    # surrogatepass: any Python str round-trips, as it does through MemoryStore.
    return value.encode("utf-8", "surrogatepass")


def as_str(value: bytes) -> str:
    return value.decode("utf-8", "surrogatepass")


@contextmanager
def translated(operation: str) -> Iterator[None]:
    """redis-py errors become the store's own, at the boundary (STYLE: translate there)."""
    try:
        yield
    except (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, OSError) as exc:
        # ReadOnlyError: a failover is under way and a replica answered; worth a retry.
        # ConnectionError also covers a pool that had no connection free in time.
        raise StoreUnavailable(f"redis is unavailable ({operation}): {exc}") from exc
    except rx.RedisError as exc:
        raise StoreError(f"redis failed ({operation}): {exc}") from exc


def run_record(key: RunKey, flat: Sequence[bytes], now_ms: int) -> RunRecord:
    """The record of a run from its hash's ``HGETALL`` (flat), judged at the server's ``now``."""
    try:
        return _parse_record(key, dict(zip(flat[::2], flat[1::2], strict=True)), now_ms)
    except (KeyError, ValueError) as exc:
        # Not written by these scripts (another tool under the same prefix?): a store
        # failure, not a reason to crash the caller with a KeyError.
        raise StoreError(f"malformed run record for {key.execution_id}: {exc!r}") from exc


def _parse_record(key: RunKey, fields: dict[bytes, bytes], now_ms: int) -> RunRecord:
    holder = fields.get(k.LEASE_HOLDER)
    expires_at = int(fields.get(k.LEASE_EXPIRES_AT, b"0"))
    handle = fields.get(k.HANDLE)
    final_text = fields.get(k.FINAL_TEXT)
    finished_at = fields.get(k.FINISHED_AT)
    return RunRecord(
        key=key,
        status=RunStatus(as_str(fields[k.STATUS])),
        input_hash=as_str(fields[k.INPUT_HASH]),
        user_id=as_str(fields[k.USER_ID]),
        attempt=int(fields[k.ATTEMPT]),
        last_seq=int(fields[k.LAST_SEQ]),
        lease_holder=None if holder is None else as_str(holder),
        lease_token=int(fields[k.LEASE_TOKEN]),
        lease_expires_at_ms=expires_at,
        lease_live=holder is not None and expires_at > now_ms,
        cancel_requested=fields.get(k.CANCEL_REQUESTED) == b"1",
        handle=None if handle is None else orjson.loads(handle),
        final_text=None if final_text is None else as_str(final_text),
        created_at_ms=int(fields[k.CREATED_AT]),
        finished_at_ms=None if finished_at is None else int(finished_at),
        persist_pending=fields.get(k.PERSIST) == b"pending",
        observed_at_ms=now_ms,
    )


def logged_event(entry_id: bytes, fields: Mapping[bytes, bytes]) -> LoggedEvent:
    return fast_logged_event(
        int(entry_id.partition(b"-")[2]),
        as_str(fields[k.ENTRY_EVENT_ID]),
        as_str(fields[k.ENTRY_TYPE]),
        fields[k.ENTRY_DATA],
    )
