"""The app under test: a small chat backend built on turnstream's public API only.

    python -m uvicorn tests.chaos._app:create_app --factory --host 127.0.0.1 --port N

It is what a user would write: a ``RedisStore``, a ``Supervisor``, a chat route that calls
``handle_chat_turn`` and the ``TurnstreamMiddleware`` for the turn routes. Two chat routes:

    POST /chat             a local producer (the deterministic fake model, in this process)
    POST /substrate/chat   the same turn run on the reference substrate (reconnectable)
    GET  /healthz          {"pid": …}; never touches the store (a stalled Redis must not
                           make the harness think the worker is down)

The body is the common ``{"sessionId", "turnIndex", "message"}``. The tenant comes from
``X-Chaos-Tenant`` (each scenario has its own, so the checker finds its runs by key), the
reply length from ``X-Chaos-Tokens`` / ``X-Chaos-Delay-Ms``; both are part of the turn's input
(``{"message", "options": {"tokens", "tokenDelayMs"}}``), which the substrate reads too.

Configured by the environment (``create_app`` reads it; importing this module does nothing):

    CHAOS_REDIS_URL        the store (usually the fault proxy in front of the redis-server)
    CHAOS_PREFIX           the key prefix (default "chaos")
    CHAOS_LEASE_MS         the supervisor's lease (default 1000)
    CHAOS_TOKENS           default words per reply (default 20)
    CHAOS_TOKEN_DELAY_MS   default delay before each word (default 20)
    CHAOS_CALLS_FILE       every model call appends "<execution id> <pid>" here
    CHAOS_PERSIST_FILE     every persist_assistant_message appends "<execution id> <pid>"
    CHAOS_SUBSTRATE_URL    the reference substrate (without it /substrate/chat is a 404)
    CHAOS_SHUTDOWN_GRACE_S how long a stopping worker lets its turns run (default 1)
    CHAOS_PERSIST_AFTER_MS when another worker persists a turn whose owner did not confirm it
                           (default 2000; builds whose Supervisor has ``persist_after_ms``)

The two files are the witnesses that outlive a ``SIGKILL``: each line is one ``O_APPEND``
write of its own, so concurrent writers (and a writer killed between two lines) never tear one.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from turnstream import (
    ChatTurnRequest,
    InvalidTurnInput,
    Principal,
    RedisStore,
    RunHandle,
    StartRequest,
    SupervisedEvent,
    Supervisor,
    TurnCompletion,
    TurnContext,
    TurnHooks,
    TurnIdentity,
    TurnstreamError,
    TurnstreamMiddleware,
    handle_chat_turn,
    problem_for_exception,
)
from turnstream._demo import fake_reply
from turnstream.adapters.orchestrator import OrchestratorAdapter

PROJECT_ID = "chaos"
TENANT_HEADER = "x-chaos-tenant"
USER_HEADER = "x-chaos-user"
TOKENS_HEADER = "x-chaos-tokens"
DELAY_HEADER = "x-chaos-delay-ms"
MAX_TOKENS = 10_000
MAX_DELAY_MS = 10_000


def append_line(path: str | None, line: str) -> None:
    """One whole line, one ``write`` on an ``O_APPEND`` descriptor: a witness that a kill
    right after it cannot undo."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _header_int(request: Request, name: str, default: int, maximum: int) -> int:
    text = request.headers.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) > maximum:
        raise InvalidTurnInput(f"{name} must be an integer from 0 to {maximum}", field=name)
    return int(text)


def authorize(request: Request) -> Principal:
    return Principal(
        tenant_id=request.headers.get(TENANT_HEADER, "chaos"),
        user_id=request.headers.get(USER_HEADER, "user"),
    )


def reply_options(input: Mapping[str, Any]) -> tuple[int, float]:
    options = input.get("options") or {}
    return int(options["tokens"]), int(options["tokenDelayMs"]) / 1000


class RecordingAdapter:
    """The reference substrate's adapter, with every ``start`` written to the calls file.

    A ``start`` asks the substrate for the turn's run (the substrate itself never starts a
    second run for one execution id; its ``GET /agents/runs`` counts what it started).
    """

    def __init__(self, inner: OrchestratorAdapter, calls_file: str | None) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.calls_file = calls_file

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        append_line(self.calls_file, f"{request.execution_id} {os.getpid()}")
        async for event in self.inner.start(request):
            yield event

    async def attach(
        self, handle: RunHandle, after_event_id: str | None
    ) -> AsyncIterator[SupervisedEvent]:
        async for event in self.inner.attach(handle, after_event_id):
            yield event

    async def cancel(self, handle: RunHandle) -> None:
        await self.inner.cancel(handle)

    async def aclose(self) -> None:
        await self.inner.aclose()


