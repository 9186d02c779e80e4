"""The demo's AI SDK door: the two routes the `ai` package's ``DefaultChatTransport`` calls.

    POST /api/chat                  {"id", "messages", "trigger", "messageId", …} → the turn,
                                    as an AI SDK UI message stream (``?format=ai-sdk``)
    GET  /api/chat/{id}/stream      the chat's latest turn, replayed whole; 204 when there is
                                    none (no turn, or not this tenant's / user's)

A chat is a session: the chat ``id`` is the session id, the turn index is the number of user
messages minus one, and the turn's input is the last user message's text. So ``/api/chat``
and ``POST /chat`` are two doors to the same turns: a regenerate (or any retry) of a turn
replays it instead of prompting the model again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._adapter import ReconnectAdapter
from .._exceptions import InvalidTurnInput, TurnstreamError
from .._framing import StreamFormat
from .._handler import handle_chat_turn, stream_run
from .._hooks import Limits, Producer
from .._identity import TurnIdentity, derive_execution_id
from .._middleware import Principal
from .._problems import problem_for_exception
from .._requests import check_message, read_json_body
from .._store import RunKey, RunRecord, TurnStore
from .._supervisor import Supervisor

__all__ = ["AiSdkChatRequest", "LatestTurns", "ai_sdk_routes", "find_latest_turn"]

_TRIGGERS: Final = frozenset({"submit-message", "regenerate-message"})
# A bound on one resume's walk through the store (one round trip per step). A chat with more
# unseen turns than this resumes a slightly older turn once; the hint then moves on.
MAX_PROBES: Final = 64


@dataclass(frozen=True, slots=True)
class AiSdkChatRequest:
    """What the demo takes from a ``DefaultChatTransport`` body."""

    chat_id: str
    turn_index: int
    message: str

    @classmethod
    def from_json(cls, body: Any, *, limits: Limits | None = None) -> AiSdkChatRequest:
        limits = limits or Limits()
        if not isinstance(body, dict):
            raise InvalidTurnInput("the body must be a JSON object", field="body")
        chat_id = body.get("id")
        if not isinstance(chat_id, str) or not chat_id:
            raise InvalidTurnInput("id (the chat id) must be a non-empty string", field="id")
        trigger = body.get("trigger", "submit-message")
        if trigger not in _TRIGGERS:
            known = ", ".join(sorted(_TRIGGERS))
            raise InvalidTurnInput(f"trigger must be one of {known}", field="trigger")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidTurnInput("messages must be a non-empty array", field="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InvalidTurnInput(
                "every message must be an object with a string role", field="messages"
            )
        if messages[-1]["role"] != "user":
            # Tool approvals and the like continue an assistant message: the demo's fake
            # model has no tools, so it answers user messages only.
            raise InvalidTurnInput("the last message must be the user's", field="messages")
        turn_index = sum(1 for m in messages if m["role"] == "user") - 1
        parts = messages[-1].get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise InvalidTurnInput("a message's parts must be an array of objects", field="parts")
        texts = [p.get("text") for p in parts if p.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise InvalidTurnInput("a text part's text must be a string", field="parts")
        message = "\n".join(texts)
        if not message.strip():
            raise InvalidTurnInput("the last user message has no text", field="messages")
        check_message(message, limits)
        return cls(chat_id=chat_id, turn_index=turn_index, message=message)

    @classmethod
    async def read(cls, request: Request, *, limits: Limits | None = None) -> AiSdkChatRequest:
        limits = limits or Limits()
        body = await read_json_body(
            request, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s
        )
        return cls.from_json(body, limits=limits)


class LatestTurns:
    """The newest turn index this process has seen per (tenant and user, chat): only a hint.

    The store is the truth (see :func:`find_latest_turn`); the hint saves the walk from turn 0.
    Bounded: the ``max_chats`` most recently used chats are kept.
    """

    def __init__(self, *, max_chats: int = 4096) -> None:
        self.max_chats = max_chats
        self._turns: OrderedDict[tuple[str, str], int] = OrderedDict()

    def hint(self, tenant_id: str, chat_id: str) -> int:
        return self._turns.get((tenant_id, chat_id), 0)

    def record(self, tenant_id: str, chat_id: str, turn_index: int) -> None:
        key = (tenant_id, chat_id)
        self._turns[key] = max(turn_index, self._turns.get(key, 0))
        self._turns.move_to_end(key)
        while len(self._turns) > self.max_chats:
            self._turns.popitem(last=False)


async def find_latest_turn(
    store: TurnStore,
    *,
    tenant_id: str,
    project_id: str,
    chat_id: str,
    hint: int,
    user_id: str | None = None,
) -> tuple[int, RunRecord] | None:
    """The newest run of a chat at or above ``hint``: walk up the turn indexes in the store.

    Why a walk and not a "latest turn" key: the store has runs only, and a chat's turn
    indexes are dense (turn n is posted with n user messages before it, each of which had its
    turn), so from any turn the client has had, the next ones are n+1, n+2… With several
    workers (``--redis``) a worker that never served this chat starts from its own hint (or
    0) and still finds the turns another worker ran. What it cannot see: a chat whose turns
    at and above the hint expired (retention TTL) below a newer one — then the answer is
    ``None`` (a 204), which is what an expired turn gets anyway. ``user_id``: the caller,
    when runs are a user's (``Supervisor(access="user")``, see ``Supervisor.run_key``).
    """
    turn = hint
    run = await store.get_run(
        RunKey(tenant_id, derive_execution_id(project_id, chat_id, turn), user_id)
    )
    for _ in range(MAX_PROBES):
        next_key = RunKey(tenant_id, derive_execution_id(project_id, chat_id, turn + 1), user_id)
        next_run = await store.get_run(next_key)
        if next_run is None:
            break
        turn, run = turn + 1, next_run
    return None if run is None else (turn, run)


def _hint_scope(principal: Principal) -> str:
    # Per user: a hint shared by a tenant's users let one user's newer turns of a chat id hide
    # another's (a 204 for a turn that exists) and tell them that the chat id was in use. NUL
    # is in no id, so the pair is unambiguous.
    return f"{principal.tenant_id}\0{principal.user_id}"


def ai_sdk_routes(
    *,
    supervisor: Supervisor,
    project_id: str,
    authorize: Callable[[Request], Principal],
    produce: Producer | None = None,
    adapter: ReconnectAdapter | None = None,
    latest: LatestTurns | None = None,
) -> list[Route]:
    """The AI SDK transport routes, running turns with ``produce`` or ``adapter``."""
    latest_turns = latest if latest is not None else LatestTurns()

    async def chat(request: Request) -> Response:
        try:
            principal = authorize(request)
            body = await AiSdkChatRequest.read(request, limits=supervisor.limits)
            identity = TurnIdentity(
                tenant_id=principal.tenant_id,
                project_id=project_id,
                session_id=body.chat_id,
                user_id=principal.user_id,
                turn_index=body.turn_index,
            )
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        # The transport has no cursor: ai-sdk replays the turn whole, whatever the query says.
        result = await handle_chat_turn(
            identity,
            {"message": body.message},
            supervisor=supervisor,
            produce=produce,
            adapter=adapter,
            format=StreamFormat.AI_SDK.value,
        )
        if result.status == 200:
            latest_turns.record(_hint_scope(principal), body.chat_id, body.turn_index)
        return result.response

    async def resume(request: Request) -> Response:
        chat_id: str = request.path_params["chat_id"]
        try:
            principal = authorize(request)
            derive_execution_id(project_id, chat_id, 0)  # a malformed chat id is a 400
            await supervisor.ensure_started()
            found = await find_latest_turn(
                supervisor.store,
                tenant_id=principal.tenant_id,
                project_id=project_id,
                chat_id=chat_id,
                hint=latest_turns.hint(_hint_scope(principal), chat_id),
                user_id=supervisor.run_key(principal.tenant_id, principal.user_id, "").user_id,
            )
            if found is None or found[1].user_id != principal.user_id:
                return Response(status_code=204, headers={"Cache-Control": "no-store"})
            turn_index, run = found
            latest_turns.record(_hint_scope(principal), chat_id, turn_index)
            mode = "replayed" if run.status.finished else "joined"
            if not run.status.finished and not run.lease_live:
                # The owner died: re-attach now rather than after a blocked read (as the
                # middleware's resume route does).
                if await supervisor.recover(run.key) and supervisor.owns(run.key):
                    mode = "resumed"
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        return stream_run(supervisor, run.key, fmt=StreamFormat.AI_SDK, after=0, mode=mode).response

    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/chat/{chat_id:path}/stream", resume, methods=["GET"]),
    ]
