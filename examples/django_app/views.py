"""The chat view: a Django async view answering one turn with ``handle_chat_turn``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from turnstream import (
    MemoryStore,
    Principal,
    Supervisor,
    TurnCompletion,
    TurnContext,
    TurnHooks,
    TurnIdentity,
    TurnstreamError,
    Unauthorized,
    authorize_request,
    handle_chat_turn,
)
from turnstream.django import chat_turn_request, django_problem, django_response, stream_options

messages: dict[str, str] = {}  # your database: execution id -> assistant message
producer_calls: Counter[str] = Counter()  # execution id -> model calls (see /debug/…)


def authorize(request: Any) -> Principal:
    """Your auth goes here; this example trusts a header.

    Called with Django's ``HttpRequest`` by the view and with a Starlette ``Request`` by the
    turn routes (the middleware runs before Django): both have case-insensitive ``headers``.
    """
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


@csrf_exempt
@require_POST
async def chat(request: HttpRequest) -> HttpResponseBase:
    try:
        principal = await authorize_request(authorize, request)  # 401 / 403 / 500
        body = chat_turn_request(request)  # strict: 400 / 413 problem documents
        identity = TurnIdentity(
            principal.tenant_id, "chat", body.session_id, principal.user_id, body.turn_index
        )
    except TurnstreamError as exc:
        return django_problem(exc)
    result = await handle_chat_turn(
        identity,
        {"message": body.message},
        supervisor=supervisor,
        produce=produce,
        **stream_options(request),  # ?format=, Accept, ?after=, Last-Event-ID
    )
    return django_response(result)  # StreamingHttpResponse, or a problem document


async def debug_producer_calls(request: HttpRequest) -> JsonResponse:
    execution_id = request.GET.get("executionId", "")
    return JsonResponse({"total": producer_calls.total(), "calls": producer_calls[execution_id]})
