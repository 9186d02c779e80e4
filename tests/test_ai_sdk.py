"""The AI SDK UI message stream (``?format=ai-sdk``): the event → chunk mapping against tables
of exact wire bytes, and the demo's AI SDK transport routes in process.

The real `ai` package reads these streams in ``tests/js/ai_sdk.test.mjs``
(driven by ``tests/e2e/test_ai_sdk_node.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests._helpers import WordProducer, collect, ndjson
from turnstream import MemoryStore, Supervisor, TurnIdentity, handle_chat_turn
from turnstream._demo import create_demo_app, fake_reply
from turnstream._demo._ai_sdk import AiSdkChatRequest, LatestTurns, find_latest_turn
from turnstream._events import LoggedEvent
from turnstream._exceptions import InvalidTurnInput, PayloadTooLarge
from turnstream._framing import (
    AI_SDK_DONE,
    AiSdkFramer,
    AiSdkState,
    StreamFormat,
    ai_sdk_chunks,
    frame_ai_sdk_chunk,
    negotiate_format,
)
from turnstream._handler import stream_run
from turnstream._hooks import Limits
from turnstream._store import RunKey

TOKENS = 6
JSON = {"Content-Type": "application/json"}


def logged(seq: int, data: bytes) -> LoggedEvent:
    return LoggedEvent(seq=seq, event_id="e", type=orjson.loads(data)["type"], data=data)


STARTED = logged(
    1, b'{"type":"session.run.started","executionId":"p:s:0","attempt":1,"eventId":"ts:started"}'
)
HI = logged(2, b'{"type":"text-delta","delta":"Hi","eventId":"1.1"}')
THERE = logged(3, '{"type":"text-delta","delta":" th\u00e9re\\n\u2028","eventId":"1.2"}'.encode())
COMPLETED = logged(
    4,
    b'{"type":"session.run.completed","executionId":"p:s:0","attempt":1,"finalText":"Hi",'
    b'"eventId":"ts:terminal"}',
)
ERROR = logged(
    3,
    b'{"type":"error","code":"producer_failed","message":"boom","retryable":false,'
    b'"eventId":"ts:error"}',
)
FAILED = logged(4, b'{"type":"session.run.failed","executionId":"p:s:0","eventId":"ts:terminal"}')
CANCELLED = logged(
    2, b'{"type":"session.run.cancelled","finalText":"","eventId":"ts:terminal"}'
)
RESTARTED = logged(
    3, b'{"type":"session.run.restarted","executionId":"p:s:0","attempt":2,"eventId":"ts:r:2"}'
)
AGAIN = logged(4, b'{"type":"text-delta","delta":"Yo","eventId":"2.1"}')
TOOL = logged(3, b'{"type":"tool-call","args":{"a":[1,null]},"eventId":"1.2"}')
ODD_DELTA = logged(3, b'{"type":"text-delta","delta":7,"eventId":"1.2"}')

START_WIRE = b'data: {"type":"start","messageId":"p:s:0"}\n\ndata: {"type":"start-step"}\n\n'
HI_WIRE = (
    b'data: {"type":"text-start","id":"text-2"}\n\n'
    b'data: {"type":"text-delta","id":"text-2","delta":"Hi"}\n\n'
)
CLOSE_WIRE = b'data: {"type":"text-end","id":"text-2"}\n\ndata: {"type":"finish-step"}\n\n'

# Whole turns: the events of a log in order → the bytes of the response.
TURN_TABLE = [
    (
        "completed",
        [STARTED, HI, THERE, COMPLETED],
        START_WIRE
        + HI_WIRE
        + 'data: {"type":"text-delta","id":"text-2","delta":" th\u00e9re\\n\u2028"}\n\n'.encode()
        + CLOSE_WIRE
        + b'data: {"type":"finish","finishReason":"stop"}\n\n'
        + b"data: [DONE]\n\n",
    ),
    (
        "failed",
        [STARTED, HI, ERROR, FAILED],
        START_WIRE
        + HI_WIRE
        + b'data: {"type":"error","errorText":"boom"}\n\n'
        + CLOSE_WIRE
        + b'data: {"type":"finish","finishReason":"error"}\n\n'
        + b"data: [DONE]\n\n",
    ),
    (
        "cancelled before any text",
        [STARTED, CANCELLED],
        START_WIRE
        + b'data: {"type":"finish-step"}\n\n'
        + b'data: {"type":"abort","reason":"cancelled"}\n\n'
        + b"data: [DONE]\n\n",
    ),
    (
        "restarted: a new step, a new text part",
        [STARTED, HI, RESTARTED, AGAIN],
        START_WIRE
        + HI_WIRE
        + CLOSE_WIRE
        + b'data: {"type":"start-step"}\n\n'
        + b'data: {"type":"data-turnstream","data":{"seq":3,"type":"session.run.restarted",'
        b'"executionId":"p:s:0","attempt":2,"eventId":"ts:r:2"}}\n\n'
        + b'data: {"type":"text-start","id":"text-4"}\n\n'
        + b'data: {"type":"text-delta","id":"text-4","delta":"Yo"}\n\n',
    ),
    (
        "other events are data parts and keep the text part open",
        [STARTED, HI, TOOL],
        START_WIRE
        + HI_WIRE
        + b'data: {"type":"data-turnstream","data":{"seq":3,"type":"tool-call",'
        b'"args":{"a":[1,null]},"eventId":"1.2"}}\n\n',
    ),
    (
        "a text-delta without a string delta is not text",
        [STARTED, ODD_DELTA],
        START_WIRE
        + b'data: {"type":"data-turnstream","data":{"seq":3,"type":"text-delta","delta":7,'
        b'"eventId":"1.2"}}\n\n',
    ),
]


# The run was at attempt 2 when the stream began: attempt 1's events are left out.
HIDDEN_TABLE = [
    (
        "a superseded attempt is left out",
        [STARTED, HI, TOOL, RESTARTED, AGAIN, logged(5, COMPLETED.data)],
        START_WIRE
        + b'data: {"type":"finish-step"}\n\n'
        + b'data: {"type":"start-step"}\n\n'
        + b'data: {"type":"data-turnstream","data":{"seq":3,"type":"session.run.restarted",'
        b'"executionId":"p:s:0","attempt":2,"eventId":"ts:r:2"}}\n\n'
        + b'data: {"type":"text-start","id":"text-4"}\n\n'
        + b'data: {"type":"text-delta","id":"text-4","delta":"Yo"}\n\n'
        + b'data: {"type":"text-end","id":"text-4"}\n\n'
        + b'data: {"type":"finish-step"}\n\n'
        + b'data: {"type":"finish","finishReason":"stop"}\n\n'
        + b"data: [DONE]\n\n",
    ),
]


@pytest.mark.parametrize(
    ("events", "wire", "hidden_below"),
    [(*case[1:], 1) for case in TURN_TABLE] + [(*case[1:], 2) for case in HIDDEN_TABLE],
    ids=[case[0] for case in TURN_TABLE + HIDDEN_TABLE],
)
def test_framer_writes_exact_bytes(
    events: list[LoggedEvent], wire: bytes, hidden_below: int
) -> None:
    framer = AiSdkFramer(hidden_below=hidden_below)
    frames = [framer.frame(event) for event in events]
    assert b"".join(frames) == wire
    # Every frame ends on a frame boundary: a keep-alive may go between any two. (An event
    # of a superseded attempt has no frame at all.)
    assert all(frame.endswith(b"\n\n") for frame in frames if frame)


# One event at a time: (event, state before) → (chunks, state after).
CHUNK_TABLE = [
    (STARTED, AiSdkState(), [{"type": "start", "messageId": "p:s:0"}, {"type": "start-step"}],
     AiSdkState()),
    (HI, AiSdkState(), [{"type": "text-start", "id": "text-2"},
                        {"type": "text-delta", "id": "text-2", "delta": "Hi"}],
     AiSdkState(text_id="text-2")),
    (HI, AiSdkState(text_id="text-1"), [{"type": "text-delta", "id": "text-1", "delta": "Hi"}],
     AiSdkState(text_id="text-1")),
    (ERROR, AiSdkState(text_id="text-1"), [{"type": "error", "errorText": "boom"}],
     AiSdkState(text_id="text-1")),
    (logged(3, b'{"type":"error","code":"owner_lost","eventId":"x"}'), AiSdkState(),
     [{"type": "error", "errorText": "owner_lost"}], AiSdkState()),
    (logged(3, b'{"type":"error","eventId":"x"}'), AiSdkState(),
     [{"type": "error", "errorText": "error"}], AiSdkState()),
    (COMPLETED, AiSdkState(), [{"type": "finish-step"}, {"type": "finish", "finishReason": "stop"}],
     AiSdkState(done=True)),
    (FAILED, AiSdkState(text_id="t"), [{"type": "text-end", "id": "t"}, {"type": "finish-step"},
                                       {"type": "finish", "finishReason": "error"}],
     AiSdkState(done=True)),
    (CANCELLED, AiSdkState(text_id="t"), [{"type": "text-end", "id": "t"}, {"type": "finish-step"},
                                          {"type": "abort", "reason": "cancelled"}],
     AiSdkState(done=True)),
    (logged(1, b'{"type":"session.run.started","eventId":"x"}'), AiSdkState(),
     [{"type": "start"}, {"type": "start-step"}], AiSdkState()),
    (RESTARTED, AiSdkState(text_id="t", hidden_below=2),
     [{"type": "text-end", "id": "t"}, {"type": "finish-step"}, {"type": "start-step"},
      {"type": "data-turnstream", "data": orjson.loads(RESTARTED.to_json())}],
     AiSdkState(attempt=2, hidden_below=2)),
    # A restart without an attempt number is the next attempt.
    (logged(3, b'{"type":"session.run.restarted","eventId":"x"}'), AiSdkState(attempt=2),
     [{"type": "finish-step"}, {"type": "start-step"},
      {"type": "data-turnstream", "data": {"seq": 3, "type": "session.run.restarted",
                                           "eventId": "x"}}],
     AiSdkState(attempt=3)),
    # Superseded: nothing for text, errors or other events of an attempt below hidden_below…
    (HI, AiSdkState(hidden_below=2), [], AiSdkState(hidden_below=2)),
    (ERROR, AiSdkState(hidden_below=2), [], AiSdkState(hidden_below=2)),
    (TOOL, AiSdkState(hidden_below=2), [], AiSdkState(hidden_below=2)),
    # …but its ending still ends the stream, and the live attempt is shown.
    (FAILED, AiSdkState(hidden_below=2), [{"type": "finish-step"},
                                          {"type": "finish", "finishReason": "error"}],
     AiSdkState(done=True, hidden_below=2)),
    (HI, AiSdkState(attempt=2, hidden_below=2),
     [{"type": "text-start", "id": "text-2"}, {"type": "text-delta", "id": "text-2",
                                                "delta": "Hi"}],
     AiSdkState(text_id="text-2", attempt=2, hidden_below=2)),
]


@pytest.mark.parametrize(("event", "before", "chunks", "after"), CHUNK_TABLE)
def test_ai_sdk_chunks(
    event: LoggedEvent, before: AiSdkState, chunks: list[dict[str, Any]], after: AiSdkState
) -> None:
    assert ai_sdk_chunks(event, before) == (chunks, after)
    # Pure: the same input gives the same output, and a caller may change what it got.
    got, _ = ai_sdk_chunks(event, before)
    got.clear()
    assert ai_sdk_chunks(event, before) == (chunks, after)


async def test_a_restarted_turn_shows_the_live_attempt_only() -> None:
    # The supervisor test's fenced owner (tests/test_supervisor.py), read in ai-sdk format.
    store = MemoryStore()
    stale = WordProducer(words=5)
    stale.gate = anyio.Event()
    fresh = WordProducer(words=4)
    identity = TurnIdentity("t1", "proj", "s1", "u1", 0)
    key = RunKey("t1", "proj:s1:0", "u1")
    async with Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000) as a, Supervisor(
        store, lease_ms=2000
    ) as b:
        await handle_chat_turn(identity, {"m": 1}, supervisor=a, produce=stale)
        with anyio.fail_after(5):
            while (run := await store.get_run(key)) is None or run.last_seq < 3:
                await anyio.sleep(0.01)
        store.expire_lease(key)
        second = await handle_chat_turn(
            identity, {"m": 1}, supervisor=b, produce=fresh, format="ai-sdk"
        )
        assert second.mode == "restarted"
        chunks = chunks_of(await collect(second))
        stale.gate.set()
        replay = await handle_chat_turn(
            identity, {"m": 1}, supervisor=b, produce=fresh, format="ai-sdk"
        )
        assert chunks_of(await collect(replay)) == chunks
        ndjson_log = ndjson(await collect(
            await handle_chat_turn(identity, {"m": 1}, supervisor=b, produce=fresh)
        ))
    # The log holds both attempts; the AI SDK client is shown the live one's text only.
    assert "".join(e["delta"] for e in ndjson_log if e["type"] == "text-delta") == (
        "w0 w1 " + fresh.expected_text()
    )
    assert text_of(chunks) == fresh.expected_text()
    restart = [c for c in chunks if c["type"] == "data-turnstream"]
    assert [c["data"]["type"] for c in restart] == ["session.run.restarted"]
    assert restart[0]["data"]["attempt"] == 2
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}


async def test_a_dead_owner_is_an_error_chunk_without_done() -> None:
    # As tests/test_supervisor.py's reader of a dead owner, in ai-sdk format.
    store = MemoryStore()
    producer = WordProducer(words=5)
    producer.gate = anyio.Event()
    identity = TurnIdentity("t1", "proj", "s1", "u1", 0)
    dead = Supervisor(store, lease_ms=100, heartbeat_ms=10_000_000)
    await dead.start()
    await handle_chat_turn(identity, {"m": 1}, supervisor=dead, produce=producer)
    async with Supervisor(store, lease_ms=100) as reader_side:
        joined = stream_run(
            reader_side,
            RunKey("t1", "proj:s1:0", "u1"),
            fmt=StreamFormat.AI_SDK,
            after=7,
            mode="joined",
        )
        with anyio.fail_after(5):
            wire = await collect(joined)
    # Not whole: no [DONE], so the client knows to resume (or retry) the turn.
    assert not wire.endswith(AI_SDK_DONE)
    # The cursor was ignored: the whole turn, from its start.
    assert wire.startswith(b'data: {"type":"start","messageId":"proj:s1:0"}\n\n')
    assert b'"delta":"w0 "' in wire
    assert wire.endswith(
        b'data: {"type":"error","errorText":"the worker running this turn stopped; '
        b'retry the turn to restart it"}\n\n'
    )
    producer.gate.set()
    dead.shutdown_grace_s = 0
    await dead.aclose()


def test_chunk_frame_is_one_data_line() -> None:
    assert frame_ai_sdk_chunk({"type": "text-delta", "id": "t", "delta": "a\r\nb\x00"}) == (
        b'data: {"type":"text-delta","id":"t","delta":"a\\r\\nb\\u0000"}\n\n'
    )
    assert AI_SDK_DONE == b"data: [DONE]\n\n"


@given(st.lists(st.text(), max_size=8))
def test_text_round_trips(deltas: list[str]) -> None:
    framer = AiSdkFramer()
    events = [STARTED] + [
        logged(seq, orjson.dumps({"type": "text-delta", "delta": d, "eventId": str(seq)}))
        for seq, d in enumerate(deltas, start=2)
    ]
    wire = b"".join(framer.frame(e) for e in events)
    chunks = [orjson.loads(block[len(b"data: ") :]) for block in wire.split(b"\n\n")[:-1]]
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "".join(deltas)


def test_format_negotiation() -> None:
    assert negotiate_format("ai-sdk", None) is StreamFormat.AI_SDK
    assert negotiate_format("ai-sdk", "application/x-ndjson") is StreamFormat.AI_SDK
    # Only ever chosen by name: an Accept header means SSE.
    assert negotiate_format(None, "text/event-stream") is StreamFormat.SSE
    assert StreamFormat.AI_SDK.media_type == "text/event-stream"
    assert StreamFormat.AI_SDK.keepalive == b": ping\n\n"
    assert StreamFormat.AI_SDK.replays_whole_turn
    assert not StreamFormat.SSE.replays_whole_turn


# -- the demo, in process -----------------------------------------------------------------


def chunks_of(content: bytes) -> list[dict[str, Any]]:
    assert content.endswith(AI_SDK_DONE), content[-200:]
    blocks = content.split(b"\n\n")[:-2]
    assert all(block.startswith(b"data: ") for block in blocks)
    return [orjson.loads(block[len(b"data: ") :]) for block in blocks]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


def user(text: str, message_id: str = "u") -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"id": "a", "role": "assistant", "parts": [{"type": "text", "text": text}]}


def chat_body(
    messages: list[dict[str, Any]], chat_id: Any = "c1", trigger: Any = "submit-message"
) -> dict[str, Any]:
    return {"id": chat_id, "messages": messages, "trigger": trigger, "messageId": None}


async def make_client(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_demo_app(**options)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
            yield client
    finally:
        await app.state.supervisor.aclose()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for c in make_client(tokens=TOKENS, token_delay_ms=0):
        yield c


async def calls(client: httpx.AsyncClient, execution_id: str) -> int:
    response = await client.get("/debug/producer-calls", params={"executionId": execution_id})
    result: int = response.json()["calls"]
    return result


async def test_api_chat_streams_the_turn(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json=chat_body([user("hello there")]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["x-execution-id"] == "demo:c1:0"
    assert response.headers["x-turn-mode"] == "fresh"
    chunks = chunks_of(response.content)
    assert chunks[0] == {"type": "start", "messageId": "demo:c1:0"}
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"}
    assert text_of(chunks) == "".join(fake_reply("hello there", TOKENS))


async def test_a_retry_replays_and_turns_follow_user_messages(client: httpx.AsyncClient) -> None:
    first = await client.post("/api/chat", json=chat_body([user("one")]))
    # A regenerate sends the same user messages: the same turn, replayed, the model not asked.
    again = await client.post(
        "/api/chat", json=chat_body([user("one")], trigger="regenerate-message")
    )
    assert again.headers["x-turn-mode"] == "replayed"
    assert again.content == first.content
    assert await calls(client, "demo:c1:0") == 1
    # The next user message is the next turn; its input is the last user message.
    reply = "".join(fake_reply("one", TOKENS))
    second = await client.post(
        "/api/chat", json=chat_body([user("one"), assistant(reply), user("two", "u2")])
    )
    assert second.headers["x-execution-id"] == "demo:c1:1"
    assert text_of(chunks_of(second.content)) == "".join(fake_reply("two", TOKENS))
    # /chat is another door to the same turns.
    ndjson = await client.post(
        "/chat", json={"sessionId": "c1", "turnIndex": 1, "message": "two"}
    )
    assert ndjson.headers["x-turn-mode"] == "replayed"


async def test_the_cursor_is_ignored(client: httpx.AsyncClient) -> None:
    first = await client.post("/api/chat?after=3", json=chat_body([user("hello")]))
    assert chunks_of(first.content)[0]["type"] == "start"
    # On the generic routes too: ai-sdk replays the whole turn, whatever the cursor says.
    chat = await client.post(
        "/chat?format=ai-sdk&after=4", json={"sessionId": "c1", "turnIndex": 0, "message": "hello"}
    )
    assert chat.content == first.content
    resumed = await client.get(
        "/turns/" + quote("demo:c1:0", safe="") + "/stream?format=ai-sdk",
        headers={"Last-Event-ID": "5"},
    )
    assert resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert resumed.content == first.content


async def test_resume_replays_the_latest_turn(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/chat/c1/stream")).status_code == 204
    await client.post("/api/chat", json=chat_body([user("one")]))
    await client.post("/api/chat", json=chat_body([user("one"), assistant("x"), user("two")]))
    response = await client.get("/api/chat/c1/stream")
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["x-execution-id"] == "demo:c1:1"
    assert response.headers["x-turn-mode"] == "replayed"
    chunks = chunks_of(response.content)
    assert chunks[0] == {"type": "start", "messageId": "demo:c1:1"}
    assert text_of(chunks) == "".join(fake_reply("two", TOKENS))
    # Not yours: another tenant or another user gets nothing to resume.
    for other in ({"X-Demo-Tenant": "t2"}, {"X-Demo-User": "eve"}):
        assert (await client.get("/api/chat/c1/stream", headers=other)).status_code == 204
    assert (await client.get("/api/chat/c2/stream")).status_code == 204


async def test_resume_with_a_slash_in_the_chat_id(client: httpx.AsyncClient) -> None:
    await client.post("/api/chat", json=chat_body([user("one")], chat_id="a/b"))
    response = await client.get("/api/chat/" + quote("a/b", safe="") + "/stream")
    assert response.headers["x-execution-id"] == "demo:a%2Fb:0"


async def test_resume_joins_a_live_turn() -> None:
    async for client in make_client(tokens=100, token_delay_ms=5):
        post = asyncio.create_task(client.post("/api/chat", json=chat_body([user("live")])))
        for _ in range(500):
            status = await client.get("/turns/" + quote("demo:c1:0", safe=""))
            if status.status_code == 200 and status.json()["lastSeq"] >= 2:
                break
            await asyncio.sleep(0.01)
        resumed = await client.get("/api/chat/c1/stream")
        assert resumed.headers["x-turn-mode"] == "joined"
        posted = await post
        assert resumed.content == posted.content
        assert text_of(chunks_of(resumed.content)) == "".join(fake_reply("live", 100))


async def test_another_worker_finds_the_latest_turn() -> None:
    # Two demo apps on one store stand for two workers on one Redis: the resume route of a
    # worker that never saw the chat walks the store to its newest turn.
    store = MemoryStore()
    async for one in make_client(store=store, tokens=2, token_delay_ms=0):
        async for two in make_client(store=store, tokens=2, token_delay_ms=0):
            await one.post("/api/chat", json=chat_body([user("a")]))
            await one.post("/api/chat", json=chat_body([user("a"), user("b"), user("c")]))
            # Turns 0 and 2 only: the walk stops at the first gap above what it found.
            resumed = await two.get("/api/chat/c1/stream")
            assert resumed.headers["x-execution-id"] == "demo:c1:0"
            await one.post("/api/chat", json=chat_body([user("a"), user("b")]))
            resumed = await two.get("/api/chat/c1/stream")
            assert resumed.headers["x-execution-id"] == "demo:c1:2"


async def test_find_latest_turn_walks_from_the_hint() -> None:
    store = MemoryStore()
    async for client in make_client(store=store, tokens=1, token_delay_ms=0):
        for n in range(3):
            await client.post("/api/chat", json=chat_body([user(str(i)) for i in range(n + 1)]))
        found = await find_latest_turn(
            store, tenant_id="demo", project_id="demo", chat_id="c1", hint=1, user_id="guest"
        )
        assert found is not None and found[0] == 2
        assert found[1].key == RunKey("demo", "demo:c1:2", "guest")
        assert await find_latest_turn(
            store, tenant_id="demo", project_id="demo", chat_id="c1", hint=3, user_id="guest"
        ) is None
        assert await find_latest_turn(
            store, tenant_id="other", project_id="demo", chat_id="c1", hint=0, user_id="guest"
        ) is None
        assert await find_latest_turn(  # another user of the tenant: not theirs
            store, tenant_id="demo", project_id="demo", chat_id="c1", hint=0, user_id="bob"
        ) is None


def test_latest_turns_is_bounded() -> None:
    latest = LatestTurns(max_chats=2)
    latest.record("t", "a", 3)
    latest.record("t", "a", 1)  # never goes back
    assert latest.hint("t", "a") == 3
    latest.record("t", "b", 1)
    latest.record("t", "c", 1)
    assert latest.hint("t", "a") == 0
    assert latest.hint("u", "c") == 0


# -- bad requests ---------------------------------------------------------------------------

GOOD = [user("hi")]
BAD_BODIES = [
    ("not JSON", b"{", 400, "body"),
    ("not an object", b"[]", 400, "body"),
    ("no id", orjson.dumps({"messages": GOOD}), 400, "id"),
    ("empty id", orjson.dumps(chat_body(GOOD, chat_id="")), 400, "id"),
    ("numeric id", orjson.dumps(chat_body(GOOD, chat_id=7)), 400, "id"),
    ("control character in id", orjson.dumps(chat_body(GOOD, chat_id="a\nb")), 400, "sessionId"),
    ("unknown trigger", orjson.dumps(chat_body(GOOD, trigger="resume-stream")), 400, "trigger"),
    ("null trigger", orjson.dumps(chat_body(GOOD, trigger=None)), 400, "trigger"),
    ("no messages", orjson.dumps({"id": "c1"}), 400, "messages"),
    ("empty messages", orjson.dumps(chat_body([])), 400, "messages"),
    ("messages not an array", orjson.dumps({"id": "c1", "messages": {}}), 400, "messages"),
    ("a message not an object", orjson.dumps(chat_body(["hi"])), 400, "messages"),
    ("no role", orjson.dumps(chat_body([{"parts": []}])), 400, "messages"),
    ("last message not the user's", orjson.dumps(chat_body([*GOOD, assistant("x")])), 400,
     "messages"),
    ("no parts", orjson.dumps(chat_body([{"role": "user"}])), 400, "parts"),
    ("a part not an object", orjson.dumps(chat_body([{"role": "user", "parts": ["x"]}])), 400,
     "parts"),
    ("text not a string",
     orjson.dumps(chat_body([{"role": "user", "parts": [{"type": "text", "text": 1}]}])), 400,
     "parts"),
    ("no text parts",
     orjson.dumps(chat_body([{"role": "user", "parts": [{"type": "file", "url": "x"}]}])), 400,
     "messages"),
    ("blank text", orjson.dumps(chat_body([user("  \n")])), 400, "messages"),
    ("message too long", orjson.dumps(chat_body([user("m" * 100_001)])), 413, "message"),
    ("body too large", orjson.dumps(chat_body([user("m" * (1024 * 1024))])), 413, "body"),
]


@pytest.mark.parametrize(
    ("content", "status", "field"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_bad_bodies_are_problem_documents(
    client: httpx.AsyncClient, content: bytes, status: int, field: str
) -> None:
    response = await client.post("/api/chat", content=content, headers=JSON)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field
    assert (await client.get("/debug/producer-calls")).json()["total"] == 0


async def test_bad_requests_on_the_transport_routes(client: httpx.AsyncClient) -> None:
    wrong_type = await client.post(
        "/api/chat", content=orjson.dumps(chat_body(GOOD)), headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 400
    assert wrong_type.json()["field"] == "Content-Type"
    bad_tenant = await client.get("/api/chat/c1/stream", headers={"X-Demo-Tenant": ""})
    assert bad_tenant.status_code == 400
    assert (await client.get("/api/chat/" + quote("a\x01", safe="") + "/stream")).status_code == 400
    assert (await client.get("/api/chat")).status_code == 405
    assert (await client.post("/api/chat/c1/stream")).status_code == 405


def test_request_parsing() -> None:
    body = chat_body([user("a"), assistant("x"), {"role": "user", "parts": [
        {"type": "text", "text": "b"}, {"type": "file", "url": "u"}, {"type": "text", "text": "c"},
    ]}])
    assert AiSdkChatRequest.from_json(body) == AiSdkChatRequest("c1", 1, "b\nc")
    # The transport's other fields (messageId, the app's own body fields) are ignored.
    assert AiSdkChatRequest.from_json({"id": "c", "messages": GOOD, "extra": 1}).turn_index == 0
    with pytest.raises(PayloadTooLarge):
        AiSdkChatRequest.from_json(chat_body([user("abc")]), limits=Limits(max_message_chars=2))
    with pytest.raises(InvalidTurnInput):
        AiSdkChatRequest.from_json(None)
