"""Fuzzing the demo's routes in process: malformed bodies, ids, cursors, formats and headers.

Whatever arrives, the answer is never a 5xx, and every 4xx is an RFC 9457 problem document
whose ``status`` repeats the HTTP status. One demo app (memory store, 2-word replies, no
delay) serves every example of the module on one event loop (an ``asyncio.Runner``), so the
examples run fast enough to try thousands; ``derandomize`` keeps CI runs reproducible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from turnstream._demo import create_demo_app
from turnstream._identity import derive_execution_id, parse_execution_id

FUZZ = settings(
    max_examples=700,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Harness:
    """One demo app and client on a loop of its own, driven from synchronous tests."""

    def __init__(self, redis_url: str | None = None) -> None:
        self.runner = asyncio.Runner()
        self.app = create_demo_app(tokens=2, token_delay_ms=0, redis_url=redis_url)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://demo.test"
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        return self.runner.run(
            self.client.request(method, path, content=content, headers=headers, params=params)
        )

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.run(self.app.state.supervisor.aclose())
        self.runner.run(self.app.state.store.aclose())
        self.runner.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(scope="module")
def redis_demo(redis_server: Any) -> Iterator[Harness]:
    # A database of its own on the session's throwaway server: fuzzed session ids ("s1"…)
    # must not meet the runs of other tests.
    harness = Harness(redis_url=redis_server.url.rsplit("/", 1)[0] + "/7")
    try:
        yield harness
    finally:
        harness.close()


def assert_no_5xx(response: httpx.Response, *, ours: bool = True) -> None:
    """No 5xx; a 4xx on a route turnstream owns is a problem document naming its status."""
    assert response.status_code < 500, (response.status_code, response.content[:500])
    if currently_in_test_context():
        event(f"HTTP {response.status_code}")
    if 400 <= response.status_code < 500 and ours:
        media = response.headers.get("content-type", "").split(";")[0].strip()
        assert media == "application/problem+json", (response.status_code, response.content)
        assert response.headers["cache-control"] == "no-store"
        if response.request.method == "HEAD":
            return  # the same headers as GET, no body
        document = orjson.loads(response.content)
        assert document["status"] == response.status_code
        assert isinstance(document["title"], str) and isinstance(document["type"], str)


# -- strategies -----------------------------------------------------------------------------

# Every code point, lone surrogates included (JSON can spell them as \ud800 escapes).
any_text = st.text(st.characters(codec=None), max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
# Values of the right shape and the wrong one for each field.
field_values = (
    json_values
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([0, 1, 2**53 - 1, 2**53, -1, True, False, 1.0, "0", "", " ", "\x00"])
    | st.text(min_size=1, max_size=300)
)
chat_objects = st.fixed_dictionaries(
    {},
    optional={
        "sessionId": field_values,
        "turnIndex": field_values,
        "message": field_values,
        "extra": json_values,
    },
)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # a lone surrogate: spell it as JSON does, with \u escapes
        import json

        return json.dumps(value).encode()


def _deep(depth: int) -> bytes:
    return b'{"sessionId":' * depth + b"1" + b"}" * depth


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(_dumps),
    chat_objects.map(_dumps),
    st.integers(min_value=1, max_value=5000).map(_deep),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from(
        [
            b"",
            b"\x00",
            b'{"sessionId":"s","turnIndex":0,"message":"hi\x00"}',
            b'{"sessionId":"s\\u0000","turnIndex":0,"message":"hi"}',
            b'{"sessionId":"\\ud800","turnIndex":0,"message":"hi"}',
            b'{"sessionId":"s","turnIndex":0,"message":"\\udfff"}',
            b'{"sessionId":"s","turnIndex":1e400,"message":"hi"}',
            b'{"sessionId":"s","turnIndex":123456789012345678901234567890,"message":"hi"}',
            b'{"sessionId":"s","turnIndex":-0,"message":"hi"}',
            b'{"sessionId":"s","turnIndex":0.0,"message":"hi"}',
            b'{"sessionId":"s","turnIndex":0,"message":"hi"',
            b"\xef\xbb\xbf{}",
            b"NaN",
            b'{"a":1,"a":2}',
        ]
    ),
)
# Rarer, and costly to build: kept out of `bodies` so the turn routes do not pay for them.
oversized = st.sampled_from(
    [
        b'{"sessionId":"s","turnIndex":0,"message":"' + b"m" * 100_001 + b'"}',
        b'{"sessionId":"s","turnIndex":0,"message":"' + b"m" * 100_000 + b'"}',
        b" " * (1024 * 1024 + 1),
        b'{"sessionId":"s","turnIndex":0,"message":"hi","pad":"' + b"p" * (1024 * 1024) + b'"}',
    ]
)

header_junk = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b" ", b"\x00", b"\x7f", b"a" * 256, b"a" * 257, b"\xff\xfe", b"%00"]),
)

# Text an execution id might be made of: separators, escapes, braces, control characters.
id_alphabet = st.sampled_from(
    list("abz09:%{}-._~!$&'()*+,;=@ \t\x00\x1f\x7f\u00e9\u2028\U0001f600")
)
raw_ids = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=60),
    st.text(id_alphabet, max_size=60),
    st.builds(
        lambda a, b, n: f"{a}:{b}:{n}",
        st.text(id_alphabet, max_size=10),
        st.text(id_alphabet, max_size=10),
        st.text("0123456789-+ ", max_size=25),
    ),
    st.sampled_from(
        [
            "demo:s:0",
            "demo:s:00",
            "demo:s:-1",
            "demo:s:9007199254740992",
            "demo:%3A:0",
            "demo:%3a:0",
            "demo:%ZZ:0",
            "demo:%c3%28:0",
            "demo:%:0",
            "demo:%2:0",
            ":s:0",
            "demo::0",
            "demo:s:",
            "demo:s:0:0",
            "demo:{s}:0",
            "demo:s:\u0661",
            "demo:%00:0",
            "demo:%7B:0",
            "x" * 5000,
            "demo:" + "a" * 257 + ":0",
            "demo:" + "%25" * 300 + ":0",
        ]
    ),
)
# Well-formed ids of runs that (mostly) do not exist: these get past the id check.
valid_ids = st.builds(
    lambda session, turn: derive_execution_id("demo", session, turn),
    st.text(
        st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters="\x7f"),
        min_size=1,
        max_size=30,
    ),
    st.integers(min_value=0, max_value=2**53 - 1),
)
raw_ids = st.one_of(raw_ids, valid_ids, valid_ids)
# Whatever the id is, it is sent as one path segment (`/` and dot segments would make it
# another route, which is the app's and not turnstream's).
ids = raw_ids.filter(lambda s: "/" not in s and s not in (".", ".."))

cursor_text = st.one_of(
    st.text(max_size=30),
    st.text("0123456789", max_size=30),
    st.sampled_from(
        [
            "0",
            "00",
            "01",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "\u0661",
            "9007199254740991",
            "9007199254740992",
            "9" * 5000,
            "0x10",
        ]
    ),
)
formats = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.sampled_from(["ndjson", "sse", "ai-sdk", "SSE", "ndjson ", "", "json"]),
)
accepts = st.one_of(
    st.none(),
    header_junk,
    st.sampled_from(
        [
            b"text/event-stream",
            b"text/event-stream;q=0",
            b"text/event-stream;q=abc, */*",
            b"application/x-ndjson;q=2",
            b";;,,;q=",
            b"*/*",
        ]
    ),
)
optional_junk = st.one_of(st.none(), header_junk)


def _headers(**values: bytes | None) -> list[tuple[bytes, bytes]]:
    names = {
        "tenant": b"X-Demo-Tenant",
        "user": b"X-Demo-User",
        "accept": b"Accept",
        "last_event_id": b"Last-Event-ID",
        "content_type": b"Content-Type",
    }
    return [(names[k], v) for k, v in values.items() if v is not None]


def _path(execution_id: str, tail: str = "") -> str:
    return "/turns/" + quote(execution_id, safe="", errors="surrogatepass") + tail


# -- the routes -----------------------------------------------------------------------------


@FUZZ
@given(
    body=st.one_of(bodies, oversized),
    content_length=st.one_of(
        st.none(),
        st.none(),
        st.none(),
        header_junk,
        st.sampled_from(
            [b"-1", b"1e3", b" 5", b"99999999999999999999999", b"\xd9\xa3", b"1048577", b"0", b"+3"]
        ),
    ),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(
            [
                b"application/json",
                b"application/problem+json",
                b"text/plain",
                b"APPLICATION/JSON;x",
                b"",
                b"\x00",
            ]
        ),
        header_junk,
    ),
    tenant=optional_junk,
    user=optional_junk,
    fmt=formats,
    accept=accepts,
    after=st.one_of(st.none(), cursor_text),
)
def test_chat_route_never_fails(
    demo: Harness,
    body: bytes,
    content_type: bytes | None,
    tenant: bytes | None,
    user: bytes | None,
    fmt: str | None,
    accept: bytes | None,
    after: str | None,
    content_length: bytes | None,
) -> None:
    params = {k: v for k, v in {"format": fmt, "after": after}.items() if v is not None}
    headers = _headers(tenant=tenant, user=user, accept=accept, content_type=content_type)
    if content_length is not None:
        headers.append((b"Content-Length", content_length))
    response = demo.request("POST", "/chat", content=body, headers=headers, params=params)
    assert_no_5xx(response)


PLAUSIBLE = {
    "session": st.text(max_size=300) | any_text,
    "turn": st.integers(min_value=-5, max_value=2**60),
    "message": st.text(max_size=50) | any_text,
    "tenant": optional_junk,
    "fmt": st.sampled_from([None, "ndjson", "sse"]),
}


@FUZZ
@given(**PLAUSIBLE)
def test_chat_route_with_plausible_bodies(
    demo: Harness,
    session: str,
    turn: int,
    message: str,
    tenant: bytes | None,
    fmt: str | None,
) -> None:
    check_plausible_body(demo, session, turn, message, tenant, fmt)


@pytest.mark.redis
@settings(FUZZ, max_examples=150)
@given(**PLAUSIBLE)
def test_chat_route_with_plausible_bodies_on_redis(
    redis_demo: Harness,
    session: str,
    turn: int,
    message: str,
    tenant: bytes | None,
    fmt: str | None,
) -> None:
    check_plausible_body(redis_demo, session, turn, message, tenant, fmt)


def check_plausible_body(
    demo: Harness, session: str, turn: int, message: str, tenant: bytes | None, fmt: str | None
) -> None:
    # Mostly well-formed bodies: many of these start real turns, so this also fuzzes the
    # identity (percent-encoding, lengths, control characters) and the stream itself.
    body = _dumps({"sessionId": session, "turnIndex": turn, "message": message})
    params = {"format": fmt} if fmt else None
    response = demo.request(
        "POST",
        "/chat",
        content=body,
        headers=_headers(tenant=tenant, content_type=None),
        params=params,
    )
    assert_no_5xx(response)
    if response.status_code == 200:
        assert response.headers["x-execution-id"]
        assert response.headers["x-turn-mode"] in ("fresh", "replayed", "joined")


@FUZZ
@given(
    execution_id=ids,
    route=st.sampled_from(["stream", "cancel", "status"]),
    # None: the route's own method (most examples), so the junk reaches past the 405.
    method=st.one_of(
        st.none(),
        st.none(),
        st.none(),
        st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH"]),
    ),
    last_event_id=st.one_of(
        st.none(), cursor_text.map(lambda s: s.encode("utf-8", "surrogatepass")), header_junk
    ),
    after=st.one_of(st.none(), cursor_text),
    fmt=formats,
    accept=accepts,
    tenant=optional_junk,
    user=optional_junk,
    content_type=st.one_of(st.none(), st.just(b"application/json"), header_junk),
    body=st.one_of(st.none(), bodies),
)
def test_turn_routes_never_fail(
    demo: Harness,
    execution_id: str,
    route: str,
    method: str | None,
    last_event_id: bytes | None,
    after: str | None,
    fmt: str | None,
    accept: bytes | None,
    tenant: bytes | None,
    user: bytes | None,
    content_type: bytes | None,
    body: bytes | None,
) -> None:
    tail = {"stream": "/stream", "cancel": "/cancel", "status": ""}[route]
    if method is None:
        method = "POST" if route == "cancel" else "GET"
    params = {k: v for k, v in {"format": fmt, "after": after}.items() if v is not None}
    headers = _headers(
        tenant=tenant,
        user=user,
        accept=accept,
        last_event_id=last_event_id,
        content_type=content_type,
    )
    response = demo.request(
        method, _path(execution_id, tail), content=body, headers=headers, params=params
    )
    assert_no_5xx(response)
    assert response.status_code in (200, 202, 204, 400, 403, 404, 405, 413, 415), response


REAL_TURN = {
    "suffix": st.sampled_from(["", "/stream", "/cancel"]),
    "last_event_id": st.one_of(st.none(), header_junk),
    "after": st.one_of(st.none(), cursor_text),
    "fmt": formats,
    "tenant": optional_junk,
    "user": optional_junk,
}


@FUZZ
@given(**REAL_TURN)
def test_turn_routes_on_a_real_turn(
    demo: Harness,
    suffix: str,
    last_event_id: bytes | None,
    after: str | None,
    fmt: str | None,
    tenant: bytes | None,
    user: bytes | None,
) -> None:
    check_real_turn(demo, suffix, last_event_id, after, fmt, tenant, user)


@pytest.mark.redis
@settings(FUZZ, max_examples=150)
@given(**REAL_TURN)
def test_turn_routes_on_a_real_turn_on_redis(
    redis_demo: Harness,
    suffix: str,
    last_event_id: bytes | None,
    after: str | None,
    fmt: str | None,
    tenant: bytes | None,
    user: bytes | None,
) -> None:
    check_real_turn(redis_demo, suffix, last_event_id, after, fmt, tenant, user)


def check_real_turn(
    demo: Harness,
    suffix: str,
    last_event_id: bytes | None,
    after: str | None,
    fmt: str | None,
    tenant: bytes | None,
    user: bytes | None,
) -> None:
    # A real, finished turn: the junk is in the cursors and headers, not the id.
    started = demo.request(
        "POST",
        "/chat",
        content=b'{"sessionId":"fz","turnIndex":0,"message":"hello"}',
        headers=_headers(content_type=b"application/json"),
    )
    assert started.status_code == 200
    execution_id = started.headers["x-execution-id"]
    params = {k: v for k, v in {"format": fmt, "after": after}.items() if v is not None}
    headers = _headers(
        tenant=tenant, user=user, last_event_id=last_event_id, content_type=b"application/json"
    )
    method = "POST" if suffix == "/cancel" else "GET"
    response = demo.request(
        method, _path(execution_id, suffix), content=b"{}", headers=headers, params=params
    )
    assert_no_5xx(response)


@pytest.mark.parametrize(
    ("content_length", "status"),
    [
        # Over int()'s 4300-digit limit: once a ValueError from int() and so a 500.
        (b"9" * 4301, 413),
        (b"9" * 100_000, 413),
        (b"0" * 5000 + b"2", 413),  # 2 bytes, but a 47-byte body
        (b"0" * 5000 + b"47", 200),  # leading zeros are legal in Content-Length
        (b"1048577", 413),
    ],
    ids=["4301 nines", "100k nines", "zeros then 2", "zeros then 47", "max + 1"],
)
def test_content_length_is_judged_without_int_overflow(
    demo: Harness, content_length: bytes, status: int
) -> None:
    body = b'{"sessionId":"cl","turnIndex":0,"message":"hi"}'
    assert len(body) == 47
    response = demo.request(
        "POST",
        "/chat",
        content=body,
        headers=[(b"Content-Type", b"application/json"), (b"Content-Length", content_length)],
    )
    assert_no_5xx(response)
    if content_length == b"0" * 5000 + b"2":
        # The declared length is not checked against the body (the server frames the body);
        # what matters is that the value itself is handled: the body is then read whole.
        assert response.status_code in (200, 413)
    else:
        assert response.status_code == status, response.text


@FUZZ
@given(
    project=st.text(st.characters(codec="utf-8", min_codepoint=0x20), min_size=1, max_size=256),
    session=st.text(st.characters(codec="utf-8", min_codepoint=0x20), min_size=1, max_size=256),
    turn=st.integers(min_value=0, max_value=2**53 - 1),
)
@example(project="\U0010fffd" * 256, session="\U0001f600" * 256, turn=2**53 - 1)
def test_every_derivable_execution_id_parses(project: str, session: str, turn: int) -> None:
    # Once, ids over 1568 characters were refused: 256 code points of 4 UTF-8 bytes each
    # encode to 3072 characters per component.
    project, session = project.replace("\x7f", "x"), session.replace("\x7f", "x")
    execution_id = derive_execution_id(project, session, turn)
    assert parse_execution_id(execution_id) == (project, session, turn)


@pytest.mark.parametrize("session", ["\U0001f600" * 256, "\U0010fffd" * 256, "é" * 256])
def test_the_longest_session_ids_reach_their_turn_routes(demo: Harness, session: str) -> None:
    started = demo.request(
        "POST",
        "/chat",
        content=_dumps({"sessionId": session, "turnIndex": 2**53 - 1, "message": "hi"}),
        headers=_headers(content_type=b"application/json"),
    )
    assert started.status_code == 200, started.text
    execution_id = started.headers["x-execution-id"]
    assert parse_execution_id(execution_id) == ("demo", session, 2**53 - 1)
    status = demo.request("GET", _path(execution_id))
    assert status.status_code == 200, status.text
    assert status.json()["status"] == "completed"
    replay = demo.request("GET", _path(execution_id, "/stream"))
    assert replay.status_code == 200
    assert replay.content == started.content
    cancel = demo.request(
        "POST",
        _path(execution_id, "/cancel"),
        content=b"{}",
        headers=_headers(content_type=b"application/json"),
    )
    assert cancel.status_code == 202
