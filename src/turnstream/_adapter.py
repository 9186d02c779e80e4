"""Reconnect adapters: the per-substrate glue that lets any worker re-attach to a run.

A substrate runs the turn outside this process (a sandbox orchestrator, OpenAI background
mode…). Its adapter can ``start`` a run and ``attach`` to a running one after a given event
id. The pump drives an adapter like a producer; substrate event ids are used verbatim as
``eventId``, so the seam of a re-attach deduplicates by itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._exceptions import AdapterError, InvalidTurnInput
from ._identity import TurnIdentity

__all__ = [
    "ReconnectAdapter",
    "RunHandle",
    "StartRequest",
    "SubstrateCancelled",
    "SubstrateFailed",
    "SupervisedEvent",
]


@dataclass(frozen=True, slots=True)
class RunHandle:
    """What a fresh supervisor re-attaches by: persisted (as JSON) the first time it is seen.

    ``kind`` names the adapter (the supervisor looks adapters up by it), ``run_id`` is the
    substrate's id of the run, ``data`` anything else the adapter needs (JSON values only).
    """

    kind: str
    run_id: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "runId": self.run_id, "data": dict(self.data)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RunHandle:
        kind, run_id, data = value.get("kind"), value.get("runId"), value.get("data", {})
        if not isinstance(kind, str) or not isinstance(run_id, str) or not isinstance(data, dict):
            raise InvalidTurnInput("malformed run handle", field="handle")
        return cls(kind=kind, run_id=run_id, data=data)


@dataclass(frozen=True, slots=True)
class SupervisedEvent:
    """An event with a producer- or substrate-chosen id (the dedup key).

    ``handle`` is the run handle a fresh supervisor re-attaches by; the pump persists the
    first one it sees, before logging the event that carries it.
    """

    event_id: str
    payload: Mapping[str, Any]
    handle: RunHandle | None = None


@dataclass(frozen=True, slots=True)
class StartRequest:
    """What an adapter needs to start a substrate run for one turn."""

    execution_id: str
    identity: TurnIdentity
    input: Mapping[str, Any]
    attempt: int = 1


class SubstrateFailed(AdapterError):
    """The substrate reported that the run failed; the turn fails in-band with ``code``."""

    def __init__(self, message: str, *, code: str = "substrate_failed", retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class SubstrateCancelled(AdapterError):
    """The substrate reported that the run was cancelled; the turn ends cancelled."""


@runtime_checkable
class ReconnectAdapter(Protocol):
    """One per substrate. Both methods yield :class:`~turnstream.SupervisedEvent` s.

    * ``start`` yields, as early as it can, an event carrying the :class:`RunHandle`
      (whose ``kind`` is ``adapter.kind``). If the worker dies before that event is logged,
      the next request calls ``start`` again for the same execution id: a substrate that
      is idempotent on it (see docs/substrate-protocol.md) attaches; any other starts a
      second run.
    * ``attach`` yields only events strictly after ``after_event_id`` (``None``: from the
      start of the run); attached after the last event, it still ends with the outcome.
    * Event ids are unique within a run, at most 256 characters, and never start with
      ``ts:`` (reserved for the pump's lifecycle events).
    * Iteration that ends normally means the run **completed**; a cut connection must raise.
      :class:`SubstrateFailed` / :class:`SubstrateCancelled` end the turn failed/cancelled.
      Any other exception is taken as transient: with a handle known, the pump re-attaches
      after the last event it saw (a few times), so a permanent error must be raised as
      :class:`SubstrateFailed`.
    * ``cancel`` asks the substrate to stop the run: idempotent, silent for a finished or
      unknown run; it may raise when the substrate cannot be reached (the pump logs it).

    Two optional methods, looked up by name:

    * ``handle_for(request: StartRequest) -> RunHandle | None`` — the handle of the run
      ``start(request)`` makes, without starting it, for a substrate that names its runs by
      execution id. A turn cancelled before ``start`` yielded its handle then still reaches
      the substrate (``cancel(handle_for(request))``); without it, such a cancel ends the turn
      but the substrate run goes on.
    * ``async aclose()`` — release what the adapter holds (HTTP clients…): the supervisor
      calls it on every registered adapter when it stops.
    """

    kind: str

    def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]: ...

    def attach(
        self, handle: RunHandle, after_event_id: str | None
    ) -> AsyncIterator[SupervisedEvent]: ...

    async def cancel(self, handle: RunHandle) -> None: ...
