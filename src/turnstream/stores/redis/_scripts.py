"""The Lua scripts of the Redis store: loaded once per client, sent one by one or pipelined."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.commands.core import AsyncScript

from ..._events import NewEvent
from ._codec import translated

__all__ = ["Scripts", "evalsha_pipelined", "pack_append", "pack_evalsha"]

_PACKAGE: Final = __name__.rpartition(".")[0]


class Scripts:
    """Every script of ``lua/``, the shared prelude prepended, registered on ``client``."""

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
        self.claim_persist = load("claim_persist.lua")
        self.mark_persisted = load("mark_persisted.lua")


def _pack(args: Sequence[bytes]) -> bytes:
    """One command in RESP: ``*<n>`` then ``$<len>``/value pairs; every argument is bytes."""
    parts = [b"*%d\r\n" % len(args)]
    parts += [b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args]
    return b"".join(parts)


def _sha(script: AsyncScript) -> bytes:
    # redis-py computes the SHA1 of the script's text itself: it is the same before and after
    # a SCRIPT LOAD, so a command packed with it can be sent again as it is.
    sha = script.sha
    return sha.encode() if isinstance(sha, str) else bytes(sha)


def pack_evalsha(script: AsyncScript, keys: Sequence[bytes], args: Sequence[bytes]) -> bytes:
    """``EVALSHA <sha> <numkeys> keys… args…`` in RESP."""
    return _pack([b"EVALSHA", _sha(script), b"%d" % len(keys), *keys, *args])


_TYPES: dict[str, bytes] = {}  # event type -> its UTF-8 (a turn has a handful of types)


def _type_bytes(event_type: str) -> bytes:
    encoded = _TYPES.get(event_type)
    if encoded is None:
        encoded = event_type.encode("utf-8", "surrogatepass")
        if len(_TYPES) < 4096:
            _TYPES[event_type] = encoded
    return encoded


def pack_append(
    script: AsyncScript, keys: Sequence[bytes], head: Sequence[bytes], events: Sequence[NewEvent]
) -> bytes:
    """The append script's call: ``head`` (the lease) then id, type and data of each event.

    One formatting step per event instead of one per argument: packing was a tenth of a bulk
    turn's CPU when every argument went through :func:`_pack`.
    """
    prefix = [b"EVALSHA", _sha(script), b"%d" % len(keys), *keys, *head]
    parts = [b"*%d\r\n" % (len(prefix) + 3 * len(events))]
    parts += [b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in prefix]
    type_bytes = _type_bytes
    for event in events:
        event_id = event.event_id.encode("utf-8", "surrogatepass")
        event_type = type_bytes(event.type)
        data = event.data
        parts.append(
            b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
            % (len(event_id), event_id, len(event_type), event_type, len(data), data)
        )
    return b"".join(parts)


async def evalsha_pipelined(
    client: aioredis.Redis,
    script: AsyncScript,
    commands: Sequence[bytes],
    operation: str,
) -> list[Any]:
    """Send ``commands`` (each an ``EVALSHA`` of ``script``, packed by :func:`pack_evalsha`
    or :func:`pack_append`) back to back on one connection: one round trip, each call
    atomic on its own. A reply is the script's answer or the redis-py error of that call.

    Packed and read here rather than through a redis-py pipeline, which cost more than the
    rest of the append path (a third of a paced worker's CPU: its per-command bookkeeping,
    response callbacks and retry wrapper). A connection error is not retried here: every
    caller (the pump, the heartbeat) retries the whole call with its own backoff. NOSCRIPT
    (a restarted or flushed server) is handled after the fact: load the script, resend those.
    """
    replies: list[Any] = [None] * len(commands)
    pending = list(range(len(commands)))
    pool = client.connection_pool
    with translated(operation):
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            for resend in (False, True):
                if resend:
                    source = script.script
                    body = source.encode() if isinstance(source, str) else bytes(source)
                    await connection.send_packed_command(_pack([b"SCRIPT", b"LOAD", body]))
                    await connection.read_response()  # the same SHA1 the commands carry
                packed = b"".join([commands[i] for i in pending])
                await connection.send_packed_command(packed, check_health=not resend)
                missing: list[int] = []
                for i in pending:
                    try:
                        replies[i] = await connection.read_response()
                    except rx.NoScriptError as exc:
                        if resend:
                            replies[i] = exc
                        else:
                            missing.append(i)
                    except rx.ResponseError as exc:
                        replies[i] = exc  # this call's own error: the reply was read whole
                if not missing:
                    break
                pending = missing
        except BaseException:
            # A reply may be half read (a timeout, a cancel): the connection cannot be reused.
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)
    return replies
