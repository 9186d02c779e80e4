"""Several demo workers on one host, and the page's "kill this worker" button.

``turnstream demo --workers N --redis URL`` runs N uvicorn worker processes over one Redis.
Each worker registers its PID under its supervisor's worker id (the id a turn's lease names
as its holder) in a directory the command line made for this run. The kill route sends
``SIGKILL`` to the worker holding a turn's lease, so a person can watch the turn go on in
another worker once the lease lapses.

What keeps it from being a "kill any process" endpoint:

* the routes exist only when the command line asked for several workers on a loopback
  address (``create_demo_app(registry_dir=…)``); a single worker has nothing to show;
* the target is a PID some worker registered, and is only killed while ``/proc`` shows it
  alive as a child of this worker's own parent (the uvicorn supervisor): a stale entry whose
  PID was reused by something else is refused;
* the turn must be the caller's (the demo's tenant and user), and the request a JSON POST,
  which a cross-site form cannot send without a CORS preflight.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Final

import anyio
import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._exceptions import RunNotFound, TurnstreamError
from .._identity import parse_execution_id
from .._middleware import Principal
from .._problems import ProblemResponse, problem_for_exception
from .._store import RunKey
from .._supervisor import Supervisor

__all__ = ["WORKER_HEADER", "WorkerHeader", "WorkerRegistry", "worker_routes"]

WORKER_HEADER: Final = "X-Demo-Worker"
# A worker that kills itself answers first: its reply must leave before the signal lands.
_SELF_KILL_DELAY_S: Final = 0.2


def _parent_of(pid: int) -> int | None:
    """The parent PID of a live process, from ``/proc`` (None: gone, a zombie, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 2 or fields[0] in ("Z", "X"):
        return None
    return int(fields[1])


class WorkerRegistry:
    """Worker id → PID, one small JSON file per worker in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _path(self, worker_id: str) -> Path:
        # A worker id holds a host name and colons: hashed into a safe file name.
        return self.directory / (hashlib.sha256(worker_id.encode()).hexdigest()[:32] + ".json")

    def register(self, worker_id: str) -> None:
        entry = {"workerId": worker_id, "pid": os.getpid(), "ppid": os.getppid()}
        path = self._path(worker_id)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(orjson.dumps(entry))
        partial.replace(path)  # atomic: a reader never sees half an entry

    def unregister(self, worker_id: str) -> None:
        self._path(worker_id).unlink(missing_ok=True)

    def pid_of(self, worker_id: str) -> int | None:
        """The live sibling worker registered as ``worker_id``, or None."""
        try:
            entry = orjson.loads(self._path(worker_id).read_bytes())
            pid, ppid, registered_as = int(entry["pid"]), int(entry["ppid"]), entry["workerId"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if registered_as != worker_id or ppid != os.getppid() or pid <= 1:
            return None
        return pid if _parent_of(pid) == ppid else None


class WorkerHeader:
    """Names the worker process that served each response (``X-Demo-Worker: <pid>``), so the
    page can show which worker each of its connections reached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.value = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((WORKER_HEADER.lower().encode(), self.value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _json(
    value: object, *, status: int = 200, background: BackgroundTask | None = None
) -> Response:
    return Response(
        orjson.dumps(value),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
        background=background,
    )


def worker_routes(
    *,
    supervisor: Supervisor,
    registry: WorkerRegistry,
    authorize: Callable[[Request], Principal],
) -> list[Route]:
    """``GET /demo/turns/{id}/owner`` and ``POST /demo/turns/{id}/kill`` (see the module)."""

    async def visible_run(request: Request) -> tuple[RunKey, int | None, dict[str, object]]:
        execution_id: str = request.path_params["execution_id"]
        parse_execution_id(execution_id)
        principal = authorize(request)
        key = supervisor.run_key(principal.tenant_id, principal.user_id, execution_id)
        run = await supervisor.store.get_run(key)
        if run is None or run.user_id != principal.user_id:
            raise RunNotFound("no such turn")
        holder = run.lease_holder if run.lease_live and not run.status.finished else None
        pid = registry.pid_of(holder) if holder is not None else None
        document: dict[str, object] = {
            "executionId": execution_id,
            "status": run.status.value,
            "attempt": run.attempt,
            "workerId": holder,
            "pid": pid,
            "leaseExpiresAt": run.lease_expires_at_ms,
        }
        return key, pid, document

    async def owner(request: Request) -> Response:
        try:
            _, _, document = await visible_run(request)
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        return _json(document)

    async def kill(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            return ProblemResponse(415, "Unsupported Media Type", "kill takes a JSON POST")
        try:
            _, pid, document = await visible_run(request)
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        if pid is None:
            detail = (
                "the turn has ended"
                if document["status"] != "running"
                else "no live demo worker of this host holds the turn's lease"
            )
            return ProblemResponse(409, "Conflict", detail)
        document["killed"] = pid
        if pid == os.getpid():
            # Answer first, then die: the caller learns which worker went.
            async def kill_self() -> None:
                await anyio.sleep(_SELF_KILL_DELAY_S)
                os.kill(pid, signal.SIGKILL)

            return _json(document, status=202, background=BackgroundTask(kill_self))
        os.kill(pid, signal.SIGKILL)
        return _json(document, status=202)

    return [
        Route("/demo/turns/{execution_id}/owner", owner, methods=["GET"]),
        Route("/demo/turns/{execution_id}/kill", kill, methods=["POST"]),
    ]