def create_app() -> Starlette:
    env = os.environ
    if env.get("CHAOS_LOG_LEVEL"):
        # turnstream's own records (takeovers, retries, sweeps) in the worker's log.
        logging.basicConfig(
            level=env["CHAOS_LOG_LEVEL"].upper(),
            format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s",
        )
    redis_url = env["CHAOS_REDIS_URL"]
    lease_ms = int(env.get("CHAOS_LEASE_MS", "1000"))
    default_tokens = int(env.get("CHAOS_TOKENS", "20"))
    default_delay_ms = int(env.get("CHAOS_TOKEN_DELAY_MS", "20"))
    calls_file = env.get("CHAOS_CALLS_FILE")
    persist_file = env.get("CHAOS_PERSIST_FILE")
    substrate_url = env.get("CHAOS_SUBSTRATE_URL")

    store = RedisStore.from_url(redis_url, prefix=env.get("CHAOS_PREFIX", "chaos"))
    adapter = (
        RecordingAdapter(OrchestratorAdapter(substrate_url), calls_file)
        if substrate_url
        else None
    )

    async def produce(context: TurnContext) -> AsyncIterator[dict[str, Any]]:
        # The "LLM call": recorded when it starts, as a bill would be.
        append_line(calls_file, f"{context.execution_id} {os.getpid()}")
        tokens, delay_s = reply_options(context.input)
        for word in fake_reply(str(context.input["message"]), tokens):
            await anyio.sleep(delay_s)
            yield {"type": "text-delta", "delta": word}

    async def persist(completion: TurnCompletion, text: str) -> None:
        append_line(persist_file, f"{completion.execution_id} {os.getpid()}")

    hooks = TurnHooks(persist_assistant_message=persist)
    options: dict[str, Any] = {}
    # How long a finished turn's persistence may stay unconfirmed before another worker runs
    # the hook (at least once per finished turn). Passed only to a Supervisor that has the
    # option, so this app runs against builds from before it too.
    if "persist_after_ms" in inspect.signature(Supervisor).parameters:
        options["persist_after_ms"] = int(env.get("CHAOS_PERSIST_AFTER_MS", "2000"))
    supervisor = Supervisor(
        store,
        lease_ms=lease_ms,
        adapters=[adapter] if adapter is not None else (),
        hooks=hooks,  # the post hooks of runs this worker recovers without a request
        shutdown_grace_s=float(env.get("CHAOS_SHUTDOWN_GRACE_S", "1")),
        **options,
    )

    async def chat(request: Request, *, substrate: bool) -> Response:
        if substrate and adapter is None:
            return Response(status_code=404)
        try:
            principal = authorize(request)
            body = await ChatTurnRequest.read(request, limits=supervisor.limits)
            tokens = _header_int(request, TOKENS_HEADER, default_tokens, MAX_TOKENS)
            delay_ms = _header_int(request, DELAY_HEADER, default_delay_ms, MAX_DELAY_MS)
            identity = TurnIdentity(
                tenant_id=principal.tenant_id,
                project_id=PROJECT_ID,
                session_id=body.session_id,
                user_id=principal.user_id,
                turn_index=body.turn_index,
            )
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        options = {"tokens": tokens, "tokenDelayMs": delay_ms}
        turn_input = {"message": body.message, "options": options}
        result = await handle_chat_turn(
            identity,
            turn_input,
            supervisor=supervisor,
            hooks=hooks,
            produce=None if substrate else produce,
            adapter=adapter if substrate else None,
            request=request,
        )
        return result.response

    async def local_chat(request: Request) -> Response:
        return await chat(request, substrate=False)

    async def substrate_chat(request: Request) -> Response:
        return await chat(request, substrate=True)

    async def healthz(request: Request) -> Response:
        return Response(orjson.dumps({"pid": os.getpid()}), media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The middleware starts the supervisor before this and drains it before `finally`.
        try:
            yield
        finally:
            await store.aclose()
            if adapter is not None:
                await adapter.aclose()

    return Starlette(
        routes=[
            Route("/chat", local_chat, methods=["POST"]),
            Route("/substrate/chat", substrate_chat, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        middleware=[Middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=authorize)],
        lifespan=lifespan,
    )
