"""What every scenario shares: its result (the counts of the report), the router that tells
clients which worker to talk to, running clients, waiting for runs to settle, judging turns.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._check import (
    LoggedTurn,
    Verdict,
    check_turn,
    read_turn,
    run_tag,
    tenant_runs,
    witness_counts,
)
from ._client import TurnClient, TurnSpec
from ._cluster import PREFIX, Cluster, Worker

# Categories that have a column of their own; everything else goes to "other".
COLUMNS = ("lost", "duplicated", "abandoned")
MAX_EXAMPLES_PER_KIND = 3


@dataclass
class ScenarioResult:
    """The counts of one scenario. A turn counts once per category it falls in."""

    name: str
    title: str = ""
    faults_tried: int = 0
    faults_fired: int = 0
    turns: int = 0
    lost: int = 0
    duplicated: int = 0
    abandoned: int = 0
    restarts: int = 0  # turns restarted as a new attempt (the model ran again)
    extra_calls: int = 0  # model calls beyond one per attempt the log shows
    other: collections.Counter[str] = field(default_factory=collections.Counter)
    allowed: set[str] = field(default_factory=set)  # categories that are not failures here
    restarts_allowed: bool = False
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fault_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0
    known_ids: set[str] = field(default_factory=set)  # every turn this scenario started
    _example_kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, verdict: Verdict) -> None:
        self.turns += 1
        if verdict.restarts:
            self.restarts += 1
        self.extra_calls += verdict.extra_calls
        for category in verdict.problems:
            if category in COLUMNS:
                setattr(self, category, getattr(self, category) + 1)
            elif category not in ("extra_calls", "restarted"):
                self.other[category] += 1
        failing = sorted(set(verdict.problems) - self.allowed)
        if failing:
            self.example(verdict.describe(), kind=failing[0])

    def example(self, text: str, *, kind: str = "") -> None:
        """Keep a few examples of each kind of failure, so a rare one is not crowded out."""
        if self._example_kinds[kind] < MAX_EXAMPLES_PER_KIND:
            self._example_kinds[kind] += 1
            self.examples.append(text)

    def fault(self, kind: str, fired: bool) -> None:
        self.faults_tried += 1
        self.faults_fired += fired
        self.fault_counts[f"{kind} {'fired' if fired else 'did not fire'}"] += 1

    @property
    def failures(self) -> list[str]:
        """Why this scenario fails against its target behaviour (empty: it passes)."""
        out = []
        for column in COLUMNS:
            count = getattr(self, column)
            if count and column not in self.allowed:
                out.append(f"{count} of {self.turns} turns {column}")
        for category, count in sorted(self.other.items()):
            if category not in self.allowed:
                out.append(f"{count} of {self.turns} turns {category}")
        if self.restarts and not self.restarts_allowed:
            out.append(f"{self.restarts} of {self.turns} turns restarted as a new attempt")
        if self.extra_calls:
            out.append(f"{self.extra_calls} model calls beyond one per attempt")
        if self.faults_fired < self.faults_tried:
            missed = self.faults_tried - self.faults_fired
            out.append(f"{missed} of {self.faults_tried} faults did not fire")
        if self.turns == 0:
            out.append("no turn was tried")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = (
            f"{self.name}: faults {self.faults_fired}/{self.faults_tried}, turns {self.turns}, "
            f"lost {self.lost}, duplicated {self.duplicated}, abandoned {self.abandoned}, "
            f"restarts {self.restarts}, extra model calls {self.extra_calls}"
        )
        if self.other:
            head += ", " + ", ".join(f"{k} {v}" for k, v in sorted(self.other.items()))
        head += f" ({self.seconds:.1f} s)"
        lines = [head]
        lines += [f"  FAIL {reason}" for reason in self.failures]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def new_tenant(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def new_session(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def make_specs(
    rng: random.Random,
    tenant: str,
    label: str,
    count: int,
    *,
    tokens: int,
    delay_ms: int,
    modes: Sequence[str] = ("local",),
    formats: Sequence[str] = ("ndjson",),
) -> list[TurnSpec]:
    """``count`` turns; formats and modes cycle, so every one of them is covered."""
    offset = rng.randrange(len(formats) * len(modes))
    specs = []
    for i in range(count):
        n = i + offset
        specs.append(
            TurnSpec(
                tenant=tenant,
                session=new_session(f"{label}-{i}"),
                message=f"chaos {label}.{i} {rng.random()}",
                tokens=tokens,
                delay_ms=delay_ms,
                mode=modes[n % len(modes)],
                fmt=formats[(n // len(modes)) % len(formats)],
            )
        )
    return specs


class Router:
    """Which worker a client talks to: the preferred one while it is alive (and is the very
    process the round started), else the fallback once ``fallback_ok``; until then a client
    whose preferred worker died waits for the next one. ``hold()`` makes every client wait."""

    def __init__(self, preferred: Worker, fallback: Worker, *, fallback_ok: bool = True) -> None:
        self.preferred = preferred
        self.fallback = fallback
        self.preferred_pid = preferred.pid if preferred.alive else None
        self.fallback_ok = fallback_ok
        self.switched = False
        self._open = asyncio.Event()
        self._open.set()
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def switch(self, preferred: Worker | None = None, *, fallback_ok: bool = True) -> None:
        """From now on ``preferred`` (its current process) first, or (None) the fallback."""
        if preferred is not None:
            self.preferred = preferred
            self.preferred_pid = preferred.pid if preferred.alive else None
        else:
            self.switched = True
        self.fallback_ok = fallback_ok
        self._notify()

    async def pick(self, client: TurnClient) -> str | None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self._open.is_set():
                await self._wait(self._open.wait(), deadline)
                continue
            preferred = self.preferred
            if not self.switched and preferred.alive and preferred.pid == self.preferred_pid:
                return preferred.url
            if self.fallback_ok:
                if self.fallback.alive:
                    return self.fallback.url
                return preferred.url if preferred.alive else None
            await self._wait(self._changed.wait(), deadline)
        return None

    @staticmethod
    async def _wait(waiting: Coroutine[Any, Any, Any], deadline: float) -> None:
        try:
            await asyncio.wait_for(waiting, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass


async def run_clients(
    clients: Iterable[TurnClient], *also: Coroutine[Any, Any, None]
) -> None:
    """Run every client to its end (each has its own deadline), beside helper coroutines."""
    tasks = [asyncio.create_task(client.run()) for client in clients]
    helpers = [asyncio.create_task(helper) for helper in also]
    try:
        await asyncio.gather(*tasks)
        if helpers:
            await asyncio.gather(*helpers)
    finally:
        for task in (*tasks, *helpers):
            task.cancel()


def _read_all(cluster: Cluster, tenant: str, ids: Sequence[str]) -> dict[str, LoggedTurn]:
    client = cluster.redis_client()
    return {execution_id: read_turn(client, PREFIX, tenant, execution_id) for execution_id in ids}


async def settle(cluster: Cluster, tenant: str, ids: Sequence[str], within_s: float) -> float:
    """Wait (at most ``within_s``) until no run of ``ids`` is ``running``; the seconds it took."""
    started = time.monotonic()
    deadline = started + within_s

    def running() -> int:
        client = cluster.redis_client()
        pipe = client.pipeline(transaction=False)
        for execution_id in ids:
            pipe.hget(f"{PREFIX}:{{{run_tag(tenant, execution_id)}}}:run", "status")
        return sum(1 for status in pipe.execute() if status in (None, b"running"))

    while time.monotonic() < deadline:
        if await asyncio.to_thread(running) == 0:
            break
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def judge(
    cluster: Cluster,
    result: ScenarioResult,
    tenant: str,
    clients: Sequence[TurnClient],
    *,
    persist_wait_s: float = 2.0,
    amend: Callable[[Verdict], None] | None = None,
) -> list[Verdict]:
    """Check every client's turn against the log and the witnesses; add them to ``result``
    (after ``amend``, which may drop what this scenario allows)."""
    ids = [c.execution_id for c in clients]
    turns = await asyncio.to_thread(_read_all, cluster, tenant, ids)
    # Post hooks run after the terminal event: give a just-finished turn a moment.
    deadline = time.monotonic() + persist_wait_s
    while True:
        persists = witness_counts(cluster.persist_file)
        missing = [i for i in ids if turns[i].status not in (None, "running") and not persists[i]]
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    calls = witness_counts(cluster.calls_file)
    verdicts = []
    for client in clients:
        starts = None
        if client.spec.mode == "substrate":
            starts = await asyncio.to_thread(cluster.substrate_starts, client.execution_id)
        verdict = check_turn(
            client,
            turns[client.execution_id],
            calls=calls[client.execution_id],
            substrate_starts=starts,
            persists=persists[client.execution_id],
            restarts_allowed=result.restarts_allowed,
        )
        verdicts.append(verdict)
    result.known_ids.update(ids)
    stray = set(await asyncio.to_thread(tenant_runs, cluster.redis_client(), PREFIX, tenant))
    stray -= result.known_ids
    if stray:
        result.known_ids |= stray  # reported once
        result.other["stray runs"] += len(stray)
        result.example(f"runs nobody started: {sorted(stray)[:5]}", kind="stray")
    for verdict in verdicts:
        if "unpersisted" in verdict.problems:
            waited = f"not persisted {persist_wait_s:.0f} s after the end"
            verdict.problems["unpersisted"] = [waited]
        if amend is not None:
            amend(verdict)
        result.add(verdict)
    return verdicts
