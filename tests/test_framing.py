from __future__ import annotations

from urllib.parse import unquote

import orjson
import pytest

# httpx-sse's decoder is an independent WHATWG-conformant SSE parser: what it reads back is
# what a client would see. Its modules are private, which is fine for a test.
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from httpx_sse._models import ServerSentEvent as ParsedEvent
from hypothesis import given
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from tests._helpers import CURSOR_CASES
from turnstream._events import LoggedEvent
from turnstream._exceptions import InvalidTurnInput
from turnstream._framing import (
    MAX_CURSOR,
    SSE_KEEPALIVE,
    StreamFormat,
    frame_ndjson,
    frame_sse,
    negotiate_format,
    parse_cursor,
    sse_event_name,
    sse_retry_frame,
)


def logged(seq: int, data: bytes, event_id: str = "e1") -> LoggedEvent:
    event_type = orjson.loads(data)["type"]
    return LoggedEvent(seq=seq, event_id=event_id, type=event_type, data=data)


def parse_sse(wire: bytes) -> list[ParsedEvent]:
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    events = []
    for line in [*lines.decode(wire.decode("utf-8")), *lines.flush()]:
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


STARTED = logged(
    1, b'{"type":"session.run.started","executionId":"p:s:0","attempt":1,"eventId":"e0"}'
)
DELTA = logged(2, b'{"type":"text-delta","delta":"Hi","eventId":"e1"}')
UNICODE = logged(
    3, '{"type":"text-delta","delta":"h\u00e9llo \u2713 \U0001f389 \u4e2d","eventId":"e2"}'.encode()
)
ESCAPED = logged(4, b'{"type":"text-delta","delta":"line one\\nline two\\r\\u0000","eventId":"e3"}')
# U+2028/U+2029 are line breaks to JavaScript and to str.splitlines(), never to SSE or NDJSON.
SEPARATORS = logged(5, '{"type":"text-delta","delta":"a\u2028b\u2029c","eventId":"e4"}'.encode())
NESTED = logged(
    6,
    b'{"type":"tool-call","args":{"a":[1,2.5,{"b":null,"c":[true,false]}],"d":{}},"eventId":"e5"}',
)
LARGE_SEQ = logged(
    MAX_CURSOR, b'{"type":"session.run.completed","finalText":"done","eventId":"e6"}'
)


NDJSON_TABLE = [
    (
        STARTED,
        b'{"seq":1,"type":"session.run.started","executionId":"p:s:0","attempt":1,"eventId":"e0"}\n',
    ),
    (DELTA, b'{"seq":2,"type":"text-delta","delta":"Hi","eventId":"e1"}\n'),
    (
        UNICODE,
        '{"seq":3,"type":"text-delta","delta":"h\u00e9llo \u2713 \U0001f389 \u4e2d",'
        '"eventId":"e2"}\n'.encode(),
    ),
    (
        ESCAPED,
        b'{"seq":4,"type":"text-delta","delta":"line one\\nline two\\r\\u0000","eventId":"e3"}\n',
    ),
    (
        SEPARATORS,
        '{"seq":5,"type":"text-delta","delta":"a\u2028b\u2029c","eventId":"e4"}\n'.encode(),
    ),
    (
        NESTED,
        b'{"seq":6,"type":"tool-call","args":{"a":[1,2.5,{"b":null,"c":[true,false]}],"d":{}},'
        b'"eventId":"e5"}\n',
    ),
    (
        LARGE_SEQ,
        b'{"seq":9007199254740991,"type":"session.run.completed","finalText":"done","eventId":"e6"}\n',
    ),
]


@pytest.mark.parametrize(("event", "wire"), NDJSON_TABLE)
def test_frame_ndjson_exact_bytes(event: LoggedEvent, wire: bytes) -> None:
    assert frame_ndjson(event) == wire
    assert wire.count(b"\n") == 1
    assert orjson.loads(wire) == event.payload()


