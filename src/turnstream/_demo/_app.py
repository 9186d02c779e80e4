"""The demo app: ``POST /chat`` over a deterministic fake model, the turn routes, a chat page.

With ``substrate_url`` the turns run on a reference substrate (``turnstream substrate``)
through an ``OrchestratorAdapter`` instead: any worker re-attaches to a run that outlived its
owner, and the substrate's ``GET /agents/runs`` counts the runs it started.

    GET  /                          the chat page (page.html, no build step, no external assets)
    GET  /healthz                   readiness: 200 when the supervisor runs and the store
                                    answers, else a 503 problem document (``readiness``)
    POST /chat                      {"sessionId", "turnIndex", "message"} → the turn's stream
                                    (``?tokens=N&tokenDelayMs=MS``: the page's speed control)
    POST /api/chat, GET /api/chat/{id}/stream   the AI SDK transport's routes (_ai_sdk.py)
    GET  /debug/producer-calls      how often the fake model started in this process
    GET  /demo/config               the page's settings: default speed, workers, kill button
    …    /demo/turns/{id}/owner|kill   which worker owns a turn; SIGKILL it (_workers.py; only
                                    with several workers on a loopback address)
    …    /turns/{execution_id}…     resume / cancel / status (TurnstreamMiddleware)

Tenant and user come from the ``X-Demo-Tenant`` / ``X-Demo-User`` headers (defaults ``demo``
and ``guest``): the demo's stand-in for real auth, used alike by the chat route and by the
middleware's ``authorize``. Every answer names the worker process that served it
(``X-Demo-Worker: <pid>``).

The demo starts while its store is down (it logs a warning): turn requests answer 503
problem documents with ``Retry-After`` until the store is back, then work without a restart.
A worker that refused to start would crash-loop through every store outage instead.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import anyio
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._exceptions import StoreError, TurnstreamError
from .._handler import handle_chat_turn
from .._health import DEFAULT_READINESS_TIMEOUT_S, readiness
from .._hooks import Limits, TurnContext
from .._identity import TurnIdentity
from .._middleware import TurnstreamMiddleware
from .._problems import problem_for_exception
from .._requests import ChatTurnRequest
from .._store import TurnStore
from .._supervisor import DEFAULT_LEASE_MS, Supervisor
from ..stores import MemoryStore
from ._ai_sdk import ai_sdk_routes
from ._fake import MAX_TOKEN_DELAY_MS, MAX_TOKENS, ProducerCalls, Speed, fake_reply
from ._principal import demo_principal
from ._workers import WorkerHeader, WorkerRegistry, worker_routes

if TYPE_CHECKING:
    from ..adapters.orchestrator import OrchestratorAdapter

__all__ = ["PROJECT_ID", "ProducerCalls", "create_demo_app", "fake_reply"]

logger = logging.getLogger("turnstream.demo")

PROJECT_ID: Final = "demo"
def _json(value: object, *, status: int = 200) -> Response:
    return Response(
        orjson.dumps(value),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


# The page inlines its script and style; nothing else may load or run.
_PAGE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


async def _warn_if_unreachable(store: TurnStore) -> None:
    """Tell the operator at startup that the store is down, and start anyway.

    Bounded like a readiness probe: a black-holed Redis host must not hold the startup for
    the client's connect timeout times its retries.
    """
    try:
        with anyio.fail_after(DEFAULT_READINESS_TIMEOUT_S * 4):
            await store.ping()
    except (TimeoutError, StoreError) as exc:
        logger.warning(
            "the turn store is unreachable (%s); serving anyway: turn requests answer 503 "
            "until it is back, and /healthz says when it is",
            str(exc) or "no answer to a ping",
        )


def create_demo_app(
    *,
    store: TurnStore | None = None,
    redis_url: str | None = None,
    tokens: int = 40,
    token_delay_ms: int = 25,
    lease_ms: int = DEFAULT_LEASE_MS,
    limits: Limits | None = None,
    substrate_url: str | None = None,
    workers: int = 1,
    registry_dir: str | None = None,
) -> Starlette:
    """The demo as a Starlette app, with :class:`TurnstreamMiddleware` in its stack.

    The store is ``store`` when given (the caller closes it), else a ``RedisStore`` for
    ``redis_url`` (closed on shutdown; an unreachable one is a warning at startup and 503s
    until it answers, not a failed start), else a fresh ``MemoryStore``. Each reply has
    ``tokens`` words, one ``text-delta`` every ``token_delay_ms``. With ``substrate_url`` the
    turns go to the reference substrate at that URL instead (closed on shutdown), whose own
    ``--tokens`` and ``--token-delay-ms`` then apply; the fake model is not used.

    A turn posted with ``?tokens=N&tokenDelayMs=MS`` (the page's speed control) runs at that
    speed instead; the speed is part of the turn's input, so a restart keeps it.

    ``workers`` is how many processes serve the demo (the page shows it); ``registry_dir``,
    given by the command line for several workers on a loopback address only, turns on the
    kill button's routes (``_workers.py``).

    ``app.state`` holds ``supervisor``, ``store``, ``producer_calls`` and ``adapter`` (or
    ``None``). Without a lifespan (``httpx.ASGITransport``), start the supervisor yourself:
    ``async with app.state.supervisor: …``.
    """
    if store is not None and redis_url is not None:
        raise ValueError("pass either store or redis_url, not both")
    if tokens < 0:
        raise ValueError("tokens must not be negative")
    if token_delay_ms < 0:
        raise ValueError("token_delay_ms must not be negative")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    adapter: OrchestratorAdapter | None = None
    if substrate_url is not None:
        # Imported here: the adapter needs httpx, which only the substrate mode does. Made
        # before the store, so that a bad URL (ValueError) leaves no store behind.
        from ..adapters.orchestrator import OrchestratorAdapter

        adapter = OrchestratorAdapter(substrate_url)
    owns_store = store is None
    if store is None:
        if redis_url is not None:
            from ..stores.redis import RedisStore

            store = RedisStore.from_url(redis_url)
        else:
            store = MemoryStore()
    turn_store: TurnStore = store
    supervisor = Supervisor(
        turn_store,
        lease_ms=lease_ms,
        limits=limits,
        adapters=[adapter] if adapter is not None else (),
    )
    calls = ProducerCalls()
    default_speed = Speed(tokens, token_delay_ms)
    registry = WorkerRegistry(registry_dir) if registry_dir is not None else None
    page = importlib.resources.files("turnstream._demo").joinpath("page.html").read_bytes()

    async def produce(context: TurnContext) -> AsyncIterator[dict[str, Any]]:
        calls.record(
            supervisor.run_key(
                context.identity.tenant_id, context.identity.user_id, context.execution_id
            )
        )
        speed = Speed.from_input(context.input, default_speed)
        delay_s = speed.token_delay_ms / 1000
        for word in fake_reply(str(context.input["message"]), speed.tokens):
            await anyio.sleep(delay_s)  # also a cancellation point when the delay is 0
            yield {"type": "text-delta", "delta": word}

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    async def chat(request: Request) -> Response:
        try:
            principal = demo_principal(request)
            speed = Speed.from_query(request.query_params)
            body = await ChatTurnRequest.read(request, limits=supervisor.limits)
            identity = TurnIdentity(
                tenant_id=principal.tenant_id,
                project_id=PROJECT_ID,
                session_id=body.session_id,
                user_id=principal.user_id,
                turn_index=body.turn_index,
            )
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        # Without a speed the input is the message alone, as the AI SDK door posts it.
        turn_input: dict[str, object] = {"message": body.message}
        if speed is not None and adapter is None:
            turn_input.update(speed.to_input())
        result = await handle_chat_turn(
            identity,
            turn_input,
            supervisor=supervisor,
            produce=produce if adapter is None else None,
            adapter=adapter,
            format=request.query_params.get("format"),
            accept=request.headers.get("accept"),
            cursor=request.query_params.get("after"),
            last_event_id=request.headers.get("last-event-id"),
        )
        return result.response

    async def producer_calls(request: Request) -> Response:
        """``{"total": n}``; with ``?executionId=``, also that run's ``calls`` (per tenant)."""
        document: dict[str, object] = {"total": calls.total}
        execution_id = request.query_params.get("executionId")
        if execution_id is not None:
            try:
                principal = demo_principal(request)
            except TurnstreamError as exc:
                return problem_for_exception(exc)
            document["executionId"] = execution_id
            document["calls"] = calls.count(
                supervisor.run_key(principal.tenant_id, principal.user_id, execution_id)
            )
        return _json(document)

    async def config(request: Request) -> Response:
        """What the page needs to draw its controls: the speed, the workers, the kill button."""
        return _json(
            {
                "tokens": tokens,
                "tokenDelayMs": token_delay_ms,
                "maxTokens": MAX_TOKENS,
                "maxTokenDelayMs": MAX_TOKEN_DELAY_MS,
                "speedControl": adapter is None,  # the substrate has its own speed
                "leaseMs": lease_ms,
                "workers": workers,
                "worker": os.getpid(),
                "kill": registry is not None,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The middleware has started the supervisor by now (it needs no store round trip)
        # and stops it before this resumes on shutdown, so the store outlives every pump.
        try:
            if registry is not None:
                registry.register(supervisor.worker_id)
            if owns_store:
                await _warn_if_unreachable(turn_store)
            yield
        finally:
            if registry is not None:
                registry.unregister(supervisor.worker_id)
            if owns_store:
                await turn_store.aclose()
            if adapter is not None:
                await adapter.aclose()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/healthz", readiness(supervisor), methods=["GET", "HEAD"]),
            Route("/chat", chat, methods=["POST"]),
            Route("/debug/producer-calls", producer_calls, methods=["GET"]),
            Route("/demo/config", config, methods=["GET"]),
            *(
                worker_routes(supervisor=supervisor, registry=registry, authorize=demo_principal)
                if registry is not None
                else ()
            ),
            *ai_sdk_routes(
                supervisor=supervisor,
                project_id=PROJECT_ID,
                authorize=demo_principal,
                produce=produce if adapter is None else None,
                adapter=adapter,
            ),
        ],
        middleware=[
            Middleware(WorkerHeader),  # outermost: the turn routes' answers carry it too
            Middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=demo_principal),
        ],
        lifespan=lifespan,
    )
    app.state.supervisor = supervisor
    app.state.store = turn_store
    app.state.producer_calls = calls
    app.state.adapter = adapter
    return app
