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
    MemoryStore,
    Principal,
    Supervisor,
    TurnCompletion,
    TurnContext,
    TurnHooks,
    TurnstreamError,
    TurnstreamMiddleware,
    Unauthorized,
)
from turnstream.fastapi import ChatTurn, chat_turn, problem_handler

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
app = FastAPI(exception_handlers={TurnstreamError: problem_handler})  # RFC 9457 documents
app.add_middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=authorize)
# The caller (authorize), the strictly read body and the turn's identity, or a 400 / 413.
Turn = Annotated[ChatTurn, Depends(chat_turn(supervisor, authorize=authorize))]


@app.post("/chat")
async def chat(turn: Turn) -> Response:
    # {"message": …} is the turn's input; ?format=, Accept, ?after=, Last-Event-ID come from
    # the request. The response is the stream, or a problem document (409 for a conflict).
    return await turn.respond(produce=produce)


@app.get("/debug/producer-calls")
async def debug_producer_calls(
    execution_id: Annotated[str, Query(alias="executionId")] = "",
) -> dict[str, int]:
    return {"total": producer_calls.total(), "calls": producer_calls[execution_id]}