SSE_TABLE = [
    (
        STARTED,
        b"id: 1\nevent: session.run.started\n"
        b'data: {"seq":1,"type":"session.run.started","executionId":"p:s:0","attempt":1,'
        b'"eventId":"e0"}\n\n',
    ),
    (
        DELTA,
        b"id: 2\nevent: text-delta\n"
        b'data: {"seq":2,"type":"text-delta","delta":"Hi","eventId":"e1"}\n\n',
    ),
    (
        UNICODE,
        'id: 3\nevent: text-delta\ndata: {"seq":3,"type":"text-delta",'
        '"delta":"h\u00e9llo \u2713 \U0001f389 \u4e2d","eventId":"e2"}\n\n'.encode(),
    ),
    (
        ESCAPED,
        b"id: 4\nevent: text-delta\n"
        b'data: {"seq":4,"type":"text-delta","delta":"line one\\nline two\\r\\u0000",'
        b'"eventId":"e3"}\n\n',
    ),
    (
        SEPARATORS,
        'id: 5\nevent: text-delta\ndata: {"seq":5,"type":"text-delta","delta":"a\u2028b\u2029c",'
        '"eventId":"e4"}\n\n'.encode(),
    ),
    (
        NESTED,
        b"id: 6\nevent: tool-call\n"
        b'data: {"seq":6,"type":"tool-call",'
        b'"args":{"a":[1,2.5,{"b":null,"c":[true,false]}],"d":{}},"eventId":"e5"}\n\n',
    ),
    (
        LARGE_SEQ,
        b"id: 9007199254740991\nevent: session.run.completed\n"
        b'data: {"seq":9007199254740991,"type":"session.run.completed","finalText":"done",'
        b'"eventId":"e6"}\n\n',
    ),
]


@pytest.mark.parametrize(("event", "wire"), SSE_TABLE)
def test_frame_sse_exact_bytes(event: LoggedEvent, wire: bytes) -> None:
    assert frame_sse(event) == wire
    [parsed] = parse_sse(wire)
    assert parsed.id == str(event.seq)
    assert parsed.event == event.type
    assert parsed.data == event.to_json().decode()


def test_sse_uses_lf_only() -> None:
    for event, _ in SSE_TABLE:
        assert b"\r" not in frame_sse(event)


def test_framing_does_not_mutate_the_event() -> None:
    before = (DELTA.seq, DELTA.event_id, DELTA.type, DELTA.data)
    frame_ndjson(DELTA)
    frame_sse(DELTA)
    assert (DELTA.seq, DELTA.event_id, DELTA.type, DELTA.data) == before


# A type carrying CR/LF must not be able to end the `event:` line and smuggle in a field.
EVENT_NAME_TABLE = [
    ("text-delta", "text-delta"),
    ("session.run.completed", "session.run.completed"),
    ("évènement ✓", "évènement ✓"),
    ("a\nb", "a%0Ab"),
    ("a\rb", "a%0Db"),
    ("a\r\nb", "a%0D%0Ab"),
    ("evil\nid: 99\nretry: 1", "evil%0Aid: 99%0Aretry: 1"),
    ("50%", "50%25"),
    ("a%0Ab", "a%250Ab"),  # a literal escape does not collide with an escaped newline
    ("\n", "%0A"),
]


@pytest.mark.parametrize(("event_type", "name"), EVENT_NAME_TABLE)
def test_sse_event_name(event_type: str, name: str) -> None:
    assert sse_event_name(event_type) == name
    assert unquote(name) == event_type


def test_frame_sse_escapes_line_breaks_in_the_type() -> None:
    data = orjson.dumps({"type": "evil\r\nid: 99\nretry: 1", "eventId": "e1"})
    event = LoggedEvent(seq=7, event_id="e1", type="evil\r\nid: 99\nretry: 1", data=data)
    wire = frame_sse(event)
    assert wire == (
        b"id: 7\nevent: evil%0D%0Aid: 99%0Aretry: 1\n"
        b'data: {"seq":7,"type":"evil\\r\\nid: 99\\nretry: 1","eventId":"e1"}\n\n'
    )
    [parsed] = parse_sse(wire)
    assert parsed.id == "7"
    assert parsed.retry is None
    assert parsed.json()["type"] == event.type


@given(
    seq=st.integers(min_value=1, max_value=MAX_CURSOR),
    event_type=st.text(min_size=1),
    delta=st.text(),
)
def test_frame_sse_is_always_one_well_formed_event(seq: int, event_type: str, delta: str) -> None:
    data = orjson.dumps({"type": event_type, "delta": delta, "eventId": "e"})
    event = LoggedEvent(seq=seq, event_id="e", type=event_type, data=data)
    wire = frame_sse(event)
    assert wire.endswith(b"\n\n")
    assert wire.count(b"\n\n") == 1  # exactly one message; nothing can split it
    [parsed] = parse_sse(wire)
    assert parsed.id == str(seq)
    assert unquote(parsed.event) == event_type
    assert parsed.json() == event.payload()
    line = frame_ndjson(event)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert orjson.loads(line) == event.payload()


