"""Lost replies: a command lands, the fault proxy drops its reply and cuts the connection."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from importlib import resources

from .._client import FORMATS, TurnClient
from .._cluster import Cluster
from .._scenario import (
    Router,
    ScenarioResult,
    judge,
    make_specs,
    new_tenant,
    run_clients,
    settle,
)
from ._shared import MODES


def _script_sha(name: str) -> bytes | None:
    """The EVALSHA digest the store sends for one of its Lua scripts (prelude + file), or None
    when this build has no such script."""
    try:
        lua = resources.files("turnstream.stores.redis").joinpath("lua")
        text = lua.joinpath("_prelude.lua").read_text() + lua.joinpath(name).read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return None
    return hashlib.sha1(text.encode()).hexdigest().encode()


REPLY_TARGETS = ("append", "finish", "renew", "any")


async def _lose_reply(
    cluster: Cluster,
    rng: random.Random,
    first: TurnClient,
    target: str,
    matches: dict[str, bytes | None],
    outcome: list[bool],
) -> None:
    if target in ("append", "any"):
        await first.wait_for(rng.randint(1, 12), 10)
    done = cluster.proxy.swallow_next_reply(matches[target])
    fired = await asyncio.to_thread(done.wait, 5)
    if not fired:
        cluster.proxy.disarm()
    outcome.append(fired)


async def reply_losses(
    cluster: Cluster,
    rng: random.Random,
    *,
    count: int,
    lease_ms: int = 1500,
    formats: tuple[str, ...] = FORMATS,
) -> ScenarioResult:
    result = ScenarioResult(
        "reply losses", "a command lands, its reply is dropped and the connection cut"
    )
    started = time.monotonic()
    tenant = new_tenant("replies")
    renew_sha = _script_sha("renew.lua")
    if renew_sha is None:
        result.notes.append("no renew.lua in this build: renewals matched as 'any'")
    matches: dict[str, bytes | None] = {
        "append": b"text-delta",  # the batch carries the events' types
        "finish": b"session.run.completed",  # the terminal event rides with the finish
        "renew": renew_sha,
        "any": None,
    }
    attempts = 0
    while result.faults_fired < count and attempts < 2 * count + 5:
        target = REPLY_TARGETS[attempts % len(REPLY_TARGETS)]
        attempts += 1
        a, b = await asyncio.to_thread(cluster.ensure_pair, lease_ms=lease_ms)
        specs = make_specs(
            rng, tenant, f"r{attempts}", 3, tokens=40, delay_ms=20, modes=MODES, formats=formats
        )
        router = Router(a, b)
        clients = [
            TurnClient(s, router.pick, rng, repost=0.3, idle_s=10, deadline_s=20) for s in specs
        ]
        outcome: list[bool] = []
        await run_clients(clients, _lose_reply(cluster, rng, clients[0], target, matches, outcome))
        fired = bool(outcome and outcome[0])
        result.fault_counts[f"lost {target} reply {'fired' if fired else 'did not fire'}"] += 1
        if fired:
            result.faults_tried += 1
            result.faults_fired += 1
        await settle(cluster, tenant, [c.execution_id for c in clients], 3 * lease_ms / 1000 + 5)
        await judge(cluster, result, tenant, clients)
    if result.faults_fired < count:
        result.faults_tried = count  # some asked for never fired: report them as missed
    result.notes.append(f"proxies: {cluster.proxy_stats()}")
    result.seconds = time.monotonic() - started
    return result
