"""turnstream on FastAPI: ``uvicorn examples.fastapi_app:app`` from the repository root.

    curl -N localhost:8000/chat -H 'X-User-Id: ada' -H 'Content-Type: application/json' \
         -d '{"sessionId": "s1", "turnIndex": 0, "message": "hello there"}'

Run it again: the turn replays (``X-Turn-Mode: replayed``) and the producer is not called.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response

from turnstream import (
    ChatTurnRequest,
    InvalidTurnInput,
    MemoryStore,
    Principal,
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

supervisor = Supervisor(MemoryStore())  # RedisStore.from_url("redis://…") with several workers
messages: dict[str, str] = {}  # your database: execution id -> assistant message
producer_calls: Counter[str] = Counter()  # execution id -> model calls (see /debug/…)


def authorize(request: Request) -> Principal:
    """Your auth goes here; this example trusts a header."""
    user = request.headers.get("x-user-id")
    if not user:
        raise InvalidTurnInput("send an X-User-Id header", field="X-User-Id")
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


hooks = TurnHooks(produce=produce, persist_assistant_message=persist_assistant_message)
app = FastAPI()
app.add_middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=authorize)


@app.exception_handler(TurnstreamError)
async def turnstream_problem(request: Request, exc: TurnstreamError) -> Response:
    return problem_for_exception(exc)  # RFC 9457 problem document (400, 413…)


@app.post("/chat")
async def chat(request: Request, principal: Annotated[Principal, Depends(authorize)]) -> Response:
    body = await ChatTurnRequest.read(request)
    identity = TurnIdentity(
        principal.tenant_id, "chat", body.session_id, principal.user_id, body.turn_index
    )
    result = await handle_chat_turn(
        identity,
        {"message": body.message},
        supervisor=supervisor,
        hooks=hooks,
        request=request,  # ?format=, Accept, ?after=, Last-Event-ID
    )
    return result.response


@app.get("/debug/producer-calls")
async def debug_producer_calls(
    execution_id: Annotated[str, Query(alias="executionId")] = "",
) -> dict[str, int]:
    return {"total": producer_calls.total(), "calls": producer_calls[execution_id]}
