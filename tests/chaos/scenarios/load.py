"""Load: many concurrent turns on one worker."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from .._client import TurnClient
from .._cluster import Cluster
from .._scenario import (
    ScenarioResult,
    judge,
    make_specs,
    new_tenant,
    run_clients,
    settle,
)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    cluster: Cluster,
    rng: random.Random,
    *,
    turns: int,
    lease_ms: int = 1500,
    tokens: int = 20,
    delay_ms: int = 20,
) -> ScenarioResult:
    result = ScenarioResult(
        "load", f"{turns} concurrent turns on one worker ({tokens} tokens at {delay_ms} ms)"
    )
    started = time.monotonic()
    tenant = new_tenant("load")
    worker = cluster.workers[0]
    # Straight to Redis: the proxy runs in this process and must not be what is measured.
    await asyncio.to_thread(worker.start, lease_ms=lease_ms, direct=True)
    specs = make_specs(rng, tenant, "load", turns, tokens=tokens, delay_ms=delay_ms)

    async def pick(client: TurnClient) -> str | None:
        return worker.url if worker.alive else None

    deadline_s = 30 + 0.09 * turns  # generous: the slowest turn here waits for all the others
    clients = [
        TurnClient(s, pick, rng, repost=0.3, idle_s=30, deadline_s=deadline_s) for s in specs
    ]
    worker_cpu, own_cpu, t0 = _cpu_seconds(worker.pid), time.process_time(), time.monotonic()
    await run_clients(clients)
    wall = time.monotonic() - t0
    worker_cpu = _cpu_seconds(worker.pid) - worker_cpu
    own_cpu = time.process_time() - own_cpu
    await settle(cluster, tenant, [c.execution_id for c in clients], 10)
    await judge(cluster, result, tenant, clients, persist_wait_s=5)
    latencies = sorted(c.ended_at - c.started for c in clients)
    events = sum(len(c.received) for c in clients)
    first = sorted((c.first_event_at or c.ended_at) - c.started for c in clients)
    result.notes.append(
        f"{turns} turns, {events} events in {wall:.1f} s ({events / wall:.0f} events/s); "
        f"turn p50 {latencies[len(latencies) // 2]:.2f} s, p99 "
        f"{latencies[int(len(latencies) * 0.99) - 1]:.2f} s; first event p50 "
        f"{first[len(first) // 2]:.2f} s; CPU: worker {worker_cpu:.1f} s, "
        f"clients (this process) {own_cpu:.1f} s"
    )
    result.fault_counts["concurrent turns"] = turns
    await asyncio.to_thread(worker.stop)
    result.seconds = time.monotonic() - started
    return result
