"""Many concurrent turns on one worker, on a real Redis, with small bounded pools.

The regression this guards: past ~100 concurrent turns every turn in flight died, because
redis-py's default pool (100 connections) raised at once when full and the heartbeat, the
blocked readers and the appends all drew from it. Now the pumps' writes have a pool of their
own, renewals are one batch, remote readers share a few blocking connections, and a full pool
waits instead of failing.
"""

from __future__ import annotations

import uuid

import anyio
import pytest

from tests._helpers import WordProducer, collect, ndjson, text_of
from turnstream import RedisStore, Supervisor, TurnIdentity, handle_chat_turn

pytestmark = pytest.mark.redis

TURNS = 300


async def test_hundreds_of_turns_and_remote_readers_on_tiny_pools(redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    small = {"max_connections": 4, "write_connections": 2, "follow_connections": 2}
    owner_store = RedisStore.from_url(url, prefix=prefix, **small)
    reader_store = RedisStore.from_url(url, prefix=prefix, **small)
    producer = WordProducer(words=10, delay=0.05)
    outcomes: dict[str, list[str]] = {"owner": [], "remote": []}
    try:
        async with (
            Supervisor(owner_store, lease_ms=600) as owner,
            Supervisor(reader_store, lease_ms=600) as elsewhere,
        ):

            async def turn(n: int) -> None:
                identity = TurnIdentity("t", "p", f"s{n}", "u", 0)
                mine = await handle_chat_turn(
                    identity, {"n": n}, supervisor=owner, produce=producer
                )
                # The same turn read from another worker: it follows the log on Redis.
                theirs = await handle_chat_turn(
                    identity, {"n": n}, supervisor=elsewhere, produce=producer
                )
                for name, result in (("owner", mine), ("remote", theirs)):
                    events = ndjson(await collect(result))
                    ok = (
                        [e["seq"] for e in events] == list(range(1, len(events) + 1))
                        and events[-1]["type"] == "session.run.completed"
                        and text_of(events) == producer.expected_text()
                    )
                    outcomes[name].append("ok" if ok else repr(events[-2:]))

            with anyio.fail_after(50):
                async with anyio.create_task_group() as tg:
                    for n in range(TURNS):
                        tg.start_soon(turn, n)
    finally:
        await owner_store.aclose()
        await reader_store.aclose()
    for name, results in outcomes.items():
        failed = [r for r in results if r != "ok"]
        assert len(results) == TURNS and not failed, (name, len(failed), failed[:3])
    assert producer.calls == TURNS
