"""The long chaos run (``scripts/chaos``): every scenario with large counts, then the report.

    scripts/chaos [--quick] [--seed N] [--only kills,zombies,…] [--out docs/RELIABILITY.md]

The seed (printed; ``TURNSTREAM_CHAOS_SEED`` or ``--seed`` replays it) drives every random
choice: kill points and hits, formats, timings. Each scenario gets its own generator derived
from the seed and its name, so ``--only`` replays one scenario exactly as in the full run.
Exit status 1 when any scenario misses its target behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ._cluster import Cluster
from ._report import write_report
from ._scenario import ScenarioResult
from .scenarios import kills, load, redis_restarts, reply_losses, stalls, zombies

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Counts:
    kills: int
    zombies: int
    reply_losses: int
    restarts: int
    stalls: int
    load: int


FULL = Counts(kills=200, zombies=20, reply_losses=50, restarts=10, stalls=6, load=1000)
QUICK = Counts(kills=16, zombies=3, reply_losses=6, restarts=2, stalls=2, load=300)
SCENARIOS = ("kills", "zombies", "reply_losses", "restarts", "stalls", "load")


def seed_from(value: int | None) -> int:
    if value is not None:
        return value
    env = os.environ.get("TURNSTREAM_CHAOS_SEED")
    return int(env) if env else random.SystemRandom().getrandbits(32)


def scenario_rng(seed: int, name: str) -> random.Random:
    # A string seed is hashed (sha512) by random: stable across runs and Python versions.
    return random.Random(f"{seed}:{name}")


Scenario = Callable[[Cluster, random.Random], Awaitable[ScenarioResult]]


def plan(counts: Counts) -> dict[str, Scenario]:
    return {
        "kills": lambda c, r: kills(c, r, count=counts.kills),
        "zombies": lambda c, r: zombies(c, r, count=counts.zombies),
        "reply_losses": lambda c, r: reply_losses(c, r, count=counts.reply_losses),
        "restarts": lambda c, r: redis_restarts(c, r, count=counts.restarts),
        "stalls": lambda c, r: stalls(c, r, count=counts.stalls),
        "load": lambda c, r: load(c, r, turns=counts.load),
    }


async def run_all(seed: int, counts: Counts, only: list[str]) -> list[ScenarioResult]:
    results = []
    scenarios = plan(counts)
    with Cluster() as cluster:
        for name in only:
            print(f"== {name}", flush=True)
            result = await scenarios[name](cluster, scenario_rng(seed, name))
            print(result.summary(), flush=True)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a few minutes)")
    parser.add_argument("--seed", type=int, help="replay this seed (else TURNSTREAM_CHAOS_SEED)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--out", type=Path, help="the report (default docs/RELIABILITY.md; '-' for none)"
    )
    args = parser.parse_args(argv)
    seed = seed_from(args.seed)
    counts = QUICK if args.quick else FULL
    only = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios: {unknown}")
    command = "scripts/chaos " + shlex.join(
        [*(["--quick"] if args.quick else []), "--seed", str(seed),
         *(["--only", args.only] if args.only else [])]
    )
    print(f"chaos run seeded with TURNSTREAM_CHAOS_SEED={seed}  (replay: {command})", flush=True)
    started = time.monotonic()
    results = asyncio.run(run_all(seed, counts, only))
    duration = time.monotonic() - started
    out = args.out if args.out is not None else REPO / "docs" / "RELIABILITY.md"
    if str(out) != "-":
        write_report(out, results, seed=seed, command=command, duration_s=duration, counts=counts)
        print(f"report written to {out}")
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} scenarios met their target "
          f"in {duration:.0f} s" + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
