"""The README's Starlette quick start as a factory: ``POST /chat`` plus the turn routes.

Shared by the tests that need a plain chat app around some ``authorize`` and producer (the
access, authorize and attack tests), so each builds only what it varies.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from turnstream import (
    ChatTurnRequest,
    Supervisor,
    TurnIdentity,
    TurnstreamError,
    TurnstreamMiddleware,
    authorize_request,
    handle_chat_turn,
    problem_for_exception,
)


def chat_app(supervisor: Supervisor, authorize: Any, produce: Any) -> TurnstreamMiddleware:
    async def chat(request: Request) -> Response:
        try:
            who = await authorize_request(authorize, request)
            body = await ChatTurnRequest.read(request, limits=supervisor.limits)
            identity = TurnIdentity(
                who.tenant_id, "chat", body.session_id, who.user_id, body.turn_index
            )
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        result = await handle_chat_turn(
            identity, {"message": body.message}, supervisor=supervisor, produce=produce,
            request=request,
        )  # fmt: skip
        return result.response

    return TurnstreamMiddleware(
        Starlette(routes=[Route("/chat", chat, methods=["POST"])]),
        supervisor=supervisor,
        authorize=authorize,
    )
