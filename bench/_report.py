"""Machine facts and the markdown of a bench run; RESULTS.md keeps what is not ours.

The section this writer owns lies between two HTML comments (``<!-- bench:start -->`` …
``<!-- bench:end -->``); everything else in the file (the takeover results…) is kept as it
is. A file without the markers gets the section right after its title.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._procs import REPO
from bench._run import Config, Section

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
PACKAGES = ("uvicorn", "httptools", "uvloop", "starlette", "anyio", "sse-starlette", "redis",
            "hiredis", "orjson")  # fmt: skip


def machine_facts() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as file:
        mem_kb = int(file.readline().split()[1])
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _turnstream(facts: dict[str, Any]) -> str:
    start, end = facts["src_start"], facts["src_end"]
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
    )  # fmt: skip
    text = f"turnstream at {start['commit']} (src/ digest {start['src_sha256']})"
    if start != end:
        return text + (
            f" — **src/ changed during the run** (at the end: {end['commit']}, digest "
            f"{end['src_sha256']}): the later workloads ran on newer code"
        )
    return text + (" with uncommitted changes" if dirty else "")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(
    sections: Sequence[Section], facts: dict[str, Any], cfg: Config, command: str
) -> str:
    v = facts["versions"]
    http = "httptools" if v.get("httptools") != "not installed" else "h11"
    out = [
        START,
        "## bench — turnstream against a bare `StreamingResponse` (`python -m bench`)",
        "",
        f"* **Date:** {facts['started']} → {facts['finished']}; load average (1, 5, 15 min) "
        f"{facts['load_before']} before, {facts['load_after']} after"
        + (" — **a quick run: one run each, small sizes; indicative only**"
           if cfg.preset == "quick" else "")
        + (" — **a smoke run: the harness works; the figures mean nothing**"
           if cfg.preset == "smoke" else "") + ".",
        f"* **Machine:** {facts['cores']} cores ({facts['cpu']}), {facts['ram_gib']} GiB RAM, "
        f"Linux {facts['kernel']}; Python {facts['python']}; redis-server "
        f"{facts['redis_version']}; " + ", ".join(f"{k} {x}" for k, x in v.items())
        + f"; {_turnstream(facts)}. Every process on this host, over loopback.",
        f"* **Server under test:** one uvicorn worker per variant "
        f"(`python -m uvicorn --factory bench._app:create_app --host 127.0.0.1 --port <free> "
        f"--loop asyncio --http {http} --no-access-log --log-level warning --backlog 4096`, "
        "store from `BENCH_STORE=memory|redis`); a throwaway `redis-server` on a free port "
        "(`--save '' --appendonly no`).",
        "* **Client:** `python -m bench._client`, its own process, one event loop (uvloop), "
        "raw sockets (`asyncio.Protocol`, its own chunked decoder), `Connection: close`; its "
        "CPU time is reported next to the server's.",
        f"* **Command:** `{command}` — {cfg.runs} run(s); every figure is the median over the "
        "runs, every ratio the median of per-run ratios against a baseline measured in the "
        "same run (the variants take turns, in a rotating order).",
    ]  # fmt: skip
    peer = facts.get("peer")
    if peer is not None:
        if "error" in peer:
            out.append(f"* **resumable-stream:** could not be installed or run: {peer['error']}")
        else:
            out.append(
                f"* **resumable-stream {peer['version']}** (PyPI), in a scratch venv made by the "
                "bench: " + "; ".join(f"`{c}`" for c in peer["commands"]) + "."
            )
    tracebacks = {k: n for k, n in facts.get("server_tracebacks", {}).items() if n}
    if tracebacks:
        out.append(f"* **Server tracebacks logged:** {tracebacks}")
    checks = [c for s in sections for c in s.checks]
    if checks:
        met = sum(c.ok for c in checks)
        out += ["", f"### Targets — {met} of {len(checks)} met", ""]
        out += table(["target", "measured", "bound", ""], [c.row() for c in checks])
    errors = [e for s in sections for e in s.count_errors]
    if errors:
        out += ["", "**Event counts that were wrong:**", ""] + [f"* {e}" for e in errors]
    for section in sections:
        out += ["", f"### {section.title}", ""]
        out += [f"* {line}" for line in section.about]
        for caption, header, rows in section.tables:
            out += ["", f"**{caption}**", "", *table(header, rows)]
        out += [f"* {note}" for note in section.notes]
    out.append(END)
    return "\n".join(out) + "\n"


def write_results(path: Path, section: str) -> None:
    """Put ``section`` into ``path``, keeping everything outside the markers."""
    text = path.read_text() if path.exists() else "# Recorded results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        lines = text.splitlines(keepends=True)
        title = 1 if lines and lines[0].startswith("# ") else 0
        head = "".join(lines[:title])
        tail = "".join(lines[title:]).lstrip("\n")
        text = head + "\n" + section + ("\n" + tail if tail else "")
    path.write_text(text)