@given(
    seq=st.integers(min_value=1, max_value=MAX_CURSOR),
    event_type=st.text(min_size=1),
    delta=st.text(),
)
def test_frame_sse_writes_what_sse_starlette_writes(seq: int, event_type: str, delta: str) -> None:
    # The framing is built by hand for speed; sse-starlette stays the reference.
    data = orjson.dumps({"type": event_type, "delta": delta, "eventId": "e"})
    event = LoggedEvent(seq=seq, event_id="e", type=event_type, data=data)
    reference = ServerSentEvent(
        event.to_json().decode("utf-8"),
        id=str(seq),
        event=sse_event_name(event_type),
        sep="\n",
    ).encode()
    assert frame_sse(event) == reference


def test_keepalive_is_an_sse_comment() -> None:
    assert SSE_KEEPALIVE == b": ping\n\n"
    assert SSE_KEEPALIVE == ServerSentEvent(comment="ping", sep="\n").encode()
    assert parse_sse(SSE_KEEPALIVE) == []


@pytest.mark.parametrize(
    ("ms", "wire"),
    [(0, b"retry: 0\n\n"), (1500, b"retry: 1500\n\n"), (86_400_000, b"retry: 86400000\n\n")],
)
def test_sse_retry_frame(ms: int, wire: bytes) -> None:
    assert sse_retry_frame(ms) == wire
    [parsed] = parse_sse(wire)
    assert parsed.retry == ms


@pytest.mark.parametrize("ms", [-1, True, 1.5, "100"])
def test_sse_retry_frame_rejects_what_a_client_would_ignore(ms: object) -> None:
    with pytest.raises(ValueError):
        sse_retry_frame(ms)  # type: ignore[arg-type]


def test_stream_format_media_types_and_keepalive() -> None:
    assert StreamFormat.NDJSON.media_type == "application/x-ndjson"
    assert StreamFormat.SSE.media_type == "text/event-stream"
    assert StreamFormat.NDJSON.keepalive is None
    assert StreamFormat.SSE.keepalive == SSE_KEEPALIVE
    assert [member.value for member in StreamFormat] == ["ndjson", "sse", "ai-sdk"]


NDJSON, SSE = StreamFormat.NDJSON, StreamFormat.SSE

NEGOTIATE_TABLE = [
    (None, None, NDJSON),
    (None, "", NDJSON),
    ("ndjson", None, NDJSON),
    ("sse", None, SSE),
    ("ndjson", "text/event-stream", NDJSON),  # ?format= wins over Accept
    ("sse", "application/x-ndjson", SSE),
    ("", "text/event-stream", SSE),  # an empty ?format= counts as absent
    (None, "text/event-stream", SSE),  # what EventSource sends
    (None, "Text/Event-Stream", SSE),
    (None, "text/event-stream; charset=utf-8", SSE),
    (None, "application/json, text/event-stream", SSE),
    (None, "text/html,text/event-stream;q=0.9,*/*;q=0.8", SSE),
    (None, "text/event-stream;q=0", NDJSON),  # q=0 means "not acceptable"
    (None, "text/event-stream; q=0.000", NDJSON),
    (None, "application/x-ndjson, text/event-stream;q=0.5", NDJSON),
    (None, "application/x-ndjson;q=0.5, text/event-stream", SSE),
    (None, "application/x-ndjson, text/event-stream", SSE),  # a tie goes to SSE
    (None, "text/event-stream;q=bogus", SSE),  # a malformed weight is ignored
    (None, "text/event-stream;q=2", SSE),
    (None, "application/x-ndjson", NDJSON),
    (None, "application/json", NDJSON),
    (None, "*/*", NDJSON),
    (None, "text/*", NDJSON),
    (None, ",,;;,", NDJSON),
]


@pytest.mark.parametrize(("format_param", "accept", "expected"), NEGOTIATE_TABLE)
def test_negotiate_format(
    format_param: str | None, accept: str | None, expected: StreamFormat
) -> None:
    assert negotiate_format(format_param, accept) is expected


@pytest.mark.parametrize(
    "format_param", ["SSE", "json", "ai_sdk", "AI-SDK", "ndjson ", "text/event-stream"]
)
def test_negotiate_format_rejects_unknown_formats(format_param: str) -> None:
    with pytest.raises(InvalidTurnInput) as info:
        negotiate_format(format_param, "text/event-stream")
    assert info.value.field == "format"


@given(st.text())
def test_negotiate_format_never_fails_on_accept(accept: str) -> None:
    assert negotiate_format(None, accept) in (NDJSON, SSE)


