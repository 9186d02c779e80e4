"""Attack: the middleware's turn routes when the app does not sit at the server's root.

ASGI puts the full path in ``scope["path"]`` and the mount point in ``scope["root_path"]``
(Starlette's ``Mount`` and ``uvicorn --root-path`` both do so; Starlette's own router matches
on ``path`` minus ``root_path``). ``TurnstreamMiddleware`` used to match ``scope["path"]``
against ``/turns/`` as is, so a mounted app's, or a proxied app's, turn routes were never
served: the stream, status and cancel routes fell through to the app's 404 while ``POST
/chat`` worked. It now matches ``path`` minus ``root_path``; these tests keep it so.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from tests._chat_app import chat_app as shared_chat_app
from tests._helpers import WordProducer
from tests.e2e._server import ServerProcess
from turnstream import (
    MemoryStore,
    Principal,
    Supervisor,
    TurnstreamMiddleware,
)

ADA = {"X-User-Id": "ada"}
TURN = {"sessionId": "m1", "turnIndex": 0, "message": "hi"}
PROBLEM = "application/problem+json"


def authorize(request: Request) -> Principal:
    return Principal("acme", request.headers.get("x-user-id", "ada"))


def chat_app(supervisor: Supervisor) -> TurnstreamMiddleware:
    return shared_chat_app(supervisor, authorize, WordProducer(3))


@pytest.fixture
async def mounted() -> AsyncIterator[httpx.AsyncClient]:
    supervisor = Supervisor(MemoryStore())
    outer = Starlette(routes=[Mount("/api", app=chat_app(supervisor))])
    async with supervisor:
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_a_mounted_chat_route_works(mounted: httpx.AsyncClient) -> None:
    response = await mounted.post("/api/chat", json=TURN, headers=ADA)
    assert response.status_code == 200
    assert response.headers["x-execution-id"] == "chat:m1:0"


async def test_a_mounted_apps_turn_routes_are_served(mounted: httpx.AsyncClient) -> None:
    posted = await mounted.post("/api/chat", json=TURN, headers=ADA)
    assert posted.status_code == 200
    status = await mounted.get("/api/turns/chat:m1:0", headers=ADA)
    assert status.status_code == 200, (status.status_code, status.text)
    resumed = await mounted.get("/api/turns/chat:m1:0/stream?after=1", headers=ADA)
    assert resumed.status_code == 200 and resumed.headers["x-turn-mode"] == "replayed"
    unknown = await mounted.get("/api/turns/chat:nope:0", headers=ADA)
    assert unknown.headers["content-type"].startswith(PROBLEM)


# -- uvicorn --root-path (behind a proxy that strips the prefix) ------------------------------

APP = """
from starlette.applications import Starlette
from starlette.routing import Route

from turnstream import (ChatTurnRequest, MemoryStore, Principal, Supervisor, TurnContext,
                        TurnIdentity, TurnstreamError, TurnstreamMiddleware,
                        authorize_request, handle_chat_turn, problem_for_exception)

supervisor = Supervisor(MemoryStore())


def authorize(request):
    return Principal("acme", "ada")


async def produce(ctx: TurnContext):
    yield {"type": "text-delta", "delta": "hi"}


async def chat(request):
    try:
        who = await authorize_request(authorize, request)
        body = await ChatTurnRequest.read(request, limits=supervisor.limits)
        identity = TurnIdentity(who.tenant_id, "chat", body.session_id, who.user_id,
                                body.turn_index)
    except TurnstreamError as exc:
        return problem_for_exception(exc)
    result = await handle_chat_turn(identity, {"message": body.message},
                                    supervisor=supervisor, produce=produce, request=request)
    return result.response


app = TurnstreamMiddleware(Starlette(routes=[Route("/chat", chat, methods=["POST"])]),
                           supervisor=supervisor, authorize=authorize)
"""


@pytest.fixture(scope="module")
def root_path_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory: Path = tmp_path_factory.mktemp("attack-root-path")
    (directory / "attack_root_path_app.py").write_text(APP, encoding="utf-8")
    argv = [
        sys.executable, "-m", "uvicorn", "attack_root_path_app:app",
        "--app-dir", str(directory), "--root-path", "/api",
        "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
    ]  # fmt: skip
    server = ServerProcess("attack-root-path", argv, health_path="/turns/x")
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_under_root_path_the_chat_route_works(root_path_server: ServerProcess) -> None:
    # The proxy strips /api: the app is asked for /chat.
    response = httpx.post(root_path_server.base_url + "/chat", json=TURN)
    assert response.status_code == 200


def test_under_root_path_the_turn_routes_are_served(root_path_server: ServerProcess) -> None:
    posted = httpx.post(root_path_server.base_url + "/chat", json=TURN)
    assert posted.status_code == 200
    status = httpx.get(root_path_server.base_url + "/turns/chat:m1:0")
    assert status.status_code == 200, (status.status_code, status.text)


@pytest.mark.parametrize("prefix", ["", "/", "turns"])
async def test_a_prefix_that_cannot_work_is_refused(prefix: str) -> None:
    supervisor = Supervisor(MemoryStore())
    with pytest.raises(ValueError):
        TurnstreamMiddleware(
            chat_app(supervisor).app, supervisor=supervisor, authorize=authorize, prefix=prefix
        )
