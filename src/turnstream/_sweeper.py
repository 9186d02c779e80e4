"""The sweeper: what a worker does for runs that no request comes back for.

Every ``sweep_interval_ms`` it asks the store for

* re-attachable runs whose lease lapsed (their owner died while a substrate runs on): taken
  over and re-attached, so the run goes on without any client;
* local runs lapsed for ``orphan_after_ms`` (their producer died with its worker, and no
  request restarted the turn): taken over and ended, ``owner_lost``, so no run stays
  ``running`` forever;
* finished runs whose persistence nobody confirmed within ``persist_after_ms``: persisted
  with the supervisor's own hook (at least once, across processes).

Each candidate is confirmed by an atomic store call (``claim``, ``claim_persist``), so any
number of workers may sweep at once. No error of one candidate stops the sweep.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from ._exceptions import StoreError
from ._faults import fault_point
from ._hooks import TurnCompletion
from ._identity import TurnIdentity, parse_execution_id
from ._store import BeginOutcome, RunKey, RunRecord

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["Sweeper"]

logger = logging.getLogger("turnstream.supervisor")

_PAGE: Final = 50


def _identity(key: RunKey, user_id: str) -> TurnIdentity:
    project, session, turn = parse_execution_id(key.execution_id)
    return TurnIdentity(key.tenant_id, project, session, user_id, turn)


class Sweeper:
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    async def sweep(self) -> None:
        """One pass; never raises (it logs)."""
        supervisor = self._supervisor
        try:
            keys = await supervisor.store.lapsed_runs(
                limit=_PAGE, local_after_ms=supervisor.orphan_after_ms
            )
        except StoreError as exc:
            logger.warning("the sweeper could not list lapsed runs: %s", exc)
            keys = []
        for key in keys:
            try:
                await self.recover(key, end_local=True)
            except StoreError as exc:
                logger.warning("could not recover %s: %s", key.execution_id, exc)
            except Exception:
                logger.exception("recovering %s failed", key.execution_id)
        if supervisor.hooks.persist_assistant_message is None:
            return  # nothing here could persist a run
        try:
            pending = await supervisor.store.pending_persists(limit=_PAGE)
        except StoreError as exc:
            logger.warning("the sweeper could not list pending persistence: %s", exc)
            return
        for key in pending:
            try:
                await self._persist(key)
            except StoreError as exc:
                logger.warning("could not claim the persistence of %s: %s", key.execution_id, exc)
            except Exception:
                logger.exception("persisting %s failed", key.execution_id)

    async def recover(self, key: RunKey, *, end_local: bool) -> bool:
        """Take a lapsed run over: re-attach it, or (``end_local``) end a local one.

        True when the run now has a live owner (this worker, or one that beat us to it).
        """
        supervisor = self._supervisor
        if supervisor.task_group is None or supervisor.closing:
            return False
        if supervisor.owns(key):
            return True
        run = await supervisor.store.get_run(key)
        if run is None or run.status.finished:
            return False
        if run.lease_live:
            return True
        found = supervisor.adapter_for(run.handle)
        if found is None and not (end_local and run.handle is None):
            # A handle of a kind this worker cannot attach: another worker may.
            return False
        result = await supervisor.store.claim(
            key, holder=supervisor.worker_id, lease_ms=supervisor.lease_ms
        )
        if result is None or result.outcome is BeginOutcome.COMPLETED:
            return False
        if result.outcome is not BeginOutcome.TAKEOVER:
            return result.outcome is BeginOutcome.LIVE
        fault_point("sweeper.after_claim")
        identity = _identity(key, result.run.user_id)
        if found is None:
            logger.warning(
                "ending %s: its owner died %d ms ago and no request restarted it",
                key.execution_id,
                result.run.observed_at_ms - run.lease_expires_at_ms,
            )
            supervisor.start_pump(
                result, identity=identity, input={}, hooks=supervisor.hooks, mode="orphan"
            )
            return True
        adapter, handle = found
        logger.info("re-attaching to %s after %s", key.execution_id, result.run.last_seq)
        supervisor.start_pump(
            result,
            identity=identity,
            input={},
            hooks=supervisor.hooks,
            mode="resume",
            adapter=adapter,
            handle=handle,
        )
        return True

    async def _persist(self, key: RunKey) -> None:
        supervisor = self._supervisor
        record = await supervisor.store.claim_persist(
            key, holder=supervisor.worker_id, lease_ms=supervisor.persist_after_ms
        )
        if record is None:
            return  # not due, already done, or another worker took it
        logger.info("persisting %s for an owner that did not confirm it", key.execution_id)
        supervisor.post_hooks.spawn(
            self._completion(record), supervisor.hooks, persist=True, only_persist=True
        )

    @staticmethod
    def _completion(record: RunRecord) -> TurnCompletion:
        return TurnCompletion(
            identity=_identity(record.key, record.user_id),
            execution_id=record.key.execution_id,
            status=record.status.value,
            final_text=record.final_text or "",
            attempt=record.attempt,
            last_seq=record.last_seq,
        )
