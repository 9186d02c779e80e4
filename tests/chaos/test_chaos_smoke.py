"""The chaos suite, small and seeded, inside the normal test run (the long run: scripts/chaos).

One cluster for the module (redis-server with AOF, a fault proxy per worker, the reference
substrate, two workers of tests/chaos/_app.py); each test runs one scenario of
tests/chaos/scenarios.py with small counts and holds it to its target behaviour. The seed is
printed (shown under "Captured stdout" on a failure); ``TURNSTREAM_CHAOS_SEED`` replays it.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator

import pytest

from ._cluster import Cluster
from ._run import scenario_rng, seed_from
from ._scenario import ScenarioResult
from .scenarios import kills, load, redis_restarts, reply_losses, stalls, zombies

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.chaos]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if shutil.which("redis-server") is None:
        message = "no redis-server binary: the chaos suite cannot run"
        if os.environ.get("TURNSTREAM_REQUIRE_REDIS") == "1":
            pytest.fail(message + " (TURNSTREAM_REQUIRE_REDIS=1 turns this skip into a failure)")
        pytest.skip(message)
    with Cluster() as started:
        yield started


@pytest.fixture(scope="module")
def seed() -> int:
    return seed_from(None)


def rng_for(seed: int, name: str) -> random.Random:
    print(f"chaos smoke seeded with TURNSTREAM_CHAOS_SEED={seed} ({name})")
    return scenario_rng(seed, name)


def check(result: ScenarioResult) -> None:
    print(result.summary())
    assert result.turns > 0
    assert result.passed, result.summary()


# A build that abandons turns makes each round wait out its clients' deadline (20 s).
@pytest.mark.timeout(120)
async def test_kills_at_named_fault_points(cluster: Cluster, seed: int) -> None:
    result = await kills(cluster, rng_for(seed, "kills"), count=3, random_kills=False)
    assert result.faults_tried >= 3
    check(result)


async def test_a_zombie_writes_nothing_after_the_takeover(cluster: Cluster, seed: int) -> None:
    check(await zombies(cluster, rng_for(seed, "zombies"), count=1))


async def test_lost_replies_lose_nothing_and_call_the_model_once(
    cluster: Cluster, seed: int
) -> None:
    result = await reply_losses(cluster, rng_for(seed, "reply_losses"), count=2)
    assert cluster.proxy.stats().swallowed >= 2
    check(result)


async def test_a_redis_restart_mid_turn_completes_every_turn(cluster: Cluster, seed: int) -> None:
    kills_before = cluster.redis.kills
    result = await redis_restarts(cluster, rng_for(seed, "restarts"), count=1)
    assert cluster.redis.kills == kills_before + 1
    check(result)


async def test_a_stall_longer_than_the_lease_ends_every_turn(cluster: Cluster, seed: int) -> None:
    result = await stalls(cluster, rng_for(seed, "stalls"), count=1, kinds=(("one", "short"),))
    assert cluster.proxy.stats().stalled_chunks > 0
    check(result)


async def test_concurrent_turns_on_one_worker(cluster: Cluster, seed: int) -> None:
    check(await load(cluster, rng_for(seed, "load"), turns=100))
