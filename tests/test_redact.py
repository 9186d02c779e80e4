"""``Supervisor(redact=Redact(…))``: a secret a producer emits reaches neither the store, nor a
client, nor the logs — a canary grepped for in Redis (``XRANGE``, ``HGETALL``), in every
response body and format, and in every captured log record."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests._helpers import ndjson
from turnstream import (
    MemoryStore,
    Principal,
    Redact,
    RedisStore,
    RunKey,
    SubstrateFailed,
    Supervisor,
    TurnCompletion,
    TurnContext,
    TurnHooks,
    TurnIdentity,
    TurnstreamMiddleware,
    handle_chat_turn,
)

SECRET = "sk-canary" + secrets.token_hex(12)
REDACT = Redact(keys=["api_key", "Authorization"], patterns=[r"sk-[A-Za-z0-9]{20,}"])


# -- the masking itself ------------------------------------------------------------------------


def test_keys_at_any_depth_case_insensitively_and_patterns_in_any_string() -> None:
    event = {
        "type": "tool-call",
        "input": {"API_KEY": "x", "nested": [{"authorization": ["Bearer y"]}, "see " + SECRET]},
        "delta": f"a {SECRET} b {SECRET}",
        "count": 3,
    }
    assert REDACT(event) == {
        "type": "tool-call",
        "input": {"API_KEY": "[redacted]", "nested": [{"authorization": "[redacted]"}, "see [redacted]"]},  # noqa: E501
        "delta": "a [redacted] b [redacted]",
        "count": 3,
    }
    assert event["delta"] == f"a {SECRET} b {SECRET}"  # the producer's own object is left alone


def test_an_event_with_nothing_to_mask_is_returned_as_it_is() -> None:
    event = {"type": "text-delta", "delta": "hello"}
    assert REDACT(event) is event


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "keys or patterns"),
        ({"keys": [""]}, "non-empty"),
        ({"patterns": [r"x*"]}, "empty string"),
        ({"patterns": [re.compile(r"(a|)")]}, "empty string"),
    ],
)
def test_a_redaction_that_could_not_work_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Redact(**kwargs)


# -- the canary, end to end ---------------------------------------------------------------------


async def produce(ctx: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
    key = ctx.input["api_key"]
    yield {"type": "text-delta", "delta": f"your key is {key}. "}
    yield {"type": "tool-call", "input": dict(ctx.input), "headers": {"Authorization": key}}
    half = len(key) // 2
    yield {"type": "text-delta", "delta": key[:half]}  # split: each half matches nothing
    yield {"type": "text-delta", "delta": key[half:]}
    if ctx.input["message"] == "fail":
        raise SubstrateFailed(f"the upstream said: bad key {key}", code="upstream")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    raw: redis_asyncio.Redis | None = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        store: Any = RedisStore.from_url(url)
        raw = redis_asyncio.Redis.from_url(url)
    else:
        store = MemoryStore()
    persisted: list[str] = []

    async def persist(completion: TurnCompletion, text: str) -> None:
        persisted.append(text)

    supervisor = Supervisor(
        store,
        lease_ms=2000,
        redact=REDACT,
        hooks=TurnHooks(persist_assistant_message=persist),
    )

    async def chat(request: Request) -> Response:
        body = await request.json()
        identity = TurnIdentity("acme", "chat", body["sessionId"], "ada", 0)
        result = await handle_chat_turn(
            identity, body["input"], supervisor=supervisor, produce=produce, request=request
        )
        return result.response

    app = TurnstreamMiddleware(
        Starlette(routes=[Route("/chat", chat, methods=["POST"])]),
        supervisor=supervisor,
        authorize=lambda request: Principal("acme", "ada"),
    )
    async with supervisor, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield {"client": client, "store": store, "raw": raw, "persisted": persisted}
    if raw is not None:
        await raw.aclose()
        await store.aclose()


async def everything_redis_holds(raw: redis_asyncio.Redis) -> bytes:
    dump = []
    async for key in raw.scan_iter(count=1000):
        kind = await raw.type(key)
        if kind == b"stream":
            dump.append(repr(await raw.xrange(key)))
        elif kind == b"hash":
            dump.append(repr(await raw.hgetall(key)))
        elif kind == b"zset":
            dump.append(repr(await raw.zrange(key, 0, -1, withscores=True)))
        else:
            dump.append(repr(await raw.dump(key)))
    return "\n".join(dump).encode()


@pytest.mark.parametrize("message", ["ok", "fail"])
async def test_the_canary_is_nowhere(
    env: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    client: httpx.AsyncClient = env["client"]
    turn = {"sessionId": f"s-{message}", "input": {"message": message, "api_key": SECRET}}
    with caplog.at_level(logging.DEBUG):
        first = await client.post("/chat", json=turn)
        assert first.headers["x-turn-mode"] == "fresh"
        # The input hash is the input's as given: the retry is the same turn, replayed.
        again = await client.post("/chat", json=turn)
        assert again.headers["x-turn-mode"] == "replayed"
        eid = first.headers["x-execution-id"]
        bodies = [first.content, again.content]
        for fmt in ("sse", "ai-sdk"):
            bodies.append((await client.get(f"/turns/{eid}/stream?format={fmt}")).content)
        bodies.append((await client.get(f"/turns/{eid}")).content)

    events = ndjson(first.content)
    assert [e["type"] for e in events][1:3] == ["text-delta", "tool-call"]
    assert events[1]["delta"] == "your key is [redacted]. "
    assert events[2]["input"] == {"message": message, "api_key": "[redacted]"}
    assert events[2]["headers"] == {"Authorization": "[redacted]"}
    terminal = events[-1]
    if message == "fail":
        assert events[-2]["message"] == "the upstream said: bad key [redacted]"
    # Split across two deltas, the secret is in no event by itself (the documented limit), but
    # joined up it is masked in the final text: the checkpoint, the terminal, the hook.
    assert terminal["finalText"].endswith("[redacted]")
    half = len(SECRET) // 2
    leaked_halves = [SECRET[:half].encode(), SECRET[half:].encode()]
    stored = b""
    if env["raw"] is not None:
        stored = await everything_redis_holds(env["raw"])
    else:
        store: MemoryStore = env["store"]
        record = await store.get_run(store_key(eid))
        assert record is not None
        stored = repr([record, await store.read(store_key(eid), limit=100)]).encode()
    for where, data in [("store", stored), *((f"body {i}", b) for i, b in enumerate(bodies))]:
        assert SECRET.encode() not in data, where
    assert caplog.records  # something was logged (the failure, at least at debug level)
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    await wait_for(lambda: bool(env["persisted"]))
    assert all(SECRET not in text and text.endswith("[redacted]") for text in env["persisted"])
    assert any(h in stored for h in leaked_halves)  # the halves are logged: it is a real limit


def store_key(execution_id: str) -> RunKey:
    return RunKey("acme", execution_id, "ada")


async def wait_for(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.01)
