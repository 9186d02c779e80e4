"""The supervisor: one per process. Owns the pumps, heartbeats their leases, shuts down cleanly.

Started by :class:`~turnstream.TurnstreamMiddleware` on lifespan (or lazily on first use for
servers without lifespan); ``async with Supervisor(store) as supervisor:`` anywhere else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._adapter import ReconnectAdapter, RunHandle
from ._exceptions import (
    InvalidTurnInput,
    LeaseLost,
    RunFinished,
    StoreError,
    StoreUnavailable,
)
from ._hooks import Limits, TurnCompletion, TurnHooks
from ._identity import TurnIdentity, parse_execution_id
from ._live import LiveRun
from ._pump import Pump, PumpMode
from ._store import BeginOutcome, BeginResult, Lease, RunKey, TurnStore
from ._writer import LogWriter
from .stores._memory import MemoryStore

__all__ = ["Supervisor"]

logger = logging.getLogger("turnstream.supervisor")

DEFAULT_LEASE_MS = 10_000
_PERSIST_ATTEMPTS = 3


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Supervisor:
    """Runs the pumps of this process and keeps their leases alive.

    * ``lease_ms`` — how long an owner may go silent before another worker takes its runs
      over; the heartbeat renews every ``lease_ms / 3``.
    * ``shutdown_grace_s`` — on shutdown, how long running turns may go on before their
      leases are released for another worker to resume.
    * ``adapters`` — the reconnect adapters this worker can re-attach with (by
      ``RunHandle.kind``); with any, an orphan sweeper takes over lapsed reconnectable runs
      every ``sweep_interval_ms``, and ``hooks`` are the post hooks of such recovered runs.
    """

    def __init__(
        self,
        store: TurnStore | None = None,
        *,
        lease_ms: int = DEFAULT_LEASE_MS,
        heartbeat_ms: int | None = None,
        worker_id: str | None = None,
        limits: Limits | None = None,
        shutdown_grace_s: float = 10.0,
        follow_block_ms: int | None = None,
        adapters: Sequence[ReconnectAdapter] = (),
        hooks: TurnHooks | None = None,
        sweep_interval_ms: int | None = None,
    ) -> None:
        if lease_ms < 30:
            raise ValueError("lease_ms must be at least 30")
        self.store: TurnStore = store if store is not None else MemoryStore()
        self.lease_ms = lease_ms
        self.heartbeat_ms = heartbeat_ms if heartbeat_ms is not None else max(lease_ms // 3, 10)
        self.worker_id = worker_id or _default_worker_id()
        self.limits = limits or Limits()
        self.shutdown_grace_s = shutdown_grace_s
        # A reader blocked on the store re-checks the run twice a lease period, so it learns
        # of a dead owner about one lease period after the death.
        self.follow_block_ms = follow_block_ms or max(min(lease_ms // 2, 5_000), 10)
        self.writer = LogWriter(self.store)
        self._adapters: dict[str, ReconnectAdapter] = {}
        for adapter in adapters:
            self.register_adapter(adapter)
        # Post hooks for runs this worker recovers without a request (the sweeper).
        self.hooks = hooks or TurnHooks()
        self.sweep_interval_ms = sweep_interval_ms or max(lease_ms // 2, 10)
        self._pumps: dict[RunKey, Pump] = {}
        self._idle = anyio.Event()
        self._idle.set()
        self._tg: TaskGroup | None = None
        self._closing = False
        self._serving: tuple[anyio.Event, anyio.Event] | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._start_lock = anyio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._tg is not None

    async def start(self) -> None:
        """Start the writer, the heartbeat and the pumps' task group.

        On asyncio they run in a background task of their own, so :meth:`aclose` may be
        awaited from any task (lifespan handlers and test fixtures often start and stop in
        different tasks). On other event loops, start and close in the same task.
        """
        if self._tg is not None or self._serving is not None:
            raise RuntimeError("the supervisor is already started")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            await self._enter()
            return
        ready, stop, done = anyio.Event(), anyio.Event(), anyio.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            try:
                await self._enter()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                done.set()
                raise
            ready.set()
            try:
                await stop.wait()
                await self._shutdown()
            finally:
                done.set()

        self._serving = (stop, done)
        self._serve_task = loop.create_task(serve(), name=f"turnstream-supervisor-{self.worker_id}")
        await ready.wait()
        if failure:
            self._serving = None
            raise failure[0]

    async def _enter(self) -> None:
        self._closing = False
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self.writer.run)
            tg.start_soon(self._heartbeat)
            tg.start_soon(self._sweeper)
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        self._tg = tg

    async def ensure_started(self) -> None:
        """Start on first use when no lifespan started the supervisor."""
        if self._tg is not None:
            return
        async with self._start_lock:
            if self._tg is None:
                await self.start()

    async def aclose(self) -> None:
        """Drain for ``shutdown_grace_s``, then release the leases of what is still running."""
        if self._serving is not None:
            stop, done = self._serving
            stop.set()
            await done.wait()
            self._serving = None
            self._serve_task = None
            return
        await self._shutdown()

    async def _shutdown(self) -> None:
        tg = self._tg
        if tg is None:
            return
        self._closing = True
        with anyio.move_on_after(self.shutdown_grace_s):
            await self._idle.wait()
        for pump in list(self._pumps.values()):
            pump.abandon()  # its runner releases the lease so another worker resumes at once
        with anyio.move_on_after(5):
            await self._idle.wait()
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(None, None, None)
        finally:
            self._tg = None

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- turns -----------------------------------------------------------------------------

    def live_run(self, key: RunKey) -> LiveRun | None:
        pump = self._pumps.get(key)
        return pump.live if pump is not None else None

    def owns(self, key: RunKey) -> bool:
        return key in self._pumps

    async def begin(
        self,
        key: RunKey,
        *,
        input_hash: str,
        user_id: str,
    ) -> BeginResult:
        if self._closing:
            raise StoreUnavailable("this worker is shutting down")
        return await self.store.begin(
            key,
            input_hash=input_hash,
            user_id=user_id,
            holder=self.worker_id,
            lease_ms=self.lease_ms,
        )

    def start_pump(
        self,
        result: BeginResult,
        *,
        identity: TurnIdentity,
        input: Mapping[str, Any],
        hooks: TurnHooks,
        mode: PumpMode,
        adapter: ReconnectAdapter | None = None,
        handle: RunHandle | None = None,
    ) -> LiveRun:
        """Run the pump of a run this worker just leased (FRESH or TAKEOVER)."""
        if self._tg is None:
            raise RuntimeError("the supervisor is not started")
        assert result.lease is not None
        run = result.run
        live = LiveRun(run.key, first_seq=run.last_seq + 1)
        pump = Pump(
            self,
            key=run.key,
            lease=result.lease,
            identity=identity,
            input=input,
            hooks=hooks,
            attempt=run.attempt,
            last_seq=run.last_seq,
            mode=mode,
            live=live,
            adapter=adapter,
            handle=handle,
        )
        previous = self._pumps.get(run.key)
        if previous is not None:
            previous.lose_lease()  # our own stale pump: the new lease fences it anyway
        self._pumps[run.key] = pump
        self._idle = anyio.Event()
        self._tg.start_soon(self._run_pump, pump)
        return live

    async def _run_pump(self, pump: Pump) -> None:
        try:
            await pump.run()
        finally:
            if self._pumps.get(pump.key) is pump:
                del self._pumps[pump.key]
            if not self._pumps:
                self._idle.set()
            if not pump.finished and not pump.lost:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await self._release(pump.key, pump.lease)

    async def _release(self, key: RunKey, lease: Lease) -> None:
        try:
            await self.store.release(key, lease)
        except StoreError:
            logger.warning("could not release the lease on %s", key.execution_id)

    def register_adapter(self, adapter: ReconnectAdapter) -> None:
        """Let this worker re-attach to runs whose handle names ``adapter.kind``."""
        known = self._adapters.get(adapter.kind)
        if known is not None and known is not adapter:
            raise ValueError(f"another adapter is registered for kind {adapter.kind!r}")
        self._adapters[adapter.kind] = adapter

    def adapter_for(
        self, handle: Mapping[str, Any] | None
    ) -> tuple[ReconnectAdapter, RunHandle] | None:
        """The registered adapter for a persisted handle, with the handle parsed."""
        if handle is None:
            return None
        try:
            parsed = RunHandle.from_json(handle)
        except InvalidTurnInput:
            logger.warning("ignoring a malformed run handle: %r", handle)
            return None
        adapter = self._adapters.get(parsed.kind)
        return None if adapter is None else (adapter, parsed)

    async def recover(self, key: RunKey) -> bool:
        """Take over a lapsed, reconnectable run and re-attach to its substrate.

        True when the run now has a live owner (this worker, or one that beat us to it).
        A run without a handle (its producer is not reconnectable) is left for the next
        request of its turn, which restarts it.
        """
        if self._tg is None or self._closing:
            return False
        if key in self._pumps:
            return True
        run = await self.store.get_run(key)
        if run is None or run.status.finished:
            return False
        if run.lease_live:
            return True
        found = self.adapter_for(run.handle)
        if found is None:
            return False
        result = await self.store.claim(key, holder=self.worker_id, lease_ms=self.lease_ms)
        if result is None or result.outcome is BeginOutcome.COMPLETED:
            return False
        if result.outcome is not BeginOutcome.TAKEOVER:
            return result.outcome is BeginOutcome.LIVE
        adapter, handle = found
        project, session, turn = parse_execution_id(key.execution_id)
        identity = TurnIdentity(key.tenant_id, project, session, result.run.user_id, turn)
        logger.info("re-attaching to %s after %s", key.execution_id, result.run.last_seq)
        self.start_pump(
            result,
            identity=identity,
            input={},
            hooks=self.hooks,
            mode="resume",
            adapter=adapter,
            handle=handle,
        )
        return True

    async def cancel(self, key: RunKey) -> bool:
        """Raise the run's cancel flag; the owner (here or elsewhere) sees it within a
        heartbeat. True when the run exists and is unfinished."""
        requested = await self.store.request_cancel(key)
        pump = self._pumps.get(key)
        if pump is not None:
            pump.request_cancel()
        return requested

    # -- background work -------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_ms / 1000)
            pumps = list(self._pumps.values())
            if not pumps:
                continue
            async with anyio.create_task_group() as tg:
                for pump in pumps:
                    tg.start_soon(self._renew, pump)

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self.sweep_interval_ms / 1000)
            if not self._adapters or self._closing:
                continue
            try:
                keys = await self.store.lapsed_runs(limit=50)
            except StoreError:
                logger.warning("the orphan sweeper could not list lapsed runs")
                continue
            for key in keys:
                try:
                    await self.recover(key)
                except StoreError:
                    logger.warning("could not recover %s", key.execution_id)
                except Exception:
                    logger.exception("recovering %s failed", key.execution_id)

    async def _renew(self, pump: Pump) -> None:
        if pump.finished or pump.lost:
            return
        try:
            renewed = await self.store.renew(pump.key, pump.lease, lease_ms=self.lease_ms)
        except LeaseLost:
            if not pump.finished:
                logger.warning("lost the lease on %s", pump.key.execution_id)
                pump.lose_lease()
            return
        except RunFinished:
            # This pump's own finish landed while the renew was in flight (the store says
            # RunFinished only to the lease that finished the run): nothing left to renew.
            return
        except StoreError:
            logger.warning("could not renew the lease on %s", pump.key.execution_id)
            return
        except Exception:
            logger.exception("renewing the lease on %s failed", pump.key.execution_id)
            return
        if renewed.cancel_requested:
            pump.request_cancel()

    def spawn_post_hooks(self, completion: TurnCompletion, hooks: TurnHooks) -> None:
        if self._tg is None:
            return
        self._tg.start_soon(self._post_hooks, completion, hooks)

    async def _post_hooks(self, completion: TurnCompletion, hooks: TurnHooks) -> None:
        if hooks.persist_assistant_message is not None:
            text = completion.final_text
            if hooks.transform_final_text is not None:
                try:
                    text = hooks.transform_final_text(text)
                except Exception:
                    logger.exception("transform_final_text failed; persisting the raw text")
            for attempt in range(1, _PERSIST_ATTEMPTS + 1):
                try:
                    await hooks.persist_assistant_message(completion, text)
                    break
                except Exception:
                    logger.exception(
                        "persist_assistant_message failed for %s (try %d of %d)",
                        completion.execution_id,
                        attempt,
                        _PERSIST_ATTEMPTS,
                    )
                    await anyio.sleep(0.1 * 2**attempt)
        if hooks.on_turn_complete is not None:
            try:
                await hooks.on_turn_complete(completion)
            except Exception:
                logger.exception("on_turn_complete failed for %s", completion.execution_id)
        if hooks.trace_flush is not None:
            flush = hooks.trace_flush
            if hooks.wait_until is not None:
                hooks.wait_until(flush())
            else:
                try:
                    await flush()
                except Exception:
                    logger.exception("trace_flush failed for %s", completion.execution_id)
