"""The peer under test: PyPI ``resumable-stream`` (a Python port of Vercel's resumable-stream).

Runs only in the scratch venv the bench makes for it (``resumable-stream`` is never a
dependency of turnstream): ``uvicorn --factory bench._peer_app:create_app``, with
``BENCH_REDIS_URL``.

    GET /peer?session=&n=&format=ndjson|sse     one stream of ``n`` events, the same bytes the
                                                bare route sends, through
                                                ``ctx.resumable_stream(id, make_stream)``
    GET /healthz                                200 once both Redis clients are connected

The library's documented ``create_resumable_stream_context(redis_url=…)`` raises a
``TypeError`` in 0.2.0 (the keyword reaches a dataclass without that field), so the app
connects the library's own ``RedisPublisher`` / ``RedisSubscriber`` and passes them in.
``make_stream`` yields ``str`` (the library's chunk type); Starlette encodes each one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
from resumable_stream import (  # type: ignore[import-not-found]
    RedisPublisher,
    RedisSubscriber,
    create_resumable_stream_context,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


def create_app() -> Starlette:
    url = os.environ["BENCH_REDIS_URL"]
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        publisher, subscriber = RedisPublisher(url), RedisSubscriber(url)
        await publisher.connect()
        await subscriber.connect()
        state["ctx"] = create_resumable_stream_context(publisher=publisher, subscriber=subscriber)
        try:
            yield
        finally:
            await subscriber.close()
            await publisher.close()

    async def peer(request: Request) -> Response:
        n = int(request.query_params.get("n", 0))
        sse = request.query_params.get("format") == "sse"

        async def make_stream() -> AsyncIterator[str]:
            for seq in range(1, n + 1):
                event = {"type": "text-delta", "delta": "w "}
                line = orjson.dumps({"seq": seq, **event}).decode()
                if sse:
                    yield f"id: {seq}\nevent: text-delta\ndata: {line}\n\n"
                else:
                    yield line + "\n"

        stream = await state["ctx"].resumable_stream(request.query_params["session"], make_stream)
        if stream is None:
            return PlainTextResponse("stream is already done", status_code=422)
        media_type = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(stream, media_type=media_type)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/peer", peer, methods=["GET"]), Route("/healthz", healthz)],
        lifespan=lifespan,
    )
