"""Attack: ``Supervisor(access="user")`` isolation with ids chosen to collide.

A run's key holds its user (``RunKey(tenant, execution_id, user_id)``, tag
``<quoted tenant>@<quoted user>/<execution id>``). Owner and intruder below differ in ways an
encoding could fold together: ``@``, ``/``, ``%``-escapes that spell the other id, case,
latin-1 vs UTF-8 bytes of the same letter; tenants holding ``@`` or ``/`` that could shift
the tenant/user boundary. For each pair, on the memory store and a real Redis, the intruder's
answers on every turn route are byte for byte an unknown id's, their cancel does nothing and
their POST is a fresh turn of their own. ``access="tenant"`` shares within a tenant and still
separates tenants that differ only by such characters.

The last test is the demo's AI SDK resume route, whose hint was per tenant and chat, not per
user: another user's newer turns of a chat id hid one's own (fixed; the test keeps it so).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from starlette.requests import Request

from tests._chat_app import chat_app
from tests._helpers import WordProducer
from turnstream import (
    MemoryStore,
    Principal,
    RedisStore,
    Supervisor,
)
from turnstream._demo import create_demo_app

VOLATILE_HEADERS = {"date", "server"}
WORDS = 30


def who(tenant: str | bytes, user: str | bytes) -> dict[str, str | bytes]:
    return {"X-Tenant": tenant, "X-User": user}


# (owner, intruder): each pair must be two principals (Starlette decodes headers as latin-1).
PAIRS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "a@b vs a": (who("t", "a@b"), who("t", "a")),
    "a vs a@b": (who("t", "a"), who("t", "a@b")),
    "a@b vs a%40b": (who("t", "a@b"), who("t", "a%40b")),
    "%40 vs @": (who("t", "%40"), who("t", "@")),
    "a/b vs a%2Fb": (who("t", "a/b"), who("t", "a%2Fb")),
    "a/b vs a": (who("t", "a/b"), who("t", "a")),
    "Ada vs ada": (who("t", "Ada"), who("t", "ada")),
    "a b vs a%20b": (who("t", "a b"), who("t", "a%20b")),
    "~ vs %7E": (who("t", "~"), who("t", "%7E")),
    "utf-8 vs latin-1 e-acute": (who("t", "caf\u00e9".encode()), who("t", b"caf\xe9")),
    "tenant x@y/user z vs tenant x/user y@z": (who("x@y", "z"), who("x", "y@z")),
    "tenant x/user y@z vs tenant x@y/user z": (who("x", "y@z"), who("x@y", "z")),
    "tenant x/y vs tenant x, user y/z": (who("x/y", "z"), who("x", "y/z")),
    "tenant x%40y vs tenant x@y": (who("x%40y", "z"), who("x@y", "z")),
}


def authorize(request: Request) -> Principal:
    return Principal(request.headers["x-tenant"], request.headers["x-user"])


class Env:
    def __init__(self, client: httpx.AsyncClient, producer: WordProducer, gate: asyncio.Event):
        self.client = client
        self.producer = producer
        self.gate = gate


def build_app(supervisor: Supervisor, producer: Callable[..., Any]) -> Any:
    return chat_app(supervisor, authorize, producer)


async def open_client(
    request: pytest.FixtureRequest, access: str
) -> AsyncIterator[tuple[httpx.AsyncClient, WordProducer]]:
    if request.param == "redis":
        store: Any = RedisStore.from_url(request.getfixturevalue("redis_server").url)
    else:
        store = MemoryStore()
    supervisor = Supervisor(store, access=access)  # type: ignore[arg-type]
    producer = WordProducer(WORDS, delay=0.02)  # ~0.6 s: long enough to probe it live
    app = build_app(supervisor, producer)
    try:
        async with supervisor:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield client, producer
    finally:
        if request.param == "redis":
            await store.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def user_app(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[httpx.AsyncClient, WordProducer]]:
    async for pair in open_client(request, "user"):
        yield pair


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def tenant_app(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[httpx.AsyncClient, WordProducer]]:
    async for pair in open_client(request, "tenant"):
        yield pair


def session() -> str:
    return f"atk-{uuid.uuid4().hex}"  # the Redis server is shared by the test session


def turn_url(execution_id: str, tail: str = "") -> str:
    return "/turns/" + quote(execution_id, safe="") + tail


def answer(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in VOLATILE_HEADERS}
    return response.status_code, response.content, headers


async def probe(
    client: httpx.AsyncClient, execution_id: str, headers: dict[str, Any]
) -> dict[str, tuple[int, bytes, dict[str, str]]]:
    requests = {
        "stream": client.get(turn_url(execution_id, "/stream"), headers=headers),
        "stream after": client.get(
            turn_url(execution_id, "/stream"), headers={**headers, "Last-Event-ID": "1"}
        ),
        "stream sse": client.get(
            turn_url(execution_id, "/stream"), headers={**headers, "Accept": "text/event-stream"}
        ),
        "head stream": client.head(turn_url(execution_id, "/stream"), headers=headers),
        "status": client.get(turn_url(execution_id), headers=headers),
        "head status": client.head(turn_url(execution_id), headers=headers),
        "cancel": client.post(turn_url(execution_id, "/cancel"), json={}, headers=headers),
    }
    return {name: answer(await asyncio.wait_for(r, timeout=3)) for name, r in requests.items()}


def events_of(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in content.splitlines()]


async def start_live(
    client: httpx.AsyncClient, headers: dict[str, Any], session_id: str
) -> asyncio.Task[httpx.Response]:
    body = {"sessionId": session_id, "turnIndex": 0, "message": "owner's secret"}
    task = asyncio.create_task(client.post("/chat", json=body, headers=headers))
    execution_id = f"chat:{session_id}:0"
    for _ in range(300):  # bounded: 3 s
        response = await client.get(turn_url(execution_id), headers=headers)
        if response.status_code == 200 and response.json()["lastSeq"] >= 2:
            return task  # usually still running; a stalled loop may have let it finish
        await asyncio.sleep(0.01)
    raise AssertionError("the owner's turn never went live")


@pytest.mark.parametrize("pair", list(PAIRS))
async def test_colliding_ids_never_see_each_others_turns(
    user_app: tuple[httpx.AsyncClient, WordProducer], pair: str
) -> None:
    client, producer = user_app
    owner, intruder = PAIRS[pair]
    session_id = session()
    execution_id = f"chat:{session_id}:0"
    unknown_id = f"chat:{session()}:0"

    owner_post = await start_live(client, owner, session_id)
    # Live: the intruder's answers are an unknown id's, byte for byte.
    live = await probe(client, execution_id, intruder)
    assert live == await probe(client, unknown_id, intruder)
    assert live["stream"][0] == 204 and live["status"][0] == 404 and live["cancel"][0] == 404
    first = await owner_post
    assert first.headers["x-turn-mode"] == "fresh"
    owner_events = events_of(first.content)
    assert owner_events[-1]["type"] == "session.run.completed"  # the intruder's cancel did nothing

    # Finished: the same.
    finished = await probe(client, execution_id, intruder)
    assert finished == await probe(client, unknown_id, intruder)
    # (the probe can tell: the owner's own answers are not an unknown id's)
    assert (await probe(client, execution_id, owner))["status"][0] == 200

    # The intruder's POST of the same turn is a fresh one of their own (and their input may
    # differ: no 409 telling them the turn exists).
    body = {"sessionId": session_id, "turnIndex": 0, "message": "intruder"}
    theirs = await client.post("/chat", json=body, headers=intruder)
    assert theirs.status_code == 200 and theirs.headers["x-turn-mode"] == "fresh"
    assert producer.calls == 2
    # ...and the owner still replays exactly their own log.
    again = await client.post("/chat", json={**body, "message": "owner's secret"}, headers=owner)
    assert again.headers["x-turn-mode"] == "replayed"
    assert again.content == first.content
    owner_stream = await client.get(turn_url(execution_id, "/stream"), headers=owner)
    assert owner_stream.content == first.content


async def test_tenant_access_shares_within_a_tenant_only(
    tenant_app: tuple[httpx.AsyncClient, WordProducer],
) -> None:
    client, producer = tenant_app
    session_id = session()
    execution_id = f"chat:{session_id}:0"
    body = {"sessionId": session_id, "turnIndex": 0, "message": "team"}
    first = await client.post("/chat", json=body, headers=who("x", "alice"))
    assert first.status_code == 200
    # A teammate replays it (the model is not asked again)...
    mate = await client.post("/chat", json=body, headers=who("x", "bob@x"))
    assert mate.headers["x-turn-mode"] == "replayed" and mate.content == first.content
    assert producer.calls == 1
    # ...while tenants spelled to collide with "x" see an unknown id.
    unknown_id = f"chat:{session()}:0"
    for tenant in ("x@bob", "x%40", "x/", "X", "x "):
        outsider = who(tenant, "alice")
        assert await probe(client, execution_id, outsider) == await probe(
            client, unknown_id, outsider
        ), tenant


async def test_a_user_run_is_invisible_to_a_tenant_run_spelled_alike() -> None:
    """One store, two supervisors: tenant ``t`` user ``u`` under access="user" is tag
    ``t@u/…``; tenant ``t@u`` under access="tenant" must not name it."""
    store = MemoryStore()
    producer = WordProducer(3)
    by_user = Supervisor(store, access="user")
    by_tenant = Supervisor(store, access="tenant")
    session_id = session()
    execution_id = f"chat:{session_id}:0"
    async with by_user, by_tenant:
        user_client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app(by_user, producer)), base_url="http://t"
        )
        tenant_client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app(by_tenant, producer)), base_url="http://t"
        )
        async with user_client, tenant_client:
            body = {"sessionId": session_id, "turnIndex": 0, "message": "m"}
            first = await user_client.post("/chat", json=body, headers=who("t", "u"))
            assert first.status_code == 200
            for tenant, user in (("t@u", "u"), ("t%40u", "u"), ("t", "u")):
                seen = await probe(tenant_client, execution_id, who(tenant, user))
                unknown = await probe(tenant_client, f"chat:{session()}:0", who(tenant, user))
                assert seen == unknown, (tenant, user)


# -- the demo's AI SDK resume route --------------------------------------------------------------


def ai_body(chat_id: str, user_messages: int) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for i in range(user_messages):
        if i:
            messages.append(
                {"id": f"a{i}", "role": "assistant", "parts": [{"type": "text", "text": "ok"}]}
            )
        messages.append({"id": f"u{i}", "role": "user", "parts": [{"type": "text", "text": "hi"}]})
    return {"id": chat_id, "messages": messages, "trigger": "submit-message", "messageId": None}


@pytest.fixture
async def demo() -> AsyncIterator[httpx.AsyncClient]:
    app = create_demo_app(tokens=3, token_delay_ms=0)
    async with app.state.supervisor:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            yield client


BOB = {"X-Demo-Tenant": "acme", "X-Demo-User": "bob"}
ALICE = {"X-Demo-Tenant": "acme", "X-Demo-User": "alice"}


async def test_ai_sdk_resume_finds_ones_own_turn(demo: httpx.AsyncClient) -> None:
    """The baseline the next test needs: bob alone resumes his own turn 0."""
    chat_id = session()
    posted = await demo.post("/api/chat", json=ai_body(chat_id, 1), headers=BOB)
    assert posted.status_code == 200
    resumed = await demo.get(f"/api/chat/{chat_id}/stream", headers=BOB)
    assert resumed.status_code == 200 and resumed.headers["x-turn-mode"] == "replayed"


async def test_ai_sdk_resume_does_not_depend_on_another_users_chat(
    demo: httpx.AsyncClient,
) -> None:
    chat_id = session()
    posted = await demo.post("/api/chat", json=ai_body(chat_id, 1), headers=BOB)
    assert posted.status_code == 200
    # alice, same tenant, happens to use the same chat id (a client-chosen id: she may guess
    # it, or probe for it) with a few turns more.
    other = await demo.post("/api/chat", json=ai_body(chat_id, 3), headers=ALICE)
    assert other.status_code == 200
    resumed = await demo.get(f"/api/chat/{chat_id}/stream", headers=BOB)
    assert resumed.status_code == 200, "bob lost his own turn to alice's hint"
    assert resumed.headers["x-turn-mode"] == "replayed"


DEMO_PAIRS = {
    "a@b vs a": ({"X-Demo-User": "a@b"}, {"X-Demo-User": "a"}),
    "%40 vs @": ({"X-Demo-User": "%40"}, {"X-Demo-User": "@"}),
    "a/b vs a%2Fb": ({"X-Demo-User": "a/b"}, {"X-Demo-User": "a%2Fb"}),
    "Guest vs guest (the default)": ({"X-Demo-User": "Guest"}, {}),
    "tenant d@x vs tenant d, user x@guest": (
        {"X-Demo-Tenant": "d@x", "X-Demo-User": "guest"},
        {"X-Demo-Tenant": "d", "X-Demo-User": "x@guest"},
    ),
}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def demo_store(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    options: dict[str, Any] = {"tokens": 20, "token_delay_ms": 20}
    if request.param == "redis":
        options["redis_url"] = request.getfixturevalue("redis_server").url
    app = create_demo_app(**options)
    try:
        async with app.state.supervisor:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
                yield client
    finally:
        if request.param == "redis":
            await app.state.store.aclose()


@pytest.mark.parametrize("pair", list(DEMO_PAIRS))
async def test_the_demo_keeps_colliding_users_apart(
    demo_store: httpx.AsyncClient, pair: str
) -> None:
    owner, intruder = DEMO_PAIRS[pair]
    session_id = session()
    execution_id = f"demo:{session_id}:0"
    body = {"sessionId": session_id, "turnIndex": 0, "message": "owner's secret"}
    owner_post = asyncio.create_task(demo_store.post("/chat", json=body, headers=owner))
    await asyncio.sleep(0.1)  # live: 20 words 20 ms apart
    live = await probe(demo_store, execution_id, intruder)
    assert live == await probe(demo_store, f"demo:{session()}:0", intruder)
    first = await owner_post
    assert events_of(first.content)[-1]["type"] == "session.run.completed"
    finished = await probe(demo_store, execution_id, intruder)
    assert finished == await probe(demo_store, f"demo:{session()}:0", intruder)
    theirs = await demo_store.post("/chat", json=body, headers=intruder)
    assert theirs.headers["x-turn-mode"] == "fresh"
