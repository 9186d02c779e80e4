"""Framing: logged events → wire bytes, and the request parts that choose the framing.

Everything here is pure: no I/O, no mutation of its arguments, the same input always gives the
same bytes. The functions are tested against tables of exact wire bytes.

Every frame ends on a frame boundary (``\\n`` for NDJSON, a blank line for SSE and the AI
SDK's UI message stream), so a response may put a keep-alive between any two frames and never
inside one.

The AI SDK format is the one stateful framing: a text part is opened by the first text delta
and closed by the end of the turn (or a restart). The state lives in :class:`AiSdkFramer`; the
mapping itself is the pure :func:`ai_sdk_chunks`, which takes the state and returns the next.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson
from sse_starlette import ServerSentEvent

from ._events import (
    CANCELLED,
    COMPLETED,
    ERROR,
    FAILED,
    RESTARTED,
    STARTED,
    TEXT_DELTA,
    LoggedEvent,
)
from ._exceptions import InvalidTurnInput

__all__ = [
    "AI_SDK_DATA_PART",
    "AI_SDK_DONE",
    "AI_SDK_HEADERS",
    "MAX_CURSOR",
    "SSE_KEEPALIVE",
    "SSE_LINE_SEPARATOR",
    "AiSdkFramer",
    "AiSdkState",
    "StreamFormat",
    "ai_sdk_chunks",
    "frame_ai_sdk_chunk",
    "frame_ndjson",
    "frame_sse",
    "negotiate_format",
    "parse_cursor",
    "sse_event_name",
    "sse_retry_frame",
]

# sse-starlette defaults to "\r\n". We pick "\n" on purpose: the WHATWG grammar accepts LF,
# CR and CRLF alike, so every conforming parser (browsers' EventSource, httpx-sse, the AI
# SDK's eventsource-parser) reads LF; but hand-rolled clients that split on "\n\n" only work
# with LF. One byte less per line, and the same terminator as NDJSON and our keep-alive.
SSE_LINE_SEPARATOR: Final = "\n"

# A comment line: every SSE parser ignores it, yet it keeps proxies and load balancers from
# closing an idle connection.
SSE_KEEPALIVE: Final = b": ping\n\n"

MAX_CURSOR: Final = 2**53 - 1  # a seq stays exact through JSON in every language

# `seq` is assigned by the store as 1, 2, 3…, so a cursor is the canonical decimal form of a
# non-negative integer: "0" or digits without a leading zero. `[0-9]`, not `\d`, which would
# let Unicode digits ("٣") through.
_CURSOR = re.compile(r"0|[1-9][0-9]*")
_CURSOR_MAX_DIGITS: Final = len(str(MAX_CURSOR))
_OWS: Final = " \t"

_NAME_ESCAPES: Final = {"%": "%25", "\r": "%0D", "\n": "%0A"}
_NAME_UNSAFE = re.compile(r"[%\r\n]")


class StreamFormat(enum.Enum):
    """How a turn is put on the wire. The value is what ``?format=`` accepts."""

    NDJSON = "ndjson"
    SSE = "sse"
    AI_SDK = "ai-sdk"

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self]

    @property
    def keepalive(self) -> bytes | None:
        """The idle filler for this format, or ``None`` when it has no way to send one.

        NDJSON has no comment syntax: a blank line would be an empty (invalid) JSON document
        to a strict reader, so NDJSON streams stay silent while idle. The AI SDK's stream is
        SSE underneath (read with eventsource-parser), so it takes the SSE comment.
        """
        return None if self is StreamFormat.NDJSON else SSE_KEEPALIVE

    @property
    def replays_whole_turn(self) -> bool:
        """Whether a resume ignores the client's cursor and sends the turn from its start.

        The AI SDK's resume (``DefaultChatTransport`` with ``resumeStreamIsReplay``, the
        default) rebuilds the assistant message from the first ``start`` chunk it reads, so
        it needs the whole turn; its chunks carry no seq to resume after anyway.
        """
        return self is StreamFormat.AI_SDK


_MEDIA_TYPES: Final = {
    StreamFormat.NDJSON: "application/x-ndjson",
    StreamFormat.SSE: "text/event-stream",
    StreamFormat.AI_SDK: "text/event-stream",
}


def frame_ndjson(event: LoggedEvent) -> bytes:
    """One NDJSON line: the wire JSON (``seq`` first) and ``\\n``."""
    # orjson never emits a raw newline (control characters in strings are escaped), so the
    # event is exactly one line.
    return event.to_json() + b"\n"


def sse_event_name(event_type: str) -> str:
    """The ``event:`` field for an event type: the type, with ``%``, CR and LF percent-encoded.

    A CR or LF would end the field early and let the rest of the type be read as a field of
    its own (``id:``, ``retry:``…). sse-starlette silently deletes them, which would merge two
    distinct types into one; percent-encoding ``%`` as well keeps the mapping injective, so
    ``decodeURIComponent(e.type)`` gives the logged type back. The ``type`` inside ``data`` is
    always the exact logged one.
    """
    return _NAME_UNSAFE.sub(lambda match: _NAME_ESCAPES[match.group()], event_type)


def frame_sse(event: LoggedEvent) -> bytes:
    """One SSE message: ``id: <seq>``, ``event: <type>``, ``data: <wire json>`` and a blank line.

    ``id`` is the seq, so a browser's ``Last-Event-ID`` is the resume cursor by itself.

    Byte for byte what sse-starlette's ``ServerSentEvent`` writes for it (the tests hold it to
    that), built directly: the wire JSON never holds a line break (orjson escapes them), so it
    is one ``data:`` line, and ``ServerSentEvent`` cost 3.5 µs per event against 0.7 µs here,
    most of a streamed event's budget.
    """
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.seq,
        _sse_event_name_bytes(event.type),
        event.to_json(),
    )


@functools.lru_cache(maxsize=1024)
def _sse_event_name_bytes(event_type: str) -> bytes:
    # A turn has a handful of event types: each is escaped once.
    return sse_event_name(event_type).encode("utf-8", "surrogatepass")


def sse_retry_frame(ms: int) -> bytes:
    """A ``retry:`` message: the reconnection delay a browser's ``EventSource`` should use."""
    # The SSE grammar only honours ASCII digits here: a negative, fractional or boolean value
    # would be ignored by the client, so it is a bug at the call site.
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
        raise ValueError(f"retry must be a non-negative integer of milliseconds, got {ms!r}")
    return ServerSentEvent(retry=ms, sep=SSE_LINE_SEPARATOR).encode()


