"""Retrying a failed turn: when a POST of a turn that ended failed starts a new attempt.

A turn's failure is in-band: an ``error`` event (``code``, ``message``, ``retryable``) and
then ``session.run.failed``. Posting the turn again (same identity, same input) then:

* ``retry=None`` (the default): starts a new attempt when that error was ``retryable`` (the
  store was away, a worker died, the producer raised, a substrate said so), and replays the
  failure otherwise (a bad event, too many events: the same input would fail the same way);
* ``retry=True``: starts a new attempt whatever the error was;
* ``retry=False``: replays the failure.

A new attempt keeps the log: the client sees ``X-Turn-Mode: restarted``, the failed attempt's
events and its ``error``, then ``session.run.restarted`` and the new attempt; a reader skips
the superseded ``session.run.failed``, so the stream ends only with the new attempt's end.
"""

from __future__ import annotations

from ._events import ERROR
from ._store import RunKey, RunRecord, RunStatus, TurnStore

__all__ = ["should_reopen"]


async def should_reopen(
    store: TurnStore, key: RunKey, run: RunRecord, retry: bool | None
) -> bool:
    """Whether a request for the finished ``run`` starts a new attempt (see the module)."""
    if run.status is not RunStatus.FAILED or retry is False:
        return False
    if retry:
        return True
    # The error is the event before the terminal one (the pump logs them in that order).
    events = await store.read(key, after=max(run.last_seq - 2, 0), limit=2)
    for event in events:
        if event.type == ERROR:
            return event.payload().get("retryable") is True
    return False
