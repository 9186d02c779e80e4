"""``authorize`` can say no: 401 / 403 problem documents on every surface, 500 for its bugs.

One parametrised ``authorize`` behaves as the ``X-Auth`` header says (returns a Principal,
raises Unauthorized / Forbidden / PermissionError / KeyError, returns garbage…), sync or
async, and every route that calls it is asked: the middleware's turn routes, a Starlette chat
route using ``authorize_request``, the FastAPI dependency, and a Django view.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Depends, FastAPI
from fastapi import Request as FastAPIRequest
from starlette.responses import Response

from tests._chat_app import chat_app
from tests._helpers import WordProducer, ndjson
from turnstream import (
    Forbidden,
    MemoryStore,
    Principal,
    Supervisor,
    TurnstreamError,
    TurnstreamMiddleware,
    Unauthorized,
    authorize_request,
    problem_for_exception,
)
from turnstream.fastapi import ChatTurn, chat_turn, problem_handler

TURN = {"sessionId": "s1", "turnIndex": 0, "message": "hi"}
BEHAVIOURS: dict[str, Callable[[], Any]] = {}


def behaviour(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        BEHAVIOURS[name] = fn
        return fn

    return register


@behaviour("ok")
def _ok() -> Any:
    return Principal("acme", "ada")


@behaviour("unauthorized")
def _unauthorized() -> Any:
    raise Unauthorized("sign in first", www_authenticate='Bearer realm="chat"')


@behaviour("unauthorized-bare")
def _unauthorized_bare() -> Any:
    raise Unauthorized()


@behaviour("forbidden")
def _forbidden() -> Any:
    raise Forbidden("read-only seat")


@behaviour("permission-error")
def _permission_error() -> Any:
    raise PermissionError("not in this tenant")


@behaviour("bug")
def _bug() -> Any:
    return {}["x-user-id"]  # the quick start's old KeyError on a missing header


@behaviour("not-a-principal")
def _not_a_principal() -> Any:
    return {"tenant_id": "acme", "user_id": "ada"}


@behaviour("empty-user")
def _empty_user() -> Any:
    return Principal("acme", "")


@behaviour("control-char-tenant")
def _control_char_tenant() -> Any:
    return Principal("ac\nme", "ada")


EXPECTED: dict[str, tuple[int, str | None]] = {
    "unauthorized": (401, "sign in first"),
    "unauthorized-bare": (401, None),
    "forbidden": (403, "read-only seat"),
    "permission-error": (403, "not in this tenant"),
    "bug": (500, None),
    "not-a-principal": (500, None),
    "empty-user": (500, None),
    "control-char-tenant": (500, None),
}
INTERNAL = "The turn could not be started because of an internal error."


def sync_authorize(request: Any) -> Principal:
    result: Principal = BEHAVIOURS[request.headers.get("x-auth", "ok")]()
    return result


async def async_authorize(request: Any) -> Principal:
    return sync_authorize(request)


def starlette_app(supervisor: Supervisor, authorize: Any, producer: WordProducer) -> Any:
    return chat_app(supervisor, authorize, producer)


def fastapi_app(supervisor: Supervisor, authorize: Any, producer: WordProducer) -> Any:
    app = FastAPI(exception_handlers={TurnstreamError: problem_handler})
    app.add_middleware(TurnstreamMiddleware, supervisor=supervisor, authorize=authorize)
    dependency = Depends(chat_turn(supervisor, authorize=authorize))

    @app.post("/chat")
    async def chat(request: FastAPIRequest, turn: ChatTurn = dependency) -> Response:
        return await turn.respond(produce=producer)

    return app


APPS = {"starlette": starlette_app, "fastapi": fastapi_app}
AUTHORIZERS = {"sync": sync_authorize, "async": async_authorize}


@pytest.fixture(params=sorted(APPS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=sorted(AUTHORIZERS))
async def client(
    request: pytest.FixtureRequest, framework: str
) -> AsyncIterator[httpx.AsyncClient]:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000)
    app = APPS[framework](supervisor, AUTHORIZERS[request.param], WordProducer(words=3))
    async with supervisor, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://test",
    ) as http:
        yield http


def assert_problem(response: httpx.Response, status: int, detail: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    document = orjson.loads(response.content)
    assert document["status"] == status
    slug = {401: "unauthorized", 403: "forbidden", 500: "internal-error"}[status]
    assert document["type"] == f"https://turnstream.dev/problems/{slug}"
    if status == 500:
        assert document["detail"] == INTERNAL  # nothing of the app's bug reaches the client
    else:
        assert document.get("detail") == detail


ROUTES = [
    ("POST", "/chat", TURN),
    ("GET", "/turns/chat:s1:0", None),
    ("GET", "/turns/chat:s1:0/stream", None),
    ("POST", "/turns/chat:s1:0/cancel", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("how", sorted(EXPECTED))
async def test_a_rejection_or_a_bug_of_authorize_is_a_problem_document(
    client: httpx.AsyncClient,
    how: str,
    method: str,
    path: str,
    body: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The turn exists, so a 404/204 could not hide a missing check.
    assert (await client.post("/chat", json=TURN)).status_code == 200
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="turnstream.authorize"):
        response = await client.request(method, path, json=body, headers={"X-Auth": how})
    status, detail = EXPECTED[how]
    assert_problem(response, status, detail)
    if how == "unauthorized":
        assert response.headers["www-authenticate"] == 'Bearer realm="chat"'
    else:
        assert "www-authenticate" not in response.headers
    # A rejection is the app's answer, not an error; a bug is logged with what went wrong.
    logged = [r for r in caplog.records if r.name == "turnstream.authorize"]
    if status == 500:
        assert len(logged) == 1
        assert logged[0].exc_info is not None or "Principal" in logged[0].getMessage()
    else:
        assert logged == []


async def test_an_accepted_caller_gets_the_turn(client: httpx.AsyncClient) -> None:
    first = await client.post("/chat", json=TURN)
    assert first.status_code == 200
    assert ndjson(first.content)[-1]["type"] == "session.run.completed"
    status = await client.get("/turns/chat:s1:0")
    assert status.json()["status"] == "completed"


def test_forbidden_is_a_permission_error_and_both_are_turnstream_terms() -> None:
    assert issubclass(Forbidden, PermissionError)
    assert issubclass(Forbidden, TurnstreamError)
    assert issubclass(Unauthorized, TurnstreamError)
    assert problem_for_exception(Forbidden()).status_code == 403
    # A PermissionError from somewhere else (a file the app could not open) is not the
    # client's 403: only authorize_request turns authorize's PermissionError into one.
    assert problem_for_exception(PermissionError("disk")).status_code == 500


async def test_authorize_request_takes_any_request_object() -> None:
    class DjangoLike:
        def __init__(self) -> None:
            self.headers = {"x-auth": "permission-error"}

    with pytest.raises(Forbidden, match="not in this tenant") as caught:
        await authorize_request(sync_authorize, DjangoLike())
    assert isinstance(caught.value.__cause__, PermissionError)
