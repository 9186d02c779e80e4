"""Stalls longer than the lease: the fault proxy holds every byte, or ``CLIENT PAUSE``."""

from __future__ import annotations

import asyncio
import random
import time

from .._check import Verdict
from .._client import TurnClient
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

# RedisSettings' default socket timeout: a long stall outlasts it, so commands time out too.
SOCKET_TIMEOUT_S = 5.0
# "proxy": both workers cut off; "one": only the worker that owns the first client's turn
# (the other may take its turns over); "pause": CLIENT PAUSE (Redis itself answers nobody).
STALL_KINDS = (
    ("proxy", "short"),
    ("one", "short"),
    ("pause", "short"),
    ("proxy", "long"),
    ("one", "long"),
    ("pause", "long"),
)


async def _stall(
    cluster: Cluster,
    rng: random.Random,
    first: TurnClient,
    kind: str,
    stall_s: float,
    result: ScenarioResult,
    started: list[float],
) -> None:
    await first.wait_for(rng.randint(2, 6), 10)
    started.append(time.monotonic())
    if kind == "proxy":
        for proxy in cluster.proxies:
            proxy.stall_for(stall_s)
    elif kind == "one":
        cluster.proxy.stall_for(stall_s)  # worker a, where the first client's turn runs
    else:
        await asyncio.to_thread(cluster.redis.client_pause, int(stall_s * 1000))
    long = stall_s > SOCKET_TIMEOUT_S
    result.fault(f"{kind} stall {'past the socket timeout' if long else 'of 2+ leases'}", True)


async def stalls(
    cluster: Cluster,
    rng: random.Random,
    *,
    count: int,
    lease_ms: int = 1000,
    kinds: tuple[tuple[str, str], ...] = STALL_KINDS,
) -> ScenarioResult:
    result = ScenarioResult(
        "stalls", "Redis unreachable (proxy stall / CLIENT PAUSE) for longer than the lease"
    )
    started = time.monotonic()

    def allow_store_unavailable(verdict: Verdict) -> None:
        # The one ending allowed besides completed: failed, in-band, with store_unavailable.
        if "failed" in verdict.problems and verdict.error_code == "store_unavailable":
            del verdict.problems["failed"]
            result.fault_counts["turns failed with store_unavailable (allowed)"] += 1

    tenant = new_tenant("stalls")
    lease_s = lease_ms / 1000
    for trial in range(count):
        kind, length = kinds[trial % len(kinds)]
        a, b = await asyncio.to_thread(cluster.ensure_pair, lease_ms=lease_ms)
        stall_s = 2 * lease_s + rng.uniform(0.1, 0.6)
        if length == "long":
            stall_s += SOCKET_TIMEOUT_S  # past the store's socket timeout too
        bound_s = stall_s + 2 * lease_s + 5  # a reader hears something by then, or it hangs
        specs = make_specs(
            rng, tenant, f"s{trial}", 4, tokens=40, delay_ms=25, modes=MODES,
            formats=("ndjson", "sse"),
        )
        routers = [Router(a, b), Router(b, a)]
        clients = [
            TurnClient(
                s, routers[i % 2].pick, rng, repost=0.0, stop_on_error=True,
                idle_s=bound_s + 1, deadline_s=bound_s + 20,
            )
            for i, s in enumerate(specs)
        ]
        stall_started: list[float] = []
        await run_clients(
            clients, _stall(cluster, rng, clients[0], kind, stall_s, result, stall_started)
        )
        stalled_at = stall_started[0] if stall_started else time.monotonic()
        for client in clients:
            waited = client.ended_at - max(stalled_at, client.started)
            if not client.done and (waited > bound_s or "nothing for" in client.outcome):
                result.other["hung reader"] += 1
                result.example(f"{client.execution_id}: hung {waited:.1f} s ({kind})", kind="hung")
        ids = [c.execution_id for c in clients]
        await settle(cluster, tenant, ids, stall_s + 3 * lease_s + 5)
        # Whoever stopped at an in-band error reads the rest now (resume GETs only).
        await asyncio.gather(
            *(c.read_rest(requests=3, deadline_s=10) for c in clients if not c.done)
        )
        await judge(cluster, result, tenant, clients, amend=allow_store_unavailable)
    result.notes.append(f"proxies: {cluster.proxy_stats()}")
    result.seconds = time.monotonic() - started
    return result
