"""What an application plugs into a turn: the producer and the optional hooks around it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._adapter import SupervisedEvent
from ._events import TEXT_DELTA, LoggedEvent
from ._identity import TurnIdentity

__all__ = [
    "Limits",
    "SupervisedEvent",
    "TextAccumulator",
    "TurnCompletion",
    "TurnContext",
    "TurnHooks",
]


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a producer is given to produce one attempt of a turn."""

    identity: TurnIdentity
    execution_id: str
    input: Mapping[str, Any]
    attempt: int


@dataclass(frozen=True, slots=True)
class TurnCompletion:
    """What the post hooks learn about a finished turn."""

    identity: TurnIdentity
    execution_id: str
    status: str  # "completed" | "failed" | "cancelled"
    final_text: str
    attempt: int
    last_seq: int


Producer = Callable[[TurnContext], AsyncIterator[Mapping[str, Any] | SupervisedEvent]]


class TextAccumulator(Protocol):
    """Folds the log's events into the turn's final text (docs/lifecycle.md)."""

    def __call__(self, text: str, event: Mapping[str, Any]) -> str: ...


def accumulate_text_deltas(text: str, event: Mapping[str, Any]) -> str:
    """The default fold: concatenate ``delta`` of every ``text-delta`` event."""
    if event.get("type") == TEXT_DELTA:
        delta = event.get("delta")
        if isinstance(delta, str):
            return text + delta
    return text


@dataclass(frozen=True, slots=True)
class TurnHooks:
    """Everything but ``produce`` is optional.

    * ``persist_assistant_message(completion, text)`` — at least once per finished turn
      (``completion.execution_id`` is the idempotency key); never on replay.
    * ``on_turn_complete(completion)`` and ``on_event(event)`` — errors are logged, swallowed.
    * ``transform_final_text(text)`` — changes only what is persisted, never the log.
    * ``trace_flush()`` — handed to ``wait_until`` when given (serverless), else awaited.
    """

    produce: Producer | None = None
    persist_assistant_message: Callable[[TurnCompletion, str], Awaitable[None]] | None = None
    on_turn_complete: Callable[[TurnCompletion], Awaitable[None]] | None = None
    on_event: Callable[[LoggedEvent], Awaitable[None]] | None = None
    transform_final_text: Callable[[str], str] | None = None
    trace_flush: Callable[[], Awaitable[None]] | None = None
    wait_until: Callable[[Awaitable[None]], None] | None = None
    accumulate: TextAccumulator = accumulate_text_deltas


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a turn may take and hold (docs/configuration.md, Limits). All configurable."""

    max_body_bytes: int = 1024 * 1024
    max_message_chars: int = 100_000
    max_event_bytes: int = 256 * 1024
    max_events_per_turn: int = 20_000
    send_timeout_s: float = 30.0
    keepalive_s: float = 15.0
    producer_buffer: int = 1024  # events a producer may run ahead of the log
    # ...and bytes: while the store is away the producer runs on until this bound.
    producer_buffer_bytes: int = 4 * 1024 * 1024
    # A deadline on receiving a whole request body: a body trickled in is a 408, not a
    # connection held open for as long as the client likes.
    body_timeout_s: float = 10.0
