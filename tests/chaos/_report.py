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
        "DESIGN §3; what each client received is held to the log; model calls are counted",
        "from a file every call appends to (it survives SIGKILL).",
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
