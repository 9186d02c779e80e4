"""Zombies: an owner SIGSTOPped past its lease, taken over, then continued."""

from __future__ import annotations

import asyncio
import random
import time

from .._check import LoggedTurn, read_turn, witness_counts
from .._client import TurnClient
from .._cluster import PREFIX, Cluster
from .._scenario import (
    Router,
    ScenarioResult,
    judge,
    make_specs,
    new_tenant,
    settle,
)
from ._shared import MODES


async def _wait_takeover(
    cluster: Cluster, tenant: str, ids: list[str], zombie_pid: int, within_s: float
) -> bool:
    """Until every run is finished or leased (live) by a process other than the zombie."""
    deadline = time.monotonic() + within_s

    def taken() -> bool:
        now = cluster.redis_time_ms()
        for execution_id in ids:
            run = read_turn(cluster.redis_client(), PREFIX, tenant, execution_id).run
            if run.get("status") not in (None, "running"):
                continue
            holder_pid = cluster.pid_of_holder(run.get("lease_holder"))
            live = int(run.get("lease_expires_at", "0")) > now
            if holder_pid is None or holder_pid == zombie_pid or not live:
                return False
        return True

    while time.monotonic() < deadline:
        if await asyncio.to_thread(taken):
            return True
        await asyncio.sleep(0.02)
    return False


async def _persisted(cluster: Cluster, ids: list[str], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        counts = witness_counts(cluster.persist_file)
        if all(counts[i] for i in ids):
            return
        await asyncio.sleep(0.05)


def _changes(before: LoggedTurn, after: LoggedTurn) -> str:
    """What differs between two looks at a finished run ("" when nothing)."""
    out = []
    if before.entries != after.entries:
        out.append(f"log {len(before.entries)} -> {len(after.entries)} events")
    for name in sorted(set(before.run) | set(after.run)):
        if before.run.get(name) != after.run.get(name):
            out.append(f"{name}: {before.run.get(name)!r} -> {after.run.get(name)!r}")
    return "; ".join(out)


def _snapshot(cluster: Cluster, tenant: str, ids: list[str]) -> dict[str, LoggedTurn]:
    return {i: read_turn(cluster.redis_client(), PREFIX, tenant, i) for i in ids}


async def zombies(
    cluster: Cluster,
    rng: random.Random,
    *,
    count: int,
    lease_ms: int = 800,
) -> ScenarioResult:
    result = ScenarioResult(
        "zombies",
        "owner SIGSTOPped past its lease, taken over, then SIGCONTed",
        restarts_allowed=True,
    )
    started = time.monotonic()
    tenant = new_tenant("zombies")
    lease_s = lease_ms / 1000
    for trial in range(count):
        a, b = await asyncio.to_thread(cluster.ensure_pair, lease_ms=lease_ms)
        owner, other = (a, b) if rng.random() < 0.5 else (b, a)
        mode = rng.choice(MODES)
        late = rng.random() < 0.5  # continue the zombie after the turn ended, or in its middle
        specs = make_specs(
            rng, tenant, f"z{trial}", rng.randint(1, 2), tokens=30, delay_ms=20,
            modes=(mode,), formats=("ndjson", "sse"),
        )
        router = Router(owner, other)
        clients = [
            TurnClient(s, router.pick, rng, repost=0.5, idle_s=10, deadline_s=25) for s in specs
        ]
        ids = [c.execution_id for c in clients]
        zombie_pid = owner.pid
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            for client in clients:
                await client.wait_for(rng.randint(2, 8), 10)
            owner.pause()
            router.switch()
            for client in clients:
                client.interrupt()  # the user gives up on the frozen tab and reloads
            taken = await _wait_takeover(cluster, tenant, ids, zombie_pid, 3 * lease_s + 10)
            result.fault("SIGSTOP past the lease", taken)
            before: dict[str, LoggedTurn] | None = None
            if late:
                await asyncio.gather(*tasks)
                await settle(cluster, tenant, ids, 3 * lease_s + 5)
                # The legitimate owner's post hooks may still mark the run: let them finish.
                await _persisted(cluster, ids, 3.0)
                await asyncio.sleep(0.3)
                before = await asyncio.to_thread(_snapshot, cluster, tenant, ids)
            owner.resume()
            # The zombie's heartbeat and its pumps' buffered work run now: give it several
            # heartbeats to try to write.
            await asyncio.sleep(4 * lease_s / 3 + 0.3)
            await asyncio.gather(*tasks)
        finally:
            if owner.stopped and owner.alive:
                owner.resume()
            for task in tasks:
                task.cancel()
        await settle(cluster, tenant, ids, 3 * lease_s + 5)
        await judge(cluster, result, tenant, clients)
        after = await asyncio.to_thread(_snapshot, cluster, tenant, ids)
        for execution_id in ids:
            turn = after[execution_id]
            if cluster.pid_of_holder(turn.run.get("finished_by")) == zombie_pid:
                result.other["zombie"] += 1
                result.example(f"{execution_id}: finished by the zombie", kind="zombie")
            if before is not None:
                changed = _changes(before[execution_id], turn)
                if changed:
                    result.other["zombie"] += 1
                    text = f"{execution_id}: changed after the zombie woke: {changed}"
                    result.example(text, kind="zombie")
        if not owner.alive:
            result.other["zombie crashed"] += 1
    result.seconds = time.monotonic() - started
    return result
