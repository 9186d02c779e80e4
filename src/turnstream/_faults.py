"""Named fault points: places where the chaos suite kills this process on purpose.

``TURNSTREAM_FAULTS`` lists points, comma-separated, each optionally with the hit that kills
(``pump.after_append:3`` = the third time any pump passes that point); ``SIGKILL`` then ends
the process at once, exactly like an OOM kill or a lost machine. Unset (production), a point
costs one dictionary lookup.

The points, in the order a turn passes them:

    pump.after_handle     the substrate's run handle is persisted, its event not yet logged
    pump.before_append    events are taken from the producer, not yet sent to the store
    pump.after_append     events are logged, not yet published to any reader
    pump.after_restart    a new attempt is counted, ``session.run.restarted`` not yet logged
    pump.before_finish    the producer is done, the terminal event not yet written
    pump.after_finish     the run is finished, no post hook has run
    hooks.after_persist   ``persist_assistant_message`` returned, the run not yet marked persisted
    sweeper.after_claim   the sweeper took a lapsed run over, its pump not yet started
"""

from __future__ import annotations

import os
import signal
from functools import cache
from typing import Final

__all__ = ["FAULT_POINTS", "fault_point"]

FAULT_POINTS: Final = frozenset(
    {
        "pump.after_handle",
        "pump.before_append",
        "pump.after_append",
        "pump.after_restart",
        "pump.before_finish",
        "pump.after_finish",
        "hooks.after_persist",
        "sweeper.after_claim",
    }
)

ENV_VAR: Final = "TURNSTREAM_FAULTS"


class _Armed:
    """The points this process was told to die at, with the hit that kills, and hits so far."""

    def __init__(self, spec: str) -> None:
        self.kill_at: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, _, count = part.partition(":")
            if name not in FAULT_POINTS:
                raise ValueError(f"{ENV_VAR}: unknown fault point {name!r}")
            hit = int(count) if count else 1
            if hit < 1:
                raise ValueError(f"{ENV_VAR}: the hit of {name!r} must be at least 1")
            self.kill_at[name] = hit


@cache
def _armed() -> _Armed:
    # Read once, on the first point passed (not at import): the environment is the process's.
    return _Armed(os.environ.get(ENV_VAR, ""))


def fault_point(name: str) -> None:
    """Die here (``SIGKILL``) when ``TURNSTREAM_FAULTS`` says so; otherwise do nothing."""
    armed = _armed()
    kill_at = armed.kill_at.get(name)
    if kill_at is None:
        return
    hits = armed.hits.get(name, 0) + 1
    armed.hits[name] = hits
    if hits >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