# The AI SDK's UI message stream (the `ai` package's `UIMessageChunk`, read by its
# `DefaultChatTransport`): SSE with one JSON chunk per `data:` line and no `id:`/`event:`
# fields. The SDK's parser skips `[DONE]`; it tells a proxy or a hand-rolled client that the
# message is whole, so it is sent only after a terminal event, never after a broken read.
AI_SDK_HEADERS: Final = {"x-vercel-ai-ui-message-stream": "v1"}
AI_SDK_DONE: Final = b"data: [DONE]\n\n"
# Events with no chunk of their own travel as this data part (the SDK accepts any
# `data-<name>` chunk and keeps it in the message's parts), the logged event as its `data`.
AI_SDK_DATA_PART: Final = "data-turnstream"


@dataclass(frozen=True, slots=True)
class AiSdkState:
    """Where an AI SDK stream is.

    ``text_id``: the open text part, if any. ``done``: a terminal event was framed, so
    ``[DONE]`` follows. ``attempt``: the attempt the events being read belong to (1, then
    each ``session.run.restarted`` says). ``hidden_below``: the run's attempt when the stream
    began; the events of earlier attempts are superseded and not sent at all.
    """

    text_id: str | None = None
    done: bool = False
    attempt: int = 1
    hidden_below: int = 1


def _payload_with_seq_first(event: LoggedEvent) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(event.to_json())
    return value


