"""turnstream on FastAPI: a dependency that hands a chat route the caller, the parsed body and
the turn's identity, so the route is two lines.

    from turnstream.fastapi import ChatTurn, chat_turn, problem_handler

    app = FastAPI(exception_handlers={TurnstreamError: problem_handler})
    app.add_middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=authorize)
    ChatTurnDep = Annotated[ChatTurn, Depends(chat_turn(supervisor, authorize=authorize))]

    @app.post("/chat")
    async def chat(turn: ChatTurnDep) -> Response:
        return await turn.respond(hooks=hooks)

A body or identity that does not check out raises a :class:`~turnstream.TurnstreamError`
from the dependency; ``problem_handler`` answers it with its RFC 9457 problem document.
Importing this module imports FastAPI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from ._adapter import ReconnectAdapter
from ._authorize import Authorize, Principal, authorize_request
from ._handler import handle_chat_turn
from ._hooks import Limits, Producer, TurnHooks
from ._identity import TurnIdentity
from ._problems import problem_for_exception
from ._requests import ChatTurnRequest
from ._supervisor import Supervisor

__all__ = ["ChatTurn", "chat_turn", "problem_handler"]


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One chat-turn request, resolved: who asks, what they sent, which turn it is."""

    request: Request
    principal: Principal
    body: ChatTurnRequest
    identity: TurnIdentity
    supervisor: Supervisor

    @property
    def input(self) -> dict[str, Any]:
        """The turn's input when the app adds nothing to the message: ``{"message": …}``."""
        return {"message": self.body.message}

    async def respond(
        self,
        input: Mapping[str, Any] | None = None,
        *,
        produce: Producer | None = None,
        adapter: ReconnectAdapter | None = None,
        hooks: TurnHooks | None = None,
        retry: bool | None = None,
    ) -> Response:
        """``handle_chat_turn`` for this turn (format and cursor from the request), as the
        ``Response`` a FastAPI route returns: the stream, or a problem document. ``retry``:
        see ``handle_chat_turn`` (a failed turn is retried when its error was retryable)."""
        result = await handle_chat_turn(
            self.identity,
            self.input if input is None else input,
            supervisor=self.supervisor,
            produce=produce,
            adapter=adapter,
            hooks=hooks,
            request=self.request,
            retry=retry,
        )
        return result.response


def chat_turn(
    supervisor: Supervisor,
    *,
    authorize: Authorize[Request],
    project_id: str = "chat",
    limits: Limits | None = None,
) -> Callable[[Request], Awaitable[ChatTurn]]:
    """A FastAPI dependency giving a :class:`ChatTurn`: ``Depends(chat_turn(s, authorize=…))``.

    ``authorize(request)`` is the same callable the middleware takes (sync or async, returns a
    :class:`~turnstream.Principal`). The body is read strictly (``ChatTurnRequest.read``, with
    the supervisor's limits unless ``limits`` is given); the identity is
    ``(tenant, project_id, sessionId, user, turnIndex)``.
    """

    async def dependency(request: Request) -> ChatTurn:
        principal = await authorize_request(authorize, request)
        body = await ChatTurnRequest.read(request, limits=limits or supervisor.limits)
        identity = TurnIdentity(
            principal.tenant_id, project_id, body.session_id, principal.user_id, body.turn_index
        )
        return ChatTurn(request, principal, body, identity, supervisor)

    return dependency


async def problem_handler(request: Request, exc: Exception) -> Response:
    """An exception handler for :class:`~turnstream.TurnstreamError`: its problem document."""
    return problem_for_exception(exc)
