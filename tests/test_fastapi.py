"""turnstream.fastapi: the ChatTurn dependency and the problem handler, on a tiny FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, Response

from tests._helpers import WordProducer, call_with_a_stalled_body, ndjson, text_of
from turnstream import (
    InvalidTurnInput,
    Limits,
    MemoryStore,
    Principal,
    Supervisor,
    TurnstreamError,
    TurnstreamMiddleware,
)
from turnstream.fastapi import ChatTurn, chat_turn, problem_handler


async def authorize(request: Request) -> Principal:  # async on purpose: both kinds work
    user = request.headers.get("x-user-id")
    if not user:
        raise InvalidTurnInput("send an X-User-Id header", field="X-User-Id")
    return Principal("acme", user)


def build_app(supervisor: Supervisor, producer: WordProducer, seen: list[ChatTurn]) -> FastAPI:
    app = FastAPI(exception_handlers={TurnstreamError: problem_handler})
    app.add_middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=authorize)
    # A default, not Annotated[...]: annotations are strings here, and FastAPI resolves them in
    # the module's globals, where a local name does not exist.
    turn_dependency = Depends(chat_turn(supervisor, authorize=authorize, project_id="proj"))

    @app.post("/chat")
    async def chat(turn: ChatTurn = turn_dependency) -> Response:
        seen.append(turn)
        return await turn.respond(produce=producer)

    @app.post("/chat-with-context")
    async def chat_with_context(turn: ChatTurn = turn_dependency) -> Response:
        return await turn.respond({**turn.input, "locale": "fr"}, produce=producer)

    return app


@pytest.fixture
async def env() -> AsyncIterator[tuple[httpx.AsyncClient, WordProducer, list[ChatTurn]]]:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000)
    producer = WordProducer(words=4)
    seen: list[ChatTurn] = []
    app = build_app(supervisor, producer, seen)
    async with supervisor, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers={"X-User-Id": "ada"},
    ) as client:
        yield client, producer, seen


BODY = {"sessionId": "s1", "turnIndex": 0, "message": "hi"}


async def test_a_route_gets_the_resolved_turn_and_streams_it(env: Any) -> None:
    client, producer, seen = env
    response = await client.post("/chat", json=BODY)
    assert response.status_code == 200
    assert response.headers["x-turn-mode"] == "fresh"
    assert response.headers["x-execution-id"] == "proj:s1:0"
    assert text_of(ndjson(response.content)) == producer.expected_text()
    (turn,) = seen
    assert turn.principal == Principal("acme", "ada")
    assert (turn.body.session_id, turn.body.turn_index, turn.body.message) == ("s1", 0, "hi")
    assert turn.identity.execution_id == "proj:s1:0"
    assert turn.identity.user_id == "ada"
    assert turn.input == {"message": "hi"}

    replay = await client.post("/chat", json=BODY)
    assert replay.headers["x-turn-mode"] == "replayed"
    assert replay.content == response.content
    assert producer.calls == 1


async def test_format_and_cursor_come_from_the_request(env: Any) -> None:
    client, _, _ = env
    await client.post("/chat", json=BODY)
    sse = await client.post("/chat?format=sse", json=BODY, headers={"Last-Event-ID": "3"})
    assert sse.headers["content-type"].startswith("text/event-stream")
    ids = [line for line in sse.text.splitlines() if line.startswith("id: ")]
    assert ids == ["id: 4", "id: 5", "id: 6"]


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b'{"sessionId": "s1", "turnIndex": 0}', {}, 400),
        (b"{oops", {}, 400),
        (b'{"sessionId": "s1", "turnIndex": 0, "message": "hi"}', {"X-User-Id": ""}, 400),
        (b"x" * (1024 * 1024 + 1), {}, 413),
    ],
)
async def test_bad_requests_are_problem_documents(
    env: Any, content: bytes, headers: dict[str, str], status: int
) -> None:
    client, producer, seen = env
    response = await client.post(
        "/chat", content=content, headers={"Content-Type": "application/json", **headers}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status
    assert seen == []
    assert producer.calls == 0


async def test_a_different_input_for_the_same_turn_is_409(env: Any) -> None:
    client, producer, _ = env
    assert (await client.post("/chat", json=BODY)).status_code == 200
    # Same body, but the route adds to the input: a different turn input, a conflict.
    conflict = await client.post("/chat-with-context", json=BODY)
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"
    assert producer.calls == 1


async def test_a_body_that_never_arrives_is_a_408() -> None:
    # The dependency reads with the supervisor's limits: their deadline ends the wait.
    supervisor = Supervisor(MemoryStore(), lease_ms=2000, limits=Limits(body_timeout_s=0.2))
    producer = WordProducer()
    seen: list[ChatTurn] = []
    app = build_app(supervisor, producer, seen)
    headers = ((b"content-type", b"application/json"), (b"x-user-id", b"ada"))
    async with supervisor:
        answer = await call_with_a_stalled_body(app, "/chat", headers=headers)
    assert answer.status == 408
    assert 0.15 < answer.seconds < 2, answer.seconds
    assert answer.headers["connection"] == "close"
    assert answer.json()["type"] == "https://turnstream.dev/problems/request-timeout"
    assert seen == []
    assert producer.calls == 0
