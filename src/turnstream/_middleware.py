"""Pure ASGI middleware: starts/stops the supervisor on lifespan and serves the turn routes.

    GET  {prefix}/{execution_id}/stream   resume or replay from Last-Event-ID / ?after=
    POST {prefix}/{execution_id}/cancel   idempotent cancel (a JSON object body), 202
    GET  {prefix}/{execution_id}          the run record as JSON

Everything else passes through untouched.
"""

from __future__ import annotations

import logging
from typing import Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._authorize import Authorize, Principal, authorize_request
from ._exceptions import InvalidTurnInput, RunNotFound, TurnstreamError
from ._framing import negotiate_format, parse_cursor
from ._handler import stream_run
from ._identity import parse_execution_id
from ._problems import ProblemResponse, problem_for_exception
from ._requests import read_json_body
from ._store import RunKey, RunRecord
from ._supervisor import Supervisor

__all__ = ["Principal", "TurnstreamMiddleware"]

logger = logging.getLogger("turnstream.middleware")


LifespanMode = Literal["auto", "own", "forward"]

_START_FAILED = "the turnstream supervisor failed to start"


class TurnstreamMiddleware:
    """Wrap an ASGI app: ``app = TurnstreamMiddleware(app, supervisor=s, authorize=auth)``.

    ``authorize(request)`` returns the caller's :class:`Principal`, or raises
    :class:`~turnstream.Unauthorized` (401) or :class:`~turnstream.Forbidden` /
    ``PermissionError`` (403); anything else it raises is a logged 500. A run is visible
    only to its tenant and, under ``Supervisor(access="user")`` (the default), to the user who
    started it; anyone else gets exactly what an unknown execution id gets.

    The lifespan starts the supervisor before the app's own startup and drains it before the
    app's own shutdown (running turns may still need the app's resources). ``lifespan``:

    * ``"auto"`` (default): forward the lifespan to the app; when the app does not speak it
      (it raises or returns before answering the startup, as Django's ``ASGIHandler`` does),
      answer it here for the supervisor;
    * ``"forward"``: forward only; the app must speak lifespan and its errors propagate;
    * ``"own"``: never show the app a lifespan scope; answer it here.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        supervisor: Supervisor,
        authorize: Authorize[Request],
        prefix: str = "/turns",
        lifespan: LifespanMode = "auto",
    ) -> None:
        if lifespan not in ("auto", "own", "forward"):
            raise ValueError(f"lifespan must be 'auto', 'own' or 'forward', not {lifespan!r}")
        if not prefix.startswith("/") or not prefix.strip("/"):
            # "" or "/" would make every one-segment path a turn route, "turns" none at all.
            raise ValueError(f"prefix must be a path like '/turns', not {prefix!r}")
        self.app = app
        self.lifespan = lifespan
        self.supervisor = supervisor
        self.authorize = authorize
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] == "http":
            path: str = scope["path"]
            # Under Mount("/api", …) or `uvicorn --root-path /api`, `path` is the full path
            # and `root_path` the part in front of this app (as Starlette's routing reads it).
            root_path: str = scope.get("root_path", "")
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :]
            if path.startswith(self.prefix + "/"):
                response = await self._route(scope, receive, path[len(self.prefix) + 1 :])
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    # -- lifespan --------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self.lifespan == "own":
                await self._serve_lifespan(receive, send)
            else:
                await self._forward_lifespan(scope, receive, send)
        finally:
            if self.supervisor.started:
                await self.supervisor.aclose()

    async def _forward_lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        supervisor = self.supervisor
        startup_received = False
        startup_answered = False
        failed = False

        async def wrapped_receive() -> Message:
            nonlocal failed, startup_received
            message = await receive()
            if message["type"] == "lifespan.startup":
                startup_received = True
                failed = not await self._start_supervisor()
            elif message["type"] == "lifespan.shutdown" and supervisor.started:
                # Before the app's own shutdown: running turns may still need its resources.
                await supervisor.aclose()
            return message

        async def wrapped_send(message: Message) -> None:
            nonlocal startup_answered
            if message["type"].startswith("lifespan.startup."):
                startup_answered = True
                if message["type"] == "lifespan.startup.complete" and failed:
                    message = {"type": "lifespan.startup.failed", "message": _START_FAILED}
            await send(message)

        try:
            await self.app(scope, wrapped_receive, wrapped_send)
        except Exception as exc:
            # As uvicorn's `--lifespan auto` does: an app that raises before it answered the
            # startup does not speak lifespan (Django's ASGIHandler raises ValueError on any
            # non-HTTP scope). The supervisor still needs one, so serve it here. An app that
            # answered (Starlette sends `startup.failed`, then raises) keeps its exception.
            if self.lifespan == "forward" or startup_answered:
                raise
            logger.debug("the app does not support lifespan (%r); turnstream serves it", exc)
        else:
            if self.lifespan == "forward" or startup_answered:
                return
        await self._serve_lifespan(
            receive, send, startup_received=startup_received, start_failed=failed
        )

    async def _serve_lifespan(
        self,
        receive: Receive,
        send: Send,
        *,
        startup_received: bool = False,
        start_failed: bool = False,
    ) -> None:
        """Speak the lifespan protocol for the supervisor alone (the app takes no part)."""
        if not startup_received:
            message = await receive()
            if message["type"] != "lifespan.startup":
                return
            start_failed = not await self._start_supervisor()
        if start_failed:
            await send({"type": "lifespan.startup.failed", "message": _START_FAILED})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        if message["type"] != "lifespan.shutdown":
            return
        try:
            if self.supervisor.started:
                await self.supervisor.aclose()
        except Exception as exc:
            logger.exception("the turnstream supervisor failed to stop")
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _start_supervisor(self) -> bool:
        try:
            await self.supervisor.start()
        except Exception:
            logger.exception(_START_FAILED)
            return False
        return True

    # -- turn routes -----------------------------------------------------------------------

    async def _route(self, scope: Scope, receive: Receive, rest: str) -> Response | None:
        method = scope["method"]
        parts = rest.split("/")
        if len(parts) == 2 and parts[1] == "stream":
            if method not in ("GET", "HEAD"):
                return _method_not_allowed("GET")
            action = "stream"
        elif len(parts) == 2 and parts[1] == "cancel":
            if method != "POST":
                return _method_not_allowed("POST")
            action = "cancel"
        elif len(parts) == 1:
            if method not in ("GET", "HEAD"):
                return _method_not_allowed("GET")
            action = "status"
        else:
            return None
        request = Request(scope, receive)
        try:
            execution_id = parts[0]
            parse_execution_id(execution_id)
            principal = await self._principal(request)
            key = self.supervisor.run_key(principal.tenant_id, principal.user_id, execution_id)
            if action == "stream":
                fmt = negotiate_format(
                    request.query_params.get("format"), request.headers.get("accept")
                )
                after = parse_cursor(
                    request.query_params.get("after"), request.headers.get("last-event-id")
                )
                await self.supervisor.ensure_started()
                run = await self._visible_run(key, principal)
                if run is None:
                    return Response(status_code=204, headers={"Cache-Control": "no-store"})
                mode = "replayed" if run.status.finished else "joined"
                if not run.status.finished and not run.lease_live:
                    # The owner died: re-attach now rather than after a blocked read.
                    if await self.supervisor.recover(key) and self.supervisor.owns(key):
                        mode = "resumed"
                return stream_run(self.supervisor, key, fmt=fmt, after=after, mode=mode).response
            if action == "cancel":
                content_type = request.headers.get("content-type", "")
                if content_type.split(";")[0].strip().lower() != "application/json":
                    # A JSON content type makes this a non-simple request: a cross-site form
                    # or fetch cannot trigger it without a CORS preflight.
                    return ProblemResponse(
                        415,
                        "Unsupported Media Type",
                        "cancel takes a JSON POST (Content-Type: application/json)",
                    )
                # Read (bounded in size and time) and judged before the store is asked, like any
                # other body: an empty or non-object body is a client bug worth a 400, not a
                # silent 202. Members are ignored, so a client may send more than `{}`.
                limits = self.supervisor.limits
                body = await read_json_body(
                    request, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s
                )
                if not isinstance(body, dict):
                    raise InvalidTurnInput(
                        "the cancel body must be a JSON object, e.g. {}", field="body"
                    )
                await self.supervisor.ensure_started()
                run = await self._visible_run(key, principal)
                if run is None:
                    raise RunNotFound("no such turn")
                requested = await self.supervisor.cancel(key) if not run.status.finished else False
                return _json(
                    {
                        "executionId": execution_id,
                        "status": run.status.value,
                        "cancelRequested": requested or run.cancel_requested,
                    },
                    status=202,
                )
            run = await self._visible_run(key, principal)
            if run is None:
                raise RunNotFound("no such turn")
            return _json(run_to_json(run))
        except TurnstreamError as exc:
            return problem_for_exception(exc)

    async def _principal(self, request: Request) -> Principal:
        return await authorize_request(self.authorize, request)

    async def _visible_run(self, key: RunKey, principal: Principal) -> RunRecord | None:
        run = await self.supervisor.store.get_run(key)
        if run is None:
            return None
        if self.supervisor.access == "user" and run.user_id != principal.user_id:
            return None  # the key names the user already: a second check, not the only one
        return run


def run_to_json(run: RunRecord) -> dict[str, object]:
    return {
        "executionId": run.key.execution_id,
        "status": run.status.value,
        "attempt": run.attempt,
        "lastSeq": run.last_seq,
        "owned": run.lease_live,
        "cancelRequested": run.cancel_requested,
        "createdAt": run.created_at_ms,
        "finishedAt": run.finished_at_ms,
        "finalText": run.final_text if run.status.finished else None,
    }


def _json(value: object, *, status: int = 200) -> Response:
    return Response(
        orjson.dumps(value),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _method_not_allowed(allow: str) -> Response:
    return ProblemResponse(405, "Method Not Allowed", None, headers={"Allow": allow})

