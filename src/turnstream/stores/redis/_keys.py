"""Key templates and field names of the Redis layout (docs/configuration.md), in one place.

Every key of one run carries the same hash tag ``{<RunKey.tag>}`` so that each Lua script,
which touches all of them, stays within one cluster slot. The tag may hold any character but
``{`` and ``}``; even a stray ``}`` inside it would keep the keys together, because the slot
is computed from the first ``{…}`` and that part is common to all keys of the run. The
prefix, which comes first, must not hold a brace at all: that would move the tag.

Three keys are not a run's: the sweeper's indexes, sorted sets whose members are
:attr:`RunKey.tag` (parsed back by :func:`run_key_from_tag`):

* ``{prefix}:leases`` — unfinished runs with a run handle, scored by lease expiry (what the
  sweeper re-attaches, :meth:`RedisStore.lapsed_runs`);
* ``{prefix}:leases:local`` — unfinished runs without one (a local producer's), scored the
  same way (what the sweeper finishes as orphans once lapsed long enough); kept apart so a
  pile of them never hides a re-attachable run from the sweeper;
* ``{prefix}:persists`` — finished runs whose persistence hook has not confirmed, scored by
  when another worker may retry it.

They span every run, so they cannot share a run's slot; the client maintains them after each
run script, never inside one, and they are only indexes: the run hash is the truth.

The ``.lua`` scripts spell the hash and entry field names below literally (Lua has no
imports); change them together.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from ..._store import RunKey

__all__ = [
    "RunKeys",
    "check_prefix",
    "leases_key",
    "local_leases_key",
    "persists_key",
    "run_key_from_tag",
    "run_keys",
]

DEFAULT_PREFIX: Final = "turnstream"

RUN_KEY: Final = "{prefix}:{{{tag}}}:run"  # hash: the run's record and lease
LOG_KEY: Final = "{prefix}:{{{tag}}}:log"  # stream: entry id 0-<seq>, fields below
IDS_KEY: Final = "{prefix}:{{{tag}}}:ids"  # hash: eventId -> seq (dedup), dropped on finish
# Sorted set, member RunKey.tag, score the lease expiry (ms, server clock); not a run's key.
LEASES_KEY: Final = "{prefix}:leases"
LOCAL_LEASES_KEY: Final = "{prefix}:leases:local"  # the same, for runs without a handle
PERSISTS_KEY: Final = "{prefix}:persists"  # score: when a pending persistence is due

# Fields of a log entry: enough to rebuild a LoggedEvent, the seq being the entry id.
ENTRY_EVENT_ID: Final = b"i"
ENTRY_TYPE: Final = b"t"
ENTRY_DATA: Final = b"d"  # NewEvent.data verbatim: replays are byte-identical

# Fields of the run hash. Absent means None (a lease nobody holds, no handle…).
STATUS: Final = b"status"
INPUT_HASH: Final = b"input_hash"
USER_ID: Final = b"user_id"
ATTEMPT: Final = b"attempt"
LAST_SEQ: Final = b"last_seq"
LEASE_HOLDER: Final = b"lease_holder"
LEASE_TOKEN: Final = b"lease_token"
LEASE_EXPIRES_AT: Final = b"lease_expires_at"
CANCEL_REQUESTED: Final = b"cancel_requested"
HANDLE: Final = b"handle"  # JSON
FINAL_TEXT: Final = b"final_text"
CREATED_AT: Final = b"created_at"
FINISHED_AT: Final = b"finished_at"
FINISHED_BY: Final = b"finished_by"  # holder of the lease that finished it (same token)
# Only for retry-safety of begin, claim and restart (see begin.lua / claim.lua /
# restart.lua). begin_id is the request id of whichever begin or claim last granted the
# lease, so either one replaces the other's; restarted_by the fencing token of the lease
# that last restarted the run (once per lease).
BEGIN_ID: Final = b"begin_id"
BEGIN_OUTCOME: Final = b"begin_outcome"
RESTARTED_BY: Final = b"restarted_by"
# Persistence of a finished run: "pending" until mark_persisted ("done"); absent when the
# run had no persistence hook. persist_due_at: when another worker may retry it.
PERSIST: Final = b"persist"
PERSIST_DUE_AT: Final = b"persist_due_at"


@dataclass(frozen=True, slots=True)
class RunKeys:
    """The three keys of one run, in the order every script takes them as ``KEYS``."""

    run: bytes
    log: bytes
    ids: bytes

    def all(self) -> tuple[bytes, bytes, bytes]:
        return (self.run, self.log, self.ids)


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("the key prefix must be a non-empty string")
    if "{" in prefix or "}" in prefix:
        raise ValueError("the key prefix must not contain '{' or '}': it would move the hash tag")
    return prefix


@functools.lru_cache(maxsize=16384)
def run_keys(prefix: str, key: RunKey) -> RunKeys:
    # Cached: every append and renewal of a run needs its keys, and building them (quoting
    # the tenant, three formats) was a few percent of a busy worker's CPU.
    tag = key.tag
    return RunKeys(
        run=RUN_KEY.format(prefix=prefix, tag=tag).encode(),
        log=LOG_KEY.format(prefix=prefix, tag=tag).encode(),
        ids=IDS_KEY.format(prefix=prefix, tag=tag).encode(),
    )


def leases_key(prefix: str) -> bytes:
    return LEASES_KEY.format(prefix=prefix).encode()


def local_leases_key(prefix: str) -> bytes:
    return LOCAL_LEASES_KEY.format(prefix=prefix).encode()


def persists_key(prefix: str) -> bytes:
    return PERSISTS_KEY.format(prefix=prefix).encode()


# What `quote(tenant or user, safe="-._~")` can produce: unreserved characters and escapes.
_QUOTED: Final = re.compile(r"(?:[A-Za-z0-9\-._~]|%[0-9A-F]{2})*")


def run_key_from_tag(tag: bytes | str) -> RunKey:
    """The :class:`RunKey` whose :attr:`RunKey.tag` is ``tag``: its exact inverse.

    Strict, so that only a tag ``RunKey.tag`` could have written parses (anything else in the
    lease index is foreign): tenant and user must be percent-encoded exactly as ``tag`` does it
    (upper-case escapes, nothing escaped that need not be, valid UTF-8). Raises ``ValueError``.
    """
    text = tag.decode("utf-8") if isinstance(tag, bytes) else tag
    head, slash, execution_id = text.partition("/")
    quoted_tenant, at, quoted_user = head.partition("@")
    if (
        not slash
        or _QUOTED.fullmatch(quoted_tenant) is None
        or (at and _QUOTED.fullmatch(quoted_user) is None)
    ):
        raise ValueError(f"not a run tag: {text!r}")
    tenant_id = unquote(quoted_tenant, errors="strict")
    user_id = unquote(quoted_user, errors="strict") if at else None
    key = RunKey(tenant_id, execution_id, user_id)
    if key.tag != text:  # e.g. "%41" for "A": a spelling RunKey.tag never writes
        raise ValueError(f"not a canonical run tag: {text!r}")
    return key
