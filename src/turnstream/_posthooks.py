"""Post hooks: what runs after a turn finished — persistence first, then the rest.

``persist_assistant_message`` is *at least once* per finished turn, across processes: the run
is finished with ``persist_pending`` set, the owner persists and then marks it persisted, and
if the owner dies (or its hook keeps failing) the sweeper of any worker claims the pending
persistence after ``persist_after_ms`` and runs the supervisor's own hook for it. Duplicates
are possible (a hook that landed just before its process died): ``execution_id`` is the
idempotency key the hook must use.

Nothing here may raise into the supervisor: every hook's error is logged and contained.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import anyio

from ._exceptions import StoreError
from ._faults import fault_point
from ._hooks import TurnCompletion, TurnHooks

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["PostHooks"]

logger = logging.getLogger("turnstream.supervisor")

_PERSIST_TRIES: Final = 3
_MARK_TRIES: Final = 5


class PostHooks:
    """Runs post hooks in the supervisor's task group and knows when none is running."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._running = 0
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def spawn(
        self,
        completion: TurnCompletion,
        hooks: TurnHooks,
        *,
        persist: bool,
        only_persist: bool = False,
    ) -> bool:
        """Start the hooks of ``completion``; False when the supervisor is not running."""
        tg = self._supervisor.task_group
        if tg is None:
            return False
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += 1
        tg.start_soon(self._run, completion, hooks, persist, only_persist)
        return True

    async def _run(
        self, completion: TurnCompletion, hooks: TurnHooks, persist: bool, only_persist: bool
    ) -> None:
        try:
            if persist:
                await self.persist(completion, hooks)
            if not only_persist:
                await self._after(completion, hooks)
        except Exception:  # a bug here must not end the supervisor's task group
            logger.exception("post hooks failed for %s", completion.execution_id)
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def persist(self, completion: TurnCompletion, hooks: TurnHooks) -> bool:
        """Run ``persist_assistant_message`` (retried), then mark the run persisted."""
        persist = hooks.persist_assistant_message
        if persist is None:
            return False
        text = completion.final_text
        if hooks.transform_final_text is not None:
            try:
                text = hooks.transform_final_text(text)
            except Exception:
                logger.exception("transform_final_text failed; persisting the raw text")
        for attempt in range(1, _PERSIST_TRIES + 1):
            try:
                await persist(completion, text)
                break
            except Exception:
                logger.exception(
                    "persist_assistant_message failed for %s (try %d of %d)",
                    completion.execution_id,
                    attempt,
                    _PERSIST_TRIES,
                )
                if attempt == _PERSIST_TRIES:
                    # Still pending in the run: a sweeper retries after persist_after_ms.
                    return False
                await anyio.sleep(0.1 * 2**attempt)
        fault_point("hooks.after_persist")
        await self._mark(completion)
        return True

    async def _mark(self, completion: TurnCompletion) -> None:
        store = self._supervisor.store
        key = self._supervisor.key_of(completion)
        for attempt in range(1, _MARK_TRIES + 1):
            try:
                await store.mark_persisted(key)
                return
            except StoreError:
                if attempt == _MARK_TRIES:
                    # Persisted but not marked: a sweeper persists it once more (at least once).
                    logger.warning("could not mark %s persisted", completion.execution_id)
                    return
                await anyio.sleep(0.1 * 2**attempt)

    async def _after(self, completion: TurnCompletion, hooks: TurnHooks) -> None:
        if hooks.on_turn_complete is not None:
            try:
                await hooks.on_turn_complete(completion)
            except Exception:
                logger.exception("on_turn_complete failed for %s", completion.execution_id)
        if hooks.trace_flush is None:
            return
        if hooks.wait_until is None:
            try:
                await hooks.trace_flush()
            except Exception:
                logger.exception("trace_flush failed for %s", completion.execution_id)
            return
        flush = hooks.trace_flush()
        try:
            hooks.wait_until(flush)
        except Exception:
            logger.exception("wait_until failed for %s", completion.execution_id)
            close = getattr(flush, "close", None)
            if close is not None:
                close()  # never awaited now: close it rather than leak a warning
