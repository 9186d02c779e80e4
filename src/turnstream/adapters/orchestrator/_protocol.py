"""The reference substrate protocol's event vocabulary, shared by both ends."""

from __future__ import annotations

from typing import Final

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "FAIL_PROMPT",
    "STARTED",
    "TERMINAL_TYPES",
    "TEXT_DELTA",
]

STARTED: Final = "execution.started"
TEXT_DELTA: Final = "text-delta"
COMPLETED: Final = "execution.completed"
FAILED: Final = "execution.failed"
CANCELLED: Final = "execution.cancelled"
TERMINAL_TYPES: Final = frozenset({COMPLETED, FAILED, CANCELLED})

#: The prompt that makes a reference substrate run fail after two deltas (a knob for tests).
FAIL_PROMPT: Final = "please fail"
