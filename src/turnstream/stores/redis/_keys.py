"""Key templates and field names of the Redis layout (DESIGN §7), in one place.

Every key of one run carries the same hash tag ``{<RunKey.tag>}`` so that each Lua script,
which touches all of them, stays within one cluster slot. The tag may hold any character but
``{`` and ``}``; even a stray ``}`` inside it would keep the keys together, because the slot
is computed from the first ``{…}`` and that part is common to all keys of the run. The
prefix, which comes first, must not hold a brace at all: that would move the tag.

The ``.lua`` scripts spell the hash and entry field names below literally (Lua has no
imports); change them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..._store import RunKey

__all__ = ["RunKeys", "check_prefix", "run_keys"]

DEFAULT_PREFIX: Final = "turnstream"

RUN_KEY: Final = "{prefix}:{{{tag}}}:run"  # hash: the run's record and lease
LOG_KEY: Final = "{prefix}:{{{tag}}}:log"  # stream: entry id 0-<seq>, fields below
IDS_KEY: Final = "{prefix}:{{{tag}}}:ids"  # hash: eventId -> seq (dedup), dropped on finish

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
# Only for retry-safety of begin and restart (see begin.lua / restart.lua).
BEGIN_ID: Final = b"begin_id"
BEGIN_OUTCOME: Final = b"begin_outcome"
RESTART_ID: Final = b"restart_id"


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


def run_keys(prefix: str, key: RunKey) -> RunKeys:
    tag = key.tag
    return RunKeys(
        run=RUN_KEY.format(prefix=prefix, tag=tag).encode(),
        log=LOG_KEY.format(prefix=prefix, tag=tag).encode(),
        ids=IDS_KEY.format(prefix=prefix, tag=tag).encode(),
    )
