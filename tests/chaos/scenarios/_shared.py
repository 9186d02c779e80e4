"""What the scenarios share: the two modes of a turn, and how to tell a worker died."""

from __future__ import annotations

import asyncio
import time

from .._cluster import Worker

LOCAL, SUBSTRATE = "local", "substrate"
MODES = (LOCAL, SUBSTRATE)
async def wait_dead(worker: Worker, within_s: float) -> bool:
    """Until ``worker``'s process is gone (True), or ``within_s`` passed (False)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not worker.alive:
            return True
        await asyncio.sleep(0.01)
    return not worker.alive


def died_by_sigkill(worker: Worker) -> bool:
    """A fault point's kill (or the harness's): not a crash, not a clean exit."""
    return worker.returncode == -9
