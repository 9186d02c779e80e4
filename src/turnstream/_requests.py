"""Reading a chat-turn request body strictly: size and time limits first, then shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import anyio
import orjson
from starlette.requests import ClientDisconnect, Request

from ._exceptions import InvalidTurnInput, PayloadTooLarge, RequestTimeout
from ._hooks import Limits

__all__ = ["ChatTurnRequest", "decode_json_body", "read_json_body"]

_DEFAULT_BODY_TIMEOUT_S: Final = Limits().body_timeout_s


async def read_json_body(
    request: Request, *, max_bytes: int, timeout_s: float | None = _DEFAULT_BODY_TIMEOUT_S
) -> Any:
    """The request's JSON body, read incrementally so an oversized body is refused early.

    The whole body must arrive within ``timeout_s`` of the call (``None``: no deadline), else
    :class:`RequestTimeout` (a 408): a client trickling its body byte by byte would otherwise
    hold the request, and its connection, for as long as it likes. The deadline bounds the
    whole body, not each chunk, because a per-chunk timeout is beaten by one byte a second.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise InvalidTurnInput("malformed Content-Length", field="Content-Length")
        # Compared by length before int(): a value of over 4300 digits would otherwise be a
        # ValueError from int()'s own digit limit (a 500), not a 413. Leading zeros are legal.
        digits = declared.lstrip("0") or "0"
        if len(digits) > len(str(max_bytes)) or int(digits) > max_bytes:
            raise PayloadTooLarge(f"the body is over {max_bytes} bytes", field="body")
    _check_json_content_type(request.headers.get("content-type"))
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout_s) as deadline:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the body is over {max_bytes} bytes", field="body")
                chunks.append(chunk)
        except ClientDisconnect:
            raise InvalidTurnInput("the client left before sending the whole body") from None
    if deadline.cancelled_caught:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s", field="body")
    return _loads(b"".join(chunks))


def decode_json_body(body: bytes, *, content_type: str | None, max_bytes: int) -> Any:
    """A body some framework already read (Django's ``request.body``), checked as strictly."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"the body is over {max_bytes} bytes", field="body")
    _check_json_content_type(content_type)
    return _loads(body)


def _check_json_content_type(content_type: str | None) -> None:
    if content_type is None:
        content_type = "application/json"
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise InvalidTurnInput("the body must be application/json", field="Content-Type")


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidTurnInput(f"the body is not valid JSON: {exc}", field="body") from None


def check_message(message: str, limits: Limits) -> None:
    """A user message must have text and fit ``limits.max_message_chars``."""
    if not message.strip():
        raise InvalidTurnInput("message must not be empty", field="message")
    if len(message) > limits.max_message_chars:
        raise PayloadTooLarge(
            f"message is longer than {limits.max_message_chars} characters", field="message"
        )


@dataclass(frozen=True, slots=True)
class ChatTurnRequest:
    """The common chat body: ``{"sessionId": str, "turnIndex": int, "message": str}``."""

    session_id: str
    turn_index: int
    message: str

    @classmethod
    def from_json(cls, body: Any, *, limits: Limits | None = None) -> ChatTurnRequest:
        limits = limits or Limits()
        if not isinstance(body, dict):
            raise InvalidTurnInput("the body must be a JSON object", field="body")
        session_id = body.get("sessionId")
        turn_index = body.get("turnIndex")
        message = body.get("message")
        if not isinstance(session_id, str):
            raise InvalidTurnInput("sessionId must be a string", field="sessionId")
        if not isinstance(turn_index, int) or isinstance(turn_index, bool):
            raise InvalidTurnInput("turnIndex must be an integer", field="turnIndex")
        if turn_index < 0:
            raise InvalidTurnInput("turnIndex must not be negative", field="turnIndex")
        if not isinstance(message, str):
            raise InvalidTurnInput("message must be a string", field="message")
        check_message(message, limits)
        return cls(session_id=session_id, turn_index=turn_index, message=message)

    @classmethod
    async def read(cls, request: Request, *, limits: Limits | None = None) -> ChatTurnRequest:
        limits = limits or Limits()
        body = await read_json_body(
            request, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s
        )
        return cls.from_json(body, limits=limits)
