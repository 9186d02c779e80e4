"""The Lua scripts of the Redis store: loaded once per client, sent one by one or pipelined."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.commands.core import AsyncScript

from ._codec import translated

__all__ = ["Scripts", "evalsha_pipelined"]

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


async def evalsha_pipelined(
    client: aioredis.Redis,
    script: AsyncScript,
    calls: Sequence[tuple[Sequence[bytes], Sequence[bytes]]],
    operation: str,
) -> list[Any]:
    """Run ``script`` once per ``(keys, args)`` in one non-transactional pipeline: one round
    trip, each call atomic on its own. A reply is the script's answer or the redis-py error
    of that call alone.

    Not registered with the pipeline on purpose: redis-py would then send SCRIPT EXISTS first,
    a second round trip on every batch. NOSCRIPT is rare (a restarted or flushed server), so
    it is handled after the fact: load the script, resend those calls.
    """
    replies: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    for resend in (False, True):
        if resend:
            with translated(operation):
                script.sha = await client.script_load(script.script)
        async with client.pipeline(transaction=False) as pipe:
            for i in pending:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            with translated(operation):
                answers = await pipe.execute(raise_on_error=False)
        missing: list[int] = []
        for i, answer in zip(pending, answers, strict=True):
            if isinstance(answer, rx.NoScriptError) and not resend:
                missing.append(i)
            else:
                replies[i] = answer
        if not missing:
            break
        pending = missing
    return replies