CURSOR_TABLE = [
    (None, None, 0),
    ("", None, 0),
    (None, "", 0),
    ("", "", 0),
    ("0", None, 0),
    (None, "0", 0),
    ("5", None, 5),
    (None, "7", 7),
    ("10", "10", 10),
    ("5", "12", 12),  # EventSource reconnecting to "?after=5" with a newer Last-Event-ID
    ("12", "5", 12),  # the larger wins either way
    ("0", "3", 3),
    ("9007199254740991", None, MAX_CURSOR),
    (None, "9007199254740991", MAX_CURSOR),
    # HTTP's optional whitespace (SP, HTAB) around the number is ignored in both sources.
    (" 5", None, 5),
    (None, "7 ", 7),
    ("\t5\t", " 7\t", 7),
    (" ", "\t", 0),
]


@pytest.mark.parametrize(("after", "last_event_id", "expected"), CURSOR_TABLE)
def test_parse_cursor(after: str | None, last_event_id: str | None, expected: int) -> None:
    assert parse_cursor(after, last_event_id) == expected


BAD_CURSORS = [
    "-1",
    "+1",
    "-0",
    "1\n",
    "\n1",
    "1\r\n",
    "\x0b1",  # whitespace to str.strip(), but not HTTP's optional whitespace
    "\u00a01",  # NO-BREAK SPACE: likewise
    "\u30001",  # IDEOGRAPHIC SPACE: likewise
    "1 2",
    "1_000",
    "01",
    "00",
    "1.0",
    "1e3",
    "0x10",
    "abc",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() and int() both accept it
    "\u00b2",  # SUPERSCRIPT TWO: str.isdigit() accepts it
    "\uff11",  # FULLWIDTH DIGIT ONE
    "9007199254740992",
    "99999999999999999999",
    "1" * 5000,  # beyond int()'s own digit limit
    " " * 5000 + "1" * 5000,  # stripped first, then refused by length
    "\x00",
]


@pytest.mark.parametrize("value", BAD_CURSORS)
def test_parse_cursor_rejects_after(value: str) -> None:
    with pytest.raises(InvalidTurnInput) as info:
        parse_cursor(value, None)
    assert info.value.field == "after"


@pytest.mark.parametrize("value", BAD_CURSORS)
def test_parse_cursor_rejects_last_event_id(value: str) -> None:
    with pytest.raises(InvalidTurnInput) as info:
        parse_cursor("3", value)  # a valid ?after= does not excuse a malformed header
    assert info.value.field == "Last-Event-ID"


@pytest.mark.parametrize(("value", "expected"), CURSOR_CASES, ids=repr)
def test_both_cursor_sources_follow_one_rule(value: str, expected: int | None) -> None:
    # The same table as the routes' test (tests/test_middleware.py): one rule, two sources.
    for after, last_event_id, field in ((value, None, "after"), (None, value, "Last-Event-ID")):
        if expected is None:
            with pytest.raises(InvalidTurnInput) as info:
                parse_cursor(after, last_event_id)
            assert info.value.field == field
        else:
            assert parse_cursor(after, last_event_id) == expected


def test_parse_cursor_names_after_first_when_both_are_bad() -> None:
    with pytest.raises(InvalidTurnInput) as info:
        parse_cursor("x", "y")
    assert info.value.field == "after"


def _check_cursor(after: str | None, last_event_id: str | None) -> None:
    try:
        cursor = parse_cursor(after, last_event_id)
    except InvalidTurnInput as exc:
        assert exc.field in ("after", "Last-Event-ID")
    else:
        assert type(cursor) is int
        assert 0 <= cursor <= MAX_CURSOR
        # Only the canonical form of a number is accepted, give or take HTTP's optional
        # whitespace around it.
        for value in (after, last_event_id):
            value = value.strip(" \t") if value else value
            assert not value or value == str(int(value))


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()))
def test_parse_cursor_fuzz_any_text(after: str | None, last_event_id: str | None) -> None:
    _check_cursor(after, last_event_id)


digitish = st.text(alphabet="0123456789+- \t\n\u0663\u00b2", max_size=20)


@given(st.one_of(st.none(), digitish), st.one_of(st.none(), digitish))
def test_parse_cursor_fuzz_digit_like_text(after: str | None, last_event_id: str | None) -> None:
    _check_cursor(after, last_event_id)


@given(
    st.integers(min_value=0, max_value=MAX_CURSOR), st.integers(min_value=0, max_value=MAX_CURSOR)
)
def test_parse_cursor_round_trips_every_seq(a: int, b: int) -> None:
    assert parse_cursor(str(a), None) == a
    assert parse_cursor(None, str(b)) == b
    assert parse_cursor(str(a), str(b)) == max(a, b)