def ai_sdk_chunks(
    event: LoggedEvent, state: AiSdkState
) -> tuple[list[dict[str, Any]], AiSdkState]:
    """The UI message chunks for one logged event, and the state after them.

    ==========================  ===================================================================
    log event                   chunks
    ==========================  ===================================================================
    session.run.started         ``start`` (``messageId`` = execution id), ``start-step``
    text-delta (string delta)   ``text-start`` (first delta of a part; id ``text-<seq>``),
                                ``text-delta``
    error                       ``error`` (``errorText`` = message, else code)
    session.run.completed       [``text-end``], ``finish-step``, ``finish`` (``stop``)
    session.run.failed          [``text-end``], ``finish-step``, ``finish`` (``error``)
    session.run.cancelled       [``text-end``], ``finish-step``, ``abort`` (``cancelled``)
    session.run.restarted       [``text-end``], ``finish-step``, ``start-step``,
                                ``data-turnstream`` (the event)
    anything else               ``data-turnstream`` (the event, ``seq`` included)
    any of the three above, in  nothing
    a superseded attempt
    ==========================  ===================================================================

    The messageId is the execution id, so the message a POST built and the one a resume
    replays are the same message to the client.

    Restarts: the protocol has no chunk that takes back text a client has shown. So the
    attempts a restart had superseded before the stream began (``state.hidden_below``) are
    not sent: only their ``start`` and the restart chunks are, and a stock client shows the
    live attempt's text alone. A restart that happens while the stream is read (rare: the
    reader of a dead owner gets ``owner_lost`` instead) starts a new step; a client drops the
    dead attempt's text by showing the parts after the last ``step-start``.

    Pure: ``event`` and ``state`` are not changed.
    """
    if event.type == TEXT_DELTA and state.attempt >= state.hidden_below:
        # The common case, first: only the delta is read (no payload with seq is built), and
        # the state is copied only when a text part opens (dataclasses.replace per delta was
        # 18 % of an AI SDK stream's CPU). A delta that is not a string is a data part below.
        delta = orjson.loads(event.data).get("delta")
        if isinstance(delta, str):
            if state.text_id is not None:
                return [{"type": "text-delta", "id": state.text_id, "delta": delta}], state
            # The seq of the part's first delta: unique in the turn and the same on every
            # replay, so a replayed message has the very ids the live one had.
            text_id = f"text-{event.seq}"
            opened: list[dict[str, Any]] = [
                {"type": "text-start", "id": text_id},
                {"type": "text-delta", "id": text_id, "delta": delta},
            ]
            return opened, replace(state, text_id=text_id)
    payload = _payload_with_seq_first(event)
    chunks: list[dict[str, Any]] = []

    def close_text() -> None:
        if state.text_id is not None:
            chunks.append({"type": "text-end", "id": state.text_id})

    if event.type == STARTED:
        start: dict[str, Any] = {"type": "start"}
        if isinstance(payload.get("executionId"), str):
            start["messageId"] = payload["executionId"]
        # A log may begin with a later attempt (its first attempt died before logging
        # anything): the events that follow are that attempt's.
        begun = payload.get("attempt")
        if isinstance(begun, int) and not isinstance(begun, bool) and begun > state.attempt:
            state = replace(state, attempt=begun)
        return [start, {"type": "start-step"}], state
    if event.type == RESTARTED:
        close_text()
        chunks.extend(({"type": "finish-step"}, {"type": "start-step"}))
        chunks.append({"type": AI_SDK_DATA_PART, "data": payload})
        attempt = payload.get("attempt")
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            attempt = state.attempt + 1
        return chunks, replace(state, text_id=None, attempt=attempt)
    if event.type not in _AI_SDK_ENDINGS and state.attempt < state.hidden_below:
        return [], state  # an event of an attempt a restart superseded
    if event.type == ERROR:
        return [{"type": "error", "errorText": _error_text(payload)}], state
    if event.type in _AI_SDK_ENDINGS:
        close_text()
        chunks.append({"type": "finish-step"})
        chunks.append(dict(_AI_SDK_ENDINGS[event.type]))
        return chunks, replace(state, text_id=None, done=True)
    return [{"type": AI_SDK_DATA_PART, "data": payload}], state


_AI_SDK_ENDINGS: Final[Mapping[str, dict[str, Any]]] = {
    COMPLETED: {"type": "finish", "finishReason": "stop"},
    FAILED: {"type": "finish", "finishReason": "error"},
    # What the SDK's own streamText sends when its run is aborted.
    CANCELLED: {"type": "abort", "reason": "cancelled"},
}


def _error_text(payload: Mapping[str, Any]) -> str:
    for name in ("message", "code"):
        value = payload.get(name)
        if isinstance(value, str) and value:
            return value
    return "error"


def frame_ai_sdk_chunk(chunk: Mapping[str, Any]) -> bytes:
    """One UI message chunk on the wire: ``data: <json>`` and a blank line."""
    # orjson escapes every control character, so the JSON is one line and cannot end the
    # `data:` field early.
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class AiSdkFramer:
    """Frames one turn's events as an AI SDK UI message stream (one framer per response).

    ``frame`` gives every chunk of an event at once, so a keep-alive never splits them; after
    the terminal event it adds ``[DONE]``. ``hidden_below`` is the run's attempt when the
    stream begins (see :func:`ai_sdk_chunks`).
    """

    def __init__(self, *, hidden_below: int = 1) -> None:
        self.state = AiSdkState(hidden_below=hidden_below)

    def frame(self, event: LoggedEvent) -> bytes:
        chunks, self.state = ai_sdk_chunks(event, self.state)
        wire = b"".join(frame_ai_sdk_chunk(chunk) for chunk in chunks)
        return wire + AI_SDK_DONE if self.state.done else wire


