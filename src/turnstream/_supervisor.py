"""The supervisor: one per process. Owns the pumps, heartbeats their leases, shuts down cleanly.

Started by :class:`~turnstream.TurnstreamMiddleware` on lifespan (or lazily on first use for
servers without lifespan); ``async with Supervisor(store) as supervisor:`` anywhere else.

Nothing that goes wrong in one turn, one hook or one store call may end the supervisor: its
background loops restart after an error, pumps and hooks contain their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from ._adapter import ReconnectAdapter, RunHandle
from ._exceptions import InvalidTurnInput, LeaseLost, RunFinished, StoreError, StoreUnavailable
from ._hooks import Limits, TurnCompletion, TurnHooks
from ._identity import TurnIdentity
from ._live import LiveRun
from ._posthooks import PostHooks
from ._pump import Pump, PumpMode
from ._redact import Redact
from ._store import BeginResult, Lease, RenewRequest, RenewResult, RunKey, TurnStore
from ._sweeper import Sweeper
from ._writer import LogWriter
from .stores._memory import MemoryStore

__all__ = ["Supervisor"]

logger = logging.getLogger("turnstream.supervisor")

Access = Literal["user", "tenant"]
DEFAULT_LEASE_MS = 10_000
_LOOP_RESTART_S = 1.0
_RENEW_RETRY_FIRST_S = 0.05
_ADAPTER_CLOSE_S = 5.0  # per adapter, when the supervisor stops


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Supervisor:
    """Runs the pumps of this process and keeps their leases alive.

    * ``lease_ms`` — how long an owner may go silent before another worker takes its runs
      over; the heartbeat renews every ``heartbeat_ms`` (default ``lease_ms / 3``), and
      retries within 50 ms to ``heartbeat_ms`` when the store did not answer.
    * ``shutdown_grace_s`` — on shutdown, how long running turns and their post hooks may go
      on before the leases of what still runs are released for another worker to resume.
    * ``adapters`` — the reconnect adapters this worker can re-attach with (by
      ``RunHandle.kind``): the sweeper re-attaches lapsed runs of those kinds.
    * ``hooks`` — the default hooks of every turn (``handle_chat_turn`` without ``hooks=``),
      and the hooks of runs this worker recovers without a request (sweeper, resume route):
      set ``persist_assistant_message`` here so that a recovered turn is persisted too.
    * ``store_retry_s`` — how long a pump retries a store that does not answer before it
      gives the turn up (it then ends it, failed with ``store_unavailable``, once the store
      answers again). An outage shorter than this loses nothing and calls the model once.
    * ``outage_notice_s`` — how long a reader waits on a store that does not answer before it
      tells its client in-band (``error`` with ``code: store_unavailable``) and ends.
    * ``orphan_after_ms`` — a local turn (nothing can re-attach to it) whose owner died, and
      that no request came back for within this long after its lease lapsed, is ended by the
      sweeper: ``error`` ``owner_lost`` (retryable), then ``session.run.failed``.
    * ``persist_after_ms`` — a finished turn whose ``persist_assistant_message`` has not
      confirmed within this long is persisted by the sweeper of any worker.
    * ``sweep_interval_ms`` — how often the sweeper looks (default ``lease_ms / 2``).
    * ``access`` — who may see a turn: ``"user"`` (default) — a turn belongs to the user who
      started it; the user is part of the run's name, so two users' equal session ids never
      meet, and any other user gets exactly what an unknown execution id gets, on every
      route. ``"tenant"`` — the users of a tenant share sessions (a team chat): any of them
      may join, replay, cancel or read a turn, and posting the same turn joins it.
    * ``redact`` — a :class:`~turnstream.Redact`: keys and patterns masked in every event
      before it is logged, so no secret a producer or substrate emits reaches the store, a
      client or the logs (None: nothing is masked, and nothing costs anything).
    * ``stall_timeout_s`` — a producer or substrate that sends nothing for this long (while
      nothing of turnstream's holds it back) is stalled: a substrate is re-attached once
      after its last event, then the turn fails in-band (``error`` ``stalled``, retryable).
      Checked at every heartbeat, so it fires up to ``heartbeat_ms`` late. ``None``: never.
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
        store_retry_s: float = 30.0,
        outage_notice_s: float = 5.0,
        orphan_after_ms: int = 60_000,
        persist_after_ms: int = 30_000,
        stall_timeout_s: float | None = 120.0,
        access: Access = "user",
        redact: Redact | None = None,
    ) -> None:
        if lease_ms < 30:
            raise ValueError("lease_ms must be at least 30")
        if store_retry_s < 0 or outage_notice_s <= 0:
            raise ValueError("store_retry_s must not be negative, outage_notice_s positive")
        if orphan_after_ms < 0 or persist_after_ms < 1:
            raise ValueError("orphan_after_ms must not be negative, persist_after_ms positive")
        for name, value in (
            ("heartbeat_ms", heartbeat_ms),
            ("follow_block_ms", follow_block_ms),
            ("sweep_interval_ms", sweep_interval_ms),
        ):
            if value is not None and value < 1:
                # 0 or less would make a loop spin (or, read with `or`, quietly the default).
                raise ValueError(f"{name} must be at least 1 (or None: the default)")
        if access not in ("user", "tenant"):
            raise ValueError(f"access must be 'user' or 'tenant', not {access!r}")
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError("stall_timeout_s must be positive (or None: no stall watch)")
        self.store: TurnStore = store if store is not None else MemoryStore()
        self.lease_ms = lease_ms
        self.heartbeat_ms = heartbeat_ms if heartbeat_ms is not None else max(lease_ms // 3, 10)
        self.worker_id = worker_id or _default_worker_id()
        self.limits = limits or Limits()
        self.shutdown_grace_s = shutdown_grace_s
        # A reader blocked on the store re-checks the run twice a lease period, so it learns
        # of a dead owner about one lease period after the death.
        self.follow_block_ms = (
            follow_block_ms
            if follow_block_ms is not None
            else max(min(lease_ms // 2, 5_000), 10)
        )
        self.store_retry_s = store_retry_s
        self.outage_notice_s = outage_notice_s
        self.orphan_after_ms = orphan_after_ms
        self.persist_after_ms = persist_after_ms
        self.stall_timeout_s = stall_timeout_s
        self.access: Access = access
        self.redact = redact
        self.writer = LogWriter(self.store)
        self._adapters: dict[str, ReconnectAdapter] = {}
        for adapter in adapters:
            self.register_adapter(adapter)
        self.hooks = hooks or TurnHooks()
        self.sweep_interval_ms = (
            sweep_interval_ms if sweep_interval_ms is not None else max(lease_ms // 2, 10)
        )
        self.post_hooks = PostHooks(self)
        self._sweeper = Sweeper(self)
        self._pumps: dict[RunKey, Pump] = {}
        self._idle = anyio.Event()
        self._idle.set()
        self._tg: TaskGroup | None = None
        self._closing = False
        self._stop: anyio.Event | None = None
        self._done: anyio.Event | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._start_lock = anyio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._tg is not None

    @property
    def task_group(self) -> TaskGroup | None:
        """Where pumps and post hooks run (None unless started)."""
        return self._tg

    async def start(self) -> None:
        """Start the writer, the heartbeat, the sweeper and the pumps' task group.

        They run in a background task of their own, so :meth:`aclose` may be awaited from
        any task (lifespan handlers and test fixtures often start and stop in different
        tasks). Needs asyncio (every ASGI server runs on it). No store round trip: a worker
        starts while its store is down and answers 503 until it is back.
        """
        if self._serve_task is not None:
            raise RuntimeError("the supervisor is already started")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("the turnstream supervisor runs on asyncio") from None
        ready, self._stop, self._done = anyio.Event(), anyio.Event(), anyio.Event()
        task = loop.create_task(self._serve(ready), name=f"turnstream-supervisor-{self.worker_id}")
        self._serve_task = task
        await ready.wait()
        if self._tg is None:  # it failed to start: its exception says why
            self._serve_task = None
            await task

    async def _serve(self, ready: anyio.Event) -> None:
        assert self._stop is not None and self._done is not None
        self._closing = False
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.writer.run)
                tg.start_soon(self._keep_running, "heartbeat", self._heartbeat)
                tg.start_soon(self._keep_running, "sweeper", self._sweep)
                self._tg = tg
                ready.set()
                await self._stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            await self._close_adapters()
            ready.set()
            self._done.set()

    async def _close_adapters(self) -> None:
        # Shielded and bounded: this runs when the server cancels the lifespan too.
        with anyio.CancelScope(shield=True):
            for adapter in self._adapters.values():
                aclose = getattr(adapter, "aclose", None)
                if aclose is None:
                    continue
                with anyio.move_on_after(_ADAPTER_CLOSE_S):
                    try:
                        await aclose()
                    except Exception:
                        logger.exception("closing the %s adapter failed", adapter.kind)

    async def _keep_running(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await loop()
                return
            except Exception:
                logger.exception("the supervisor's %s failed; it starts again", name)
                await anyio.sleep(_LOOP_RESTART_S)

    async def ensure_started(self) -> None:
        """Start on first use when no lifespan started the supervisor."""
        if self._tg is not None:
            return
        async with self._start_lock:
            if self._tg is None:
                await self.start()

    async def aclose(self) -> None:
        """Drain for ``shutdown_grace_s``, then release the leases of what is still running."""
        task, stop, done = self._serve_task, self._stop, self._done
        if task is None or stop is None or done is None:
            return
        stop.set()
        await done.wait()
        self._serve_task = None
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _drain(self) -> None:
        self._closing = True
        with anyio.move_on_after(self.shutdown_grace_s):
            await self._idle.wait()
            await self.post_hooks.wait_idle()  # within the same grace period
        for pump in list(self._pumps.values()):
            pump.abandon()  # its runner releases the lease so another worker resumes at once
        with anyio.move_on_after(5):
            await self._idle.wait()

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

    @property
    def closing(self) -> bool:
        return self._closing

    def run_key(self, tenant_id: str, user_id: str, execution_id: str) -> RunKey:
        """The run an execution id names for this caller, under this supervisor's ``access``:
        the user is part of it unless the tenant's sessions are shared."""
        return RunKey(tenant_id, execution_id, user_id if self.access == "user" else None)

    def key_of(self, completion: TurnCompletion) -> RunKey:
        identity = completion.identity
        return self.run_key(identity.tenant_id, identity.user_id, completion.execution_id)

    async def begin(
        self, key: RunKey, *, input_hash: str, user_id: str, reopen_failed: bool = False
    ) -> BeginResult:
        if self._closing:
            raise StoreUnavailable("this worker is shutting down")
        # Only when asked: a store written before reopen_failed serves every other begin.
        extra = {"reopen_failed": True} if reopen_failed else {}
        return await self.store.begin(
            key,
            input_hash=input_hash,
            user_id=user_id,
            holder=self.worker_id,
            lease_ms=self.lease_ms,
            **extra,
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
        if run.cancel_requested:
            pump.request_cancel()  # raised while nobody owned it: see Pump._run
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
        except Exception:
            logger.warning("could not release the lease on %s", key.execution_id)

    def register_adapter(self, adapter: ReconnectAdapter) -> None:
        """Let this worker re-attach to runs whose handle names ``adapter.kind``.

        An app may build its adapter per request: another instance of the same class for a
        kind already registered is fine (the first one serves recovered runs).
        """
        known = self._adapters.get(adapter.kind)
        if known is None:
            self._adapters[adapter.kind] = adapter
        elif known is not adapter and type(known) is not type(adapter):
            raise ValueError(
                f"adapters of two classes claim kind {adapter.kind!r}: "
                f"{type(known).__name__} and {type(adapter).__name__}"
            )

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
        request of its turn, which restarts it (or, much later, for the sweeper to end).
        """
        return await self._sweeper.recover(key, end_local=False)

    async def cancel(self, key: RunKey) -> bool:
        """Raise the run's cancel flag; the owner (here or elsewhere) sees it within a
        heartbeat. True when the run exists and is unfinished."""
        requested = await self.store.request_cancel(key)
        pump = self._pumps.get(key)
        if pump is not None:
            pump.request_cancel()
        return requested

    def spawn_post_hooks(
        self, completion: TurnCompletion, hooks: TurnHooks, *, persist: bool
    ) -> None:
        self.post_hooks.spawn(completion, hooks, persist=persist)

    # -- background work -------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        delay = self.heartbeat_ms / 1000
        retry = _RENEW_RETRY_FIRST_S
        while True:
            await anyio.sleep(delay)
            self._check_stalls()
            if await self._renew_all(list(self._pumps.values())):
                # Some renewal got no answer: try again soon, so that an owner cut off by an
                # outage renews before anyone else's request sees its lease lapsed.
                delay = min(retry, self.heartbeat_ms / 1000)
                retry *= 2
            else:
                delay, retry = self.heartbeat_ms / 1000, _RENEW_RETRY_FIRST_S

    def _check_stalls(self) -> None:
        timeout_s = self.stall_timeout_s
        if timeout_s is None:
            return
        now = anyio.current_time()
        for pump in self._pumps.values():
            if pump.producing.check_stall(now, timeout_s):
                logger.warning(
                    "%s sent nothing for %g s: stalled", pump.key.execution_id, timeout_s
                )

    async def _renew_all(self, pumps: Sequence[Pump]) -> bool:
        """Renew every pump's lease in one store round trip; True when some got no answer."""
        pumps = [pump for pump in pumps if not pump.finished and not pump.lost]
        if not pumps:
            return False
        try:
            results: Sequence[RenewResult | Exception] = await self.store.renew_batch(
                [RenewRequest(pump.key, pump.lease) for pump in pumps], lease_ms=self.lease_ms
            )
        except StoreError as exc:
            logger.warning("could not renew %d leases: %s", len(pumps), exc)
            return True
        failed = False
        for pump, result in zip(pumps, results, strict=True):
            if isinstance(result, LeaseLost):
                if not pump.finished:
                    logger.warning("lost the lease on %s", pump.key.execution_id)
                    pump.lose_lease()
            elif isinstance(result, RunFinished):
                # This pump's own finish landed while the renew was in flight (the store says
                # RunFinished only to the lease that finished the run): nothing to renew.
                pass
            elif isinstance(result, StoreError):
                failed = True
            elif isinstance(result, Exception):
                logger.error("renewing the lease on %s failed: %r", pump.key.execution_id, result)
            elif result.cancel_requested:
                pump.request_cancel()
        return failed

    async def _sweep(self) -> None:
        while True:
            await anyio.sleep(self.sweep_interval_ms / 1000)
            if not self._closing:
                await self._sweeper.sweep()
