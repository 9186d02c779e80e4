"""Kills at named fault points: a worker SIGKILLs itself where ``TURNSTREAM_FAULTS`` says."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from .._check import Verdict
from .._client import FORMATS, TurnClient
from .._cluster import PERSIST_AFTER_MS, Cluster
from .._scenario import (
    Router,
    ScenarioResult,
    judge,
    make_specs,
    new_tenant,
    run_clients,
    settle,
)
from ._shared import LOCAL, MODES, SUBSTRATE, died_by_sigkill, wait_dead

RANDOM_KILL = "sigkill@random"

# Points a turn passes on its way, per mode, where the victim dies during its own turns.
DIRECT_POINTS = {
    LOCAL: (
        "pump.before_append",
        "pump.after_append",
        "pump.before_finish",
        "pump.after_finish",
        "hooks.after_persist",
    ),
    SUBSTRATE: (
        "pump.after_handle",
        "pump.before_append",
        "pump.after_append",
        "pump.before_finish",
        "pump.after_finish",
        "hooks.after_persist",
    ),
}
# Points only a takeover passes: the victim dies while taking over turns an earlier death
# orphaned (a local restart; the sweeper's claim of a reconnectable run).
FEED_POINTS = {LOCAL: "pump.after_restart", SUBSTRATE: "sweeper.after_claim"}
ALL_POINTS = frozenset({*DIRECT_POINTS[LOCAL], *DIRECT_POINTS[SUBSTRATE], *FEED_POINTS.values()})


def _known_fault_points() -> frozenset[str]:
    """The fault points this build of turnstream has (none before they were added)."""
    try:
        from turnstream.testing import FAULT_POINTS
    except ImportError:
        return frozenset()
    return frozenset(FAULT_POINTS)


@dataclass(frozen=True)
class KillPlan:
    mode: str
    point: str  # a fault point, or RANDOM_KILL (the harness kills at a random moment)
    feed: bool = False

    @property
    def named_kills(self) -> int:
        return 0 if self.point == RANDOM_KILL else 2 if self.feed else 1


def kill_schedule(
    rng: random.Random, kills: int, *, random_kills: bool = True, named: bool = True
) -> list[KillPlan]:
    """Rounds until ``kills`` named kills are planned; every (mode, point) in turn, shuffled.
    Without ``named`` (a build with no fault points): ``kills`` kills at random moments."""
    if not named:
        return [KillPlan(MODES[i % len(MODES)], RANDOM_KILL) for i in range(kills)]
    combos = [KillPlan(m, p) for m in MODES for p in DIRECT_POINTS[m]]
    combos += [KillPlan(m, FEED_POINTS[m], feed=True) for m in MODES]
    if random_kills:
        combos += [KillPlan(m, RANDOM_KILL) for m in MODES]
    plans: list[KillPlan] = []
    planned = 0
    while planned < kills:
        cycle = list(combos)
        rng.shuffle(cycle)
        for plan in cycle:
            plans.append(plan)
            planned += plan.named_kills
            if planned >= kills:
                break
    return plans


KILL_TOKENS = 16
KILL_DELAY_MS = 20


def _hit_for(rng: random.Random, point: str, turns: int) -> int:
    if point in ("pump.before_append", "pump.after_append"):
        # Every batch of every pump passes; a turn logs at least a batch per few deltas.
        return rng.randint(1, max(1, turns * KILL_TOKENS // 4))
    return rng.randint(1, turns)


async def _kill_round(
    cluster: Cluster,
    rng: random.Random,
    result: ScenarioResult,
    plan: KillPlan,
    tenant: str,
    index: int,
    lease_ms: int,
    formats: tuple[str, ...],
) -> None:
    victim, survivor = cluster.workers
    lease_s = lease_ms / 1000
    if not survivor.alive or survivor.stopped or survivor.faults or survivor.lease_ms != lease_ms:
        await asyncio.to_thread(survivor.start, lease_ms=lease_ms)
    turns = rng.randint(2, 4)
    if plan.feed and plan.mode == SUBSTRATE:
        # Late enough that every turn has logged its substrate's first event (and so its
        # handle): only a run with a handle is the sweeper's to claim at once.
        first_spec = f"pump.after_append:{rng.randint(2 * turns + 1, 3 * turns + 2)}"
    elif plan.feed:
        first_spec = f"pump.after_append:{rng.randint(2, turns * 3)}"
    elif plan.point == RANDOM_KILL:
        first_spec = ""
    else:
        first_spec = f"{plan.point}:{_hit_for(rng, plan.point, turns)}"
    await asyncio.to_thread(victim.start, lease_ms=lease_ms, faults=first_spec)
    armed = f"{plan.mode} round, victim pid {victim.pid} armed {first_spec or 'with nothing'}"
    specs = make_specs(
        rng, tenant, f"k{index}", turns, tokens=KILL_TOKENS, delay_ms=KILL_DELAY_MS,
        modes=(plan.mode,), formats=formats,
    )
    # A feed round keeps the orphans' clients off the survivor until the armed victim is up.
    router = Router(victim, survivor, fallback_ok=not plan.feed)
    clients = [
        TurnClient(spec, router.pick, rng, repost=0.3, idle_s=10, deadline_s=20) for spec in specs
    ]
    death_bound_s = KILL_TOKENS * KILL_DELAY_MS / 1000 + 3 * lease_s + 5

    async def until_clients_end_or_death() -> bool:
        # A kill after the terminal (post hooks) lands just after the clients are done.
        while not all(c.ended_at for c in clients):
            if not victim.alive:
                return True
            await asyncio.sleep(0.01)
        return await wait_dead(victim, 1.5)

    async def direct() -> None:
        died = await until_clients_end_or_death()
        fired = died and died_by_sigkill(victim)
        result.fault(plan.point, fired)
        if died and not fired:
            result.other["crashed worker"] += 1
            result.example(f"victim exited {victim.returncode} with {first_spec}", kind="crash")

    async def random_kill() -> None:
        await clients[0].wait_for(rng.randint(1, KILL_TOKENS), 10)
        await asyncio.sleep(rng.uniform(0, 0.1))
        victim.kill()
        result.fault_counts["SIGKILL at a random moment"] += 1

    async def feed() -> None:
        died = await wait_dead(victim, death_bound_s)
        result.fault("pump.after_append (to orphan turns)", died and died_by_sigkill(victim))
        if not died:
            router.switch(fallback_ok=True)
            result.fault(plan.point, False)  # nothing orphaned: the takeover never came
            return
        paused = False
        try:
            if plan.mode == SUBSTRATE:
                # The survivor's own sweeper would claim the orphans first: freeze it (it holds
                # no run now) so the armed victim's sweeper is the one that claims; the clients
                # wait until it did.
                router.hold()
                survivor.pause()
                paused = True
            await asyncio.to_thread(victim.start, lease_ms=lease_ms, faults=f"{plan.point}:1")
            # Local: the retries reach the armed victim, which restarts the turns; once it is
            # dead too, the survivor.
            router.switch(preferred=victim)
            died = await wait_dead(victim, death_bound_s)
        finally:
            if paused:
                survivor.resume()
            router.switch(fallback_ok=True)
            router.release()
        result.fault(plan.point, died and died_by_sigkill(victim))

    helper = feed if plan.feed else random_kill if plan.point == RANDOM_KILL else direct
    await run_clients(clients, helper())
    await settle(cluster, tenant, [c.execution_id for c in clients], 3 * lease_s + 5)
    # A kill between the finish and the persistence leaves it to another worker's sweeper.
    persist_wait_s = 2 * PERSIST_AFTER_MS / 1000 + 2 * lease_s + 3
    if plan.feed:
        armed += f", then {plan.point}:1"

    def tag(verdict: Verdict) -> None:
        verdict.context = f"{armed}; {verdict.context}"

    await judge(cluster, result, tenant, clients, persist_wait_s=persist_wait_s, amend=tag)
    if "unknown fault point" in victim.log():
        result.other["unknown fault point"] += 1


async def kills(
    cluster: Cluster,
    rng: random.Random,
    *,
    count: int,
    lease_ms: int = 800,
    formats: tuple[str, ...] = FORMATS,
    random_kills: bool = True,
) -> ScenarioResult:
    result = ScenarioResult(
        "kills",
        "worker SIGKILLed at named fault points (local + substrate, 2 workers)",
        restarts_allowed=True,
    )
    started = time.monotonic()
    known = _known_fault_points()
    unknown = sorted(ALL_POINTS - known)
    if unknown:
        # Nothing to arm: say so, and still kill at random moments so the rest is exercised.
        result.notes.append(f"fault points this build does not have: {unknown}")
        for point in unknown:
            result.fault(point, False)
    tenant = new_tenant("kills")
    await asyncio.to_thread(cluster.ensure_pair, lease_ms=lease_ms)
    schedule = kill_schedule(rng, count, random_kills=random_kills, named=not unknown)
    for index, plan in enumerate(schedule):
        await _kill_round(cluster, rng, result, plan, tenant, index, lease_ms, formats)
    result.seconds = time.monotonic() - started
    return result
