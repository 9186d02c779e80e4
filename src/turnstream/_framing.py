"""Framing: logged events → wire bytes, and the request parts that choose the framing.

Everything here is pure: no I/O, no mutation of its arguments, the same input always gives the
same bytes. The functions are tested against tables of exact wire bytes.

Every frame ends on a frame boundary (``\\n`` for NDJSON, a blank line for SSE), so a
response may put a keep-alive between any two frames and never inside one.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from sse_starlette import ServerSentEvent

from ._events import LoggedEvent
from ._exceptions import InvalidTurnInput

__all__ = [
    "MAX_CURSOR",
    "SSE_KEEPALIVE",
    "SSE_LINE_SEPARATOR",
    "StreamFormat",
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

_NAME_ESCAPES: Final = {"%": "%25", "\r": "%0D", "\n": "%0A"}
_NAME_UNSAFE = re.compile(r"[%\r\n]")


class StreamFormat(enum.Enum):
    """How a turn is put on the wire. The value is what ``?format=`` accepts."""

    NDJSON = "ndjson"
    SSE = "sse"

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self]

    @property
    def keepalive(self) -> bytes | None:
        """The idle filler for this format, or ``None`` when it has no way to send one.

        NDJSON has no comment syntax: a blank line would be an empty (invalid) JSON document
        to a strict reader, so NDJSON streams stay silent while idle.
        """
        return SSE_KEEPALIVE if self is StreamFormat.SSE else None


_MEDIA_TYPES: Final = {
    StreamFormat.NDJSON: "application/x-ndjson",
    StreamFormat.SSE: "text/event-stream",
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
    """
    return ServerSentEvent(
        # ServerSentEvent splits data on CR/LF into several `data:` lines, which a client joins
        # back with "\n"; orjson's output has none, so this is always a single line.
        event.to_json().decode("utf-8"),
        id=str(event.seq),
        event=sse_event_name(event.type),
        sep=SSE_LINE_SEPARATOR,
    ).encode()


def sse_retry_frame(ms: int) -> bytes:
    """A ``retry:`` message: the reconnection delay a browser's ``EventSource`` should use."""
    # The SSE grammar only honours ASCII digits here: a negative, fractional or boolean value
    # would be ignored by the client, so it is a bug at the call site.
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
        raise ValueError(f"retry must be a non-negative integer of milliseconds, got {ms!r}")
    return ServerSentEvent(retry=ms, sep=SSE_LINE_SEPARATOR).encode()


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

    From ``?after=`` and the ``Last-Event-ID`` header. Each is strict on its own: ASCII digits
    only, no sign, no whitespace, no leading zero (but ``"0"``), at most ``2**53 - 1``; absent or
    empty means 0. A malformed one is an :class:`InvalidTurnInput` naming its field, even when
    the other one is fine.

    When both are given, the larger wins. Both say "I hold everything up to here", so the
    larger is the client's newest knowledge and resuming after it is still gap-free. Demanding
    that they agree would break the commonest case: ``new EventSource("…/stream?after=5")``
    reconnects to the same URL with a newer ``Last-Event-ID``, and a 400 there would end the
    ``EventSource`` for good.
    """
    after = _parse_one_cursor(after_param, "after")
    header = _parse_one_cursor(last_event_id, "Last-Event-ID")
    return max(after, header)