def negotiate_format(format_param: str | None, accept: str | None) -> StreamFormat:
    """Choose the wire format of a turn response.

    ``?format=`` wins when given (an empty value counts as absent); an unknown value is a 400
    (:class:`InvalidTurnInput` with ``field="format"``), not a silent fallback, so a typo is
    seen at once. Otherwise SSE when ``Accept`` names ``text/event-stream`` with a non-zero
    weight that is not below the weight it gives ``application/x-ndjson`` (what a browser's
    ``EventSource`` sends). Otherwise NDJSON. Wildcards (``*/*``, ``text/*``) choose nothing:
    they mean the client takes the default.
    """
    if format_param:
        try:
            return StreamFormat(format_param)
        except ValueError:
            known = ", ".join(repr(member.value) for member in StreamFormat)
            raise InvalidTurnInput(
                f"unknown stream format {format_param!r}; expected one of {known}",
                field="format",
            ) from None
    if accept:
        weights = _accept_weights(accept)
        sse = weights.get(_MEDIA_TYPES[StreamFormat.SSE], 0.0)
        ndjson = weights.get(_MEDIA_TYPES[StreamFormat.NDJSON], 0.0)
        if sse > 0.0 and sse >= ndjson:
            return StreamFormat.SSE
    return StreamFormat.NDJSON


# RFC 9110 §12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _accept_weights(accept: str) -> dict[str, float]:
    """The weight of each concrete media type an ``Accept`` header names (highest wins)."""
    weights: dict[str, float] = {}
    for media_range in accept.split(","):
        media_type, *params = (part.strip() for part in media_range.split(";"))
        media_type = media_type.lower()
        if not media_type or "*" in media_type:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                # A malformed weight is ignored rather than rejected: a client that names the
                # type at all wants it, and Accept is never worth a 400.
                if _QVALUE.fullmatch(value):
                    weight = float(value)
        weights[media_type] = max(weight, weights.get(media_type, 0.0))
    return weights


def _parse_one_cursor(value: str | None, field: str) -> int:
    """One cursor, whichever source it came from: the one validation of ``parse_cursor``."""
    if value is None:
        return 0
    # SP and HTAB only (RFC 9110's OWS), not str.strip(): a newline, a vertical tab or a
    # Unicode space around the digits is junk, not optional whitespace.
    value = value.strip(_OWS)
    if not value:
        return 0
    # The length check comes first so a megabyte of digits is refused without building a
    # bignum (and without tripping int()'s own digit limit, a ValueError of another kind).
    if len(value) > _CURSOR_MAX_DIGITS or not _CURSOR.fullmatch(value):
        raise InvalidTurnInput(
            f"{field} must be a seq: a non-negative integer in canonical decimal form",
            field=field,
        )
    cursor = int(value)
    if cursor > MAX_CURSOR:
        raise InvalidTurnInput(f"{field} must be at most {MAX_CURSOR}", field=field)
    return cursor


def parse_cursor(after_param: str | None, last_event_id: str | None) -> int:
    """The resume cursor: the client already holds every event with ``seq <= cursor``.

    From ``?after=`` and the ``Last-Event-ID`` header, each checked by the same rule: ASCII
    digits only, no sign, no leading zero (but ``"0"``), at most ``2**53 - 1``; absent or
    empty means 0. A malformed one is an :class:`InvalidTurnInput` naming its field, even when
    the other one is fine.

    Surrounding spaces and tabs are allowed, and stripped, in both. For a header that is
    what HTTP says (RFC 9110 §5.5: optional whitespace around a field value is not part of
    it), but servers differ in how much of it they remove before the app sees the value: h11
    strips both sides, httptools (llhttp) only the leading side, so ``Last-Event-ID: 3 `` (a
    legal header) reaches the app as ``"3"`` or ``"3 "`` depending on the server. Refusing
    whitespace here would make one request a 200 on one server and a 400 on another; allowing
    it in the header only would make ``?after=%203`` a 400 where ``Last-Event-ID: 3`` is
    not. So one rule for both sources: spaces and tabs around the number are ignored,
    anything else (inside the number, or other whitespace such as a newline) is refused.

    When both are given, the larger wins. Both say "I hold everything up to here", so the
    larger is the client's newest knowledge and resuming after it is still gap-free. Demanding
    that they agree would break the commonest case: ``new EventSource("…/stream?after=5")``
    reconnects to the same URL with a newer ``Last-Event-ID``, and a 400 there would end the
    ``EventSource`` for good.
    """
    after = _parse_one_cursor(after_param, "after")
    header = _parse_one_cursor(last_event_id, "Last-Event-ID")
    return max(after, header)
