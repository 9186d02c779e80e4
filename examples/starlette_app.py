"""turnstream on Starlette: ``uvicorn examples.starlette_app:app`` from the repository root.

    curl -N localhost:8000/chat -H 'X-User-Id: ada' -H 'Content-Type: application/json' \
         -d '{"sessionId": "s1", "turnIndex": 0, "message": "hello there"}'

Run it again: the turn replays (``X-Turn-Mode: replayed``) and the producer is not called.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from turnstream import (
    ChatTurnRequest,
    MemoryStore,
    Principal,
    Supervisor,
    TurnCompletion,
    TurnContext,
    TurnHooks,
    TurnIdentity,
    TurnstreamError,
    TurnstreamMiddleware,
    Unauthorized,
    authorize_request,
    handle_chat_turn,
    problem_for_exception,
)

messages: dict[str, str] = {}  # your database: execution id -> assistant message
producer_calls: Counter[str] = Counter()  # execution id -> model calls (see /debug/…)


def authorize(request: Request) -> Principal:
    """Your auth goes here; this example trusts a header (Unauthorized: a 401)."""
    user = request.headers.get("x-user-id", "")
    if not user or len(user) > 256 or not user.isprintable():  # a client's text: check it
        raise Unauthorized("send an X-User-Id header")
    return Principal(tenant_id="acme", user_id=user)


async def produce(ctx: TurnContext) -> AsyncIterator[dict[str, str]]:
    """Your LLM call: yield events. This one echoes the message word by word."""
    producer_calls[ctx.execution_id] += 1
    for word in f"You said: {ctx.input['message']}".split():
        await asyncio.sleep(0.05)
        yield {"type": "text-delta", "delta": word + " "}


async def persist_assistant_message(completion: TurnCompletion, text: str) -> None:
    # At least once per finished turn: key by execution id so a repeat is harmless.
    messages[completion.execution_id] = text


# The supervisor's hooks apply to every turn, and to the turns another worker recovers
# after this one died (persistence is at least once, whoever finishes the turn).
supervisor = Supervisor(
    MemoryStore(),  # RedisStore.from_url("redis://…") with several workers
    hooks=TurnHooks(persist_assistant_message=persist_assistant_message),
)


async def chat(request: Request) -> Response:
    try:
        principal = await authorize_request(authorize, request)  # 401 / 403 / 500
        body = await ChatTurnRequest.read(request)
        identity = TurnIdentity(
            principal.tenant_id, "chat", body.session_id, principal.user_id, body.turn_index
        )
    except TurnstreamError as exc:
        return problem_for_exception(exc)
    result = await handle_chat_turn(
        identity,
        {"message": body.message},
        supervisor=supervisor,
        produce=produce,
        request=request,  # ?format=, Accept, ?after=, Last-Event-ID
    )
    return result.response


async def debug_producer_calls(request: Request) -> JSONResponse:
    execution_id = request.query_params.get("executionId", "")
    return JSONResponse({"total": producer_calls.total(), "calls": producer_calls[execution_id]})


app = TurnstreamMiddleware(
    Starlette(
        routes=[
            Route("/chat", chat, methods=["POST"]),
            Route("/debug/producer-calls", debug_producer_calls),
        ]
    ),
    supervisor=supervisor,
    authorize=authorize,
)
