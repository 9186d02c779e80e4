"""Readiness: may this worker be sent turns right now?

    app = Starlette(routes=[Route("/readyz", turnstream.readiness(supervisor))])

Ready means two things: the supervisor runs (started by the lifespan, not yet stopped), and
the store answers a ``ping()`` within a short timeout. Anything else is a 503 problem
document with ``Retry-After``, so a load balancer or an orchestrator's probe takes the worker
out of rotation during a store outage or a shutdown, and back in as soon as it passes again:
nothing is cached, every probe asks the store afresh.

This is readiness, not liveness: a worker whose store is down is healthy and recovers by
itself; restarting it (what a failed liveness probe does) would only add a crash loop to the
outage.
"""

from __future__ import annotations

import logging
from typing import Final

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._exceptions import StoreError, StoreUnavailable
from ._problems import (
    DEFAULT_RETRY_AFTER,
    PROBLEM_TYPE_BASE,
    ProblemResponse,
    problem_for_exception,
)
from ._supervisor import Supervisor

__all__ = ["DEFAULT_READINESS_TIMEOUT_S", "ReadinessCheck", "readiness"]

logger = logging.getLogger("turnstream.health")

# Below the one-second default of common probes (Kubernetes' timeoutSeconds), so the check
# answers "not ready" itself rather than the probe giving up on a hung store.
DEFAULT_READINESS_TIMEOUT_S: Final = 0.5

_NOT_READY_TYPE: Final = PROBLEM_TYPE_BASE + "not-ready"


class ReadinessCheck:
    """An ASGI app: ``200 {"status": "ready"}``, or a 503 problem document with ``Retry-After``.

    Mount it on any path (``Route("/readyz", check)``, ``Mount``, FastAPI's
    ``app.add_route``). It answers ``GET`` and ``HEAD``; other methods are a 405. Code that
    is no ASGI app (a Django view) awaits :meth:`problem` instead.

    The supervisor is never started from here: the lifespan starts it, and a probe that
    started it again would bring back a worker that was shut down. While the supervisor
    drains on shutdown it still counts as running: servers such as uvicorn stop accepting
    connections before the lifespan shutdown, and new turns are 503s meanwhile anyway. Under
    a server that runs no lifespan, start the supervisor yourself (``await
    supervisor.start()``), or the check says "not ready" until the first turn starts it
    lazily.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        timeout_s: float = DEFAULT_READINESS_TIMEOUT_S,
        retry_after: int = DEFAULT_RETRY_AFTER,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.supervisor = supervisor
        self.timeout_s = timeout_s
        self.retry_after = retry_after

    async def problem(self) -> ProblemResponse | None:
        """``None`` when ready, else the 503 problem response that says why not."""
        if not self.supervisor.started or self.supervisor.closing:
            # Closing: draining for shutdown, so a load balancer should stop sending turns.
            return ProblemResponse(
                503,
                "Not ready",
                "The turn supervisor is not running.",
                type=_NOT_READY_TYPE,
                retry_after=self.retry_after,
            )
        try:
            with anyio.fail_after(self.timeout_s):
                await self.supervisor.store.ping()
        except TimeoutError:
            logger.debug("not ready: the store did not answer a ping within %s s", self.timeout_s)
        except StoreError as exc:
            logger.debug("not ready: %s", exc)
        except Exception as exc:
            # Not the store's contract (a closed store raises RuntimeError, say): still "not
            # ready", because a probe needs an answer it can act on, never a 500.
            logger.warning("not ready: the store's ping() raised %r", exc)
        else:
            return None
        # The very document a turn route answers during the outage; the cause stays in the log.
        return problem_for_exception(
            StoreUnavailable("the store is unavailable"), retry_after=self.retry_after
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"the readiness check serves HTTP only, not {scope['type']!r}")
        response: Response | None
        if scope["method"] not in ("GET", "HEAD"):
            response = ProblemResponse(
                405, "Method Not Allowed", None, headers={"Allow": "GET, HEAD"}
            )
        else:
            response = await self.problem()
            if response is None:
                response = Response(
                    orjson.dumps({"status": "ready"}),
                    media_type="application/json",
                    headers={"Cache-Control": "no-store"},
                )
        await response(scope, receive, send)


def readiness(
    supervisor: Supervisor,
    *,
    timeout_s: float = DEFAULT_READINESS_TIMEOUT_S,
    retry_after: int = DEFAULT_RETRY_AFTER,
) -> ReadinessCheck:
    """A readiness check to mount: 200 when ``supervisor`` runs and its store answers a ping
    within ``timeout_s``, else a 503 problem document with ``Retry-After: retry_after``."""
    return ReadinessCheck(supervisor, timeout_s=timeout_s, retry_after=retry_after)
