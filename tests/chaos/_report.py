"""``docs/RELIABILITY.md``: the figures of one chaos run, one table row per scenario."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import turnstream

from ._scenario import ScenarioResult


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def source_description() -> str:
    """Which turnstream ran: this checkout's commit, or a snapshot put on PYTHONPATH (a
    ``COMMIT`` file at its root names the commit it was exported from)."""
    source = Path(turnstream.__file__).resolve().parent
    root = source.parents[1]  # <root>/src/turnstream
    marker = root / "COMMIT"
    if marker.exists():
        return f"commit {marker.read_text().strip()} (exported to {root})"
    commit = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--", "src"])
    return f"commit {commit}" + (" + uncommitted changes under src/" if dirty else "")


def machine_facts() -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) // 1024} MiB"
                break
    except OSError:
        pass
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("turnstream under test", source_description()),
        ("cpu", f"{os.cpu_count()} x {cpu}"),
        ("memory", memory),
        ("os", f"{platform.system()} {platform.release()}"),
        ("python", platform.python_version()),
        ("redis", _run(["redis-server", "--version"]).split(" sha=")[0]),
        ("load average at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def _other(result: ScenarioResult) -> str:
    parts = [f"{name} {count}" for name, count in sorted(result.other.items()) if count]
    return ", ".join(parts) or "—"


# What the figures above do not promise: written down plainly, for the users who need it.
_NOT_COVERED = [
    "## What you cannot rely on",
    "",
    "* **A Redis failover** (Sentinel, a managed replica promoted) can lose writes Redis",
    "  acknowledged, events a client already saw included: replication is asynchronous and",
    "  turnstream does not wait for replicas yet. The runs above use one Redis with",
    "  `appendfsync always`, which survives its own crash, not a failover.",
    "* **Redis without persistence** (`appendonly no` and no snapshots) loses every turn in",
    "  flight on a restart; those turns then answer as unknown.",
    "* **A local producer's turn whose worker dies is run again** (a new attempt, the model",
    "  called again; the log says `session.run.restarted`): only a reconnectable substrate",
    "  avoids the second call. Kills and zombies count these as *restarts*.",
    "* **After an outage longer than the lease**, a request that reaches Redis before the",
    "  owner's first renewal takes the turn over (a restart, as above); the owner is fenced.",
    "* **An outage longer than `store_retry_s`** (30 s) ends a turn failed",
    "  (`store_unavailable`), not completed; one longer than `running_ttl_ms` can lose it.",
    "* **Persistence is at least once**: a hook may run twice for one turn (its owner died",
    "  after the hook and before marking it done); key what it writes by execution id.",
    "",
]


def write_report(
    path: Path,
    results: Sequence[ScenarioResult],
    *,
    seed: int,
    command: str,
    duration_s: float,
    counts: Any,
) -> None:
    lines = [
        "# Reliability: the chaos run",
        "",
        "Written by `scripts/chaos` (tests/chaos/): real uvicorn workers of a small app built on",
        "turnstream's public API, one redis-server with `appendonly yes, appendfsync always`",
        "behind a fault proxy, the reference substrate, every process on 127.0.0.1 and",
        "stopped by PID. Every turn's log is read straight from Redis afterwards and held to",
        "what turnstream promises: seqs 1..n without a gap, unique event ids, the log begins",
        "with `session.run.started` and ends with exactly one terminal event, the run is",
        "finished (never left `running`), the checkpointed text is the fold of the log, and",
        "an owner that lost its lease wrote nothing after the takeover. What each client",
        "received is held to the log (in order, nothing twice, nothing the log lacks); model",
        "calls and persistence hooks are counted in files every call appends to (they",
        "survive SIGKILL).",
        "",
        f"* seed: `{seed}` — replay with `{command}`",
        f"* duration: {duration_s:.0f} s",
        *(f"* {name}: {value}" for name, value in machine_facts()),
        "",
        "| scenario | faults fired / tried | turns | lost | duplicated | abandoned | "
        "restarts | extra model calls | other | target met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.faults_fired} / {r.faults_tried} | {r.turns} | {r.lost} | "
            f"{r.duplicated} | {r.abandoned} | {r.restarts} | {r.extra_calls} | {_other(r)} | "
            f"{'yes' if r.passed else '**no**'} |"
        )
    lines += [
        "",
        "Columns count turns (a turn counts once per column it falls in). *restarts*: turns",
        "run again as a new attempt (the model called again) — allowed only where an owner",
        "died mid-turn with a local producer (kills, zombies). *extra model calls*: calls",
        "beyond one per attempt the log shows (substrate: runs the substrate started beyond",
        "one). *other*: `failed` (ended `session.run.failed`), `unpersisted`",
        "(`persist_assistant_message` never ran for a finished turn), `zombie` (a fenced-off",
        "owner wrote after the takeover), `unlogged` (a client got an event the log lacks),",
        "`hung reader`, `corrupt` (checkpoint, status or first event do not add up).",
        "",
    ]
    lines += _NOT_COVERED
    for r in results:
        lines += [f"## {r.name}", "", r.title + ".", ""]
        if r.fault_counts:
            lines.append(
                "Faults: " + ", ".join(f"{k}: {v}" for k, v in sorted(r.fault_counts.items()))
                + "."
            )
            lines.append("")
        if r.failures:
            lines += ["Misses the target:", "", *(f"* {f}" for f in r.failures), ""]
        for note in r.notes:
            lines += [f"Note: {note}", ""]
        if r.examples:
            lines += ["Examples:", "", "```", *r.examples, "```", ""]
        lines += [f"Took {r.seconds:.0f} s.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
