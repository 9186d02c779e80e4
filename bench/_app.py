"""The server under test: a bare ``StreamingResponse`` and turnstream turns, on one port.

Served by ``uvicorn --factory bench._app:create_app``; configured by the environment:

* ``BENCH_STORE`` — ``memory`` (default) or ``redis`` (then ``BENCH_REDIS_URL``);
* ``BENCH_MAX_EVENTS`` — ``Limits.max_events_per_turn`` (default 1,000,000: the bulk turns
  are far past the default 20,000);
* ``BENCH_RETENTION_MS`` — how long a finished turn is kept (default: the store's own). The
  bulk runs keep it short so that a worker's heap does not grow run after run (a bigger heap
  makes every later garbage collection slower, which would favour the first runs);
* ``BENCH_NO_HIREDIS=1`` — hide hiredis from redis-py, which then parses with its
  pure-Python parser (for the one bulk row measured without it).

Routes — the same events, the same pacing, on both sides:

    GET /bare?n=&delay_ms=&stamp=&format=ndjson|sse[&batch=K]
        a naive app: one ``http.response.body`` per event (Starlette's StreamingResponse
        over an async generator), the NDJSON line or SSE frame turnstream would send;
        ``batch=K`` joins K events per body message instead (no pacing): the client's
        ceiling, and what batching alone buys;
    GET /turn?session=&n=&delay_ms=&stamp=&format=ndjson|sse|ai-sdk
        ``handle_chat_turn`` with a producer that yields the same events;
    GET /turns/{execution_id}/stream      replay / join (TurnstreamMiddleware)
    GET /healthz                          readiness (the supervisor runs, the store answers)
    GET /bench/info                       which store and parser this process uses

Each event is ``{"type": "text-delta", "delta": "w "}`` (plus ``"t"``, the producer's
``time.monotonic_ns()``, with ``stamp=1``), built anew and JSON-encoded once per event on
both sides. Pacing: no sleep at all with ``delay_ms=0`` (the bulk runs, both sides); else
``asyncio.sleep(delay_ms)`` before every event but the first (both sides).

Only turnstream's public API is used (``from turnstream import …``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

if os.environ.get("BENCH_NO_HIREDIS") == "1":
    # Before redis-py is imported: its parser is chosen at import, from whether this works.
    sys.modules["hiredis"] = None  # type: ignore[assignment]

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from turnstream import (
    Limits,
    MemoryStore,
    Principal,
    Supervisor,
    TurnContext,
    TurnIdentity,
    TurnStore,
    TurnstreamMiddleware,
    handle_chat_turn,
    readiness,
)

TENANT = "bench"
PROJECT = "bench"
USER = "bench"


def execution_id(session: str) -> str:
    """The execution id of a bench turn (what ``/turns/{id}/stream`` takes)."""
    return TurnIdentity(TENANT, PROJECT, session, USER, 0).execution_id


def _int(request: Request, name: str, default: int = 0) -> int:
    return int(request.query_params.get(name, default))


def _bench_principal(request: Request) -> Principal:
    return Principal(tenant_id=TENANT, user_id=USER)


def _event(stamp: bool) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "text-delta", "delta": "w "}
    if stamp:
        event["t"] = time.monotonic_ns()
    return event


async def _bare_lines(n: int, delay_s: float, stamp: bool, sse: bool) -> AsyncIterator[bytes]:
    for seq in range(1, n + 1):
        if delay_s and seq > 1:
            await asyncio.sleep(delay_s)
        line = orjson.dumps({"seq": seq, **_event(stamp)})
        if sse:
            # The frame turnstream's SSE sends (LF line ends, id = seq, event = type).
            yield b"id: %d\nevent: text-delta\ndata: %s\n\n" % (seq, line)
        else:
            yield line + b"\n"


async def _bare_batches(n: int, batch: int) -> AsyncIterator[bytes]:
    for start in range(1, n + 1, batch):
        yield b"".join(
            orjson.dumps({"seq": seq, **_event(False)}) + b"\n"
            for seq in range(start, min(start + batch, n + 1))
        )


async def _produce(context: TurnContext) -> AsyncIterator[dict[str, Any]]:
    n = int(context.input["n"])
    delay_s = int(context.input["delay_ms"]) / 1000
    stamp = bool(context.input["stamp"])
    for i in range(n):
        if delay_s and i:
            await asyncio.sleep(delay_s)
        yield _event(stamp)


def _store_from_env() -> tuple[TurnStore, str]:
    kind = os.environ.get("BENCH_STORE", "memory")
    retention = os.environ.get("BENCH_RETENTION_MS")
    options: dict[str, int] = {}
    if retention:
        options["retention_ms"] = int(retention)
    if kind == "memory":
        if retention:
            options["evict_interval_ms"] = max(int(retention) // 2, 1)
        return MemoryStore(**options), kind
    if kind == "redis":
        from turnstream import RedisStore

        return RedisStore.from_url(os.environ["BENCH_REDIS_URL"], **options), kind
    raise SystemExit(f"BENCH_STORE must be memory or redis, not {kind!r}")


def create_app() -> TurnstreamMiddleware:
    store, kind = _store_from_env()
    limits = Limits(max_events_per_turn=int(os.environ.get("BENCH_MAX_EVENTS", 1_000_000)))
    supervisor = Supervisor(store, limits=limits)

    async def bare(request: Request) -> Response:
        sse = request.query_params.get("format") == "sse"
        batch = _int(request, "batch", 1)
        if batch > 1:
            return StreamingResponse(
                _bare_batches(_int(request, "n"), batch), media_type="application/x-ndjson"
            )
        lines = _bare_lines(
            _int(request, "n"), _int(request, "delay_ms") / 1000, bool(_int(request, "stamp")), sse
        )
        media_type = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(lines, media_type=media_type)

    async def turn(request: Request) -> Response:
        identity = TurnIdentity(TENANT, PROJECT, request.query_params["session"], USER, 0)
        turn_input = {
            "n": _int(request, "n"),
            "delay_ms": _int(request, "delay_ms"),
            "stamp": _int(request, "stamp"),
        }
        result = await handle_chat_turn(
            identity, turn_input, supervisor=supervisor, produce=_produce, request=request
        )
        return result.response

    async def info(request: Request) -> Response:
        parser = "n/a"
        if kind == "redis":
            from redis.utils import HIREDIS_AVAILABLE

            parser = "hiredis" if HIREDIS_AVAILABLE else "python"
        return JSONResponse({"store": kind, "parser": parser, "pid": os.getpid()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await store.aclose()

    app = Starlette(
        routes=[
            Route("/bare", bare, methods=["GET"]),
            Route("/turn", turn, methods=["GET"]),
            Route("/healthz", readiness(supervisor), methods=["GET"]),
            Route("/bench/info", info, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return TurnstreamMiddleware(app, supervisor=supervisor, authorize=_bench_principal)
