"""Redis restarts: kill -9 mid-turn and back on its AOF, for less than a lease."""

from __future__ import annotations

import asyncio
import random
import time

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


async def _restart_redis(
    cluster: Cluster, rng: random.Random, first: TurnClient, down_s: float, result: ScenarioResult
) -> None:
    await first.wait_for(rng.randint(2, 12), 10)
    await asyncio.to_thread(cluster.redis.restart, down_s)
    cluster.reset_redis_client()
    result.fault("kill -9 + AOF restart", True)


async def redis_restarts(
    cluster: Cluster,
    rng: random.Random,
    *,
    count: int,
    lease_ms: int = 1500,
    down_s: float = 0.5,
    formats: tuple[str, ...] = FORMATS,
) -> ScenarioResult:
    result = ScenarioResult(
        "redis restarts", f"redis-server kill -9, down {down_s} s, restarted on its AOF"
    )
    started = time.monotonic()
    tenant = new_tenant("restarts")
    for trial in range(count):
        a, b = await asyncio.to_thread(cluster.ensure_pair, lease_ms=lease_ms)
        specs = make_specs(
            rng, tenant, f"x{trial}", 4, tokens=40, delay_ms=25, modes=MODES, formats=formats
        )
        routers = [Router(a, b), Router(b, a)]
        clients = [
            TurnClient(s, routers[i % 2].pick, rng, repost=0.3, idle_s=10, deadline_s=20)
            for i, s in enumerate(specs)
        ]
        await run_clients(clients, _restart_redis(cluster, rng, clients[0], down_s, result))
        await settle(cluster, tenant, [c.execution_id for c in clients], 3 * lease_ms / 1000 + 5)
        await judge(cluster, result, tenant, clients)
    result.notes.append(f"proxies: {cluster.proxy_stats()}")
    result.seconds = time.monotonic() - started
    return result
