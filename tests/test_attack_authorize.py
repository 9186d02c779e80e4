"""Attack: ``authorize`` saying no, and saying it badly.

What the app's ``authorize`` may raise or return, on every surface that calls it: the
middleware's turn routes, a Starlette route using ``authorize_request``, the FastAPI
dependency (``turnstream.fastapi.chat_turn``) and ``django_problem`` (in a subprocess: Django's
settings are process-wide and ``tests/test_django.py`` configures them).

A ``WWW-Authenticate`` that is no HTTP field value (CR/LF/NUL, beyond latin-1, not a str)
used to reach the headers or crash the problem document; it is now dropped with a warning.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Depends, FastAPI
from fastapi import Request as FastAPIRequest
from starlette.responses import Response

from tests._chat_app import chat_app
from tests._helpers import WordProducer
from tests.e2e._server import ServerProcess
from turnstream import (
    Limits,
    MemoryStore,
    Principal,
    Supervisor,
    TurnstreamError,
    Unauthorized,
    authorize_request,
    problem_for_exception,
)
from turnstream.fastapi import ChatTurn, chat_turn, problem_handler

PROBLEM = "application/problem+json"
TURN = {"sessionId": "s1", "turnIndex": 0, "message": "hi"}
JSON = {"Content-Type": "application/json"}

# Header values an app may (carelessly) put in ``Unauthorized(www_authenticate=…)``, e.g. a
# realm built from the request's Host header.
INJECTED = {
    "CRLF": 'Bearer realm="x"\r\nSet-Cookie: pwned=1',
    "LF": "Bearer\nX-Evil: 1",
    "NUL": "Bearer\x00x",
}
NOT_LATIN_1 = 'Bearer realm="caf\u00e9\u2122"'


def header_values_are_legal(response: Response) -> bool:
    """RFC 9110 §5.5: a field value holds no CR, LF or NUL (and is bytes on the wire)."""
    return all(
        not any(ch in value for ch in (b"\r", b"\n", b"\x00")) for _, value in response.raw_headers
    )


# -- problem_for_exception ---------------------------------------------------------------------


@pytest.mark.parametrize("value", list(INJECTED.values()), ids=list(INJECTED))
def test_www_authenticate_cannot_inject_header_bytes(value: str) -> None:
    response = problem_for_exception(Unauthorized("no", www_authenticate=value))
    assert response.media_type == PROBLEM
    assert header_values_are_legal(response), response.raw_headers


@pytest.mark.parametrize("value", [NOT_LATIN_1, 42], ids=["not latin-1", "not a str"])
def test_an_unencodable_www_authenticate_still_gives_a_problem(value: Any) -> None:
    response = problem_for_exception(Unauthorized("no", www_authenticate=value))
    assert response.media_type == PROBLEM
    assert response.status_code in (401, 500)


def test_a_message_with_control_characters_stays_in_the_json_body() -> None:
    response = problem_for_exception(Unauthorized("line1\r\nSet-Cookie: x=1"))
    assert response.status_code == 401
    assert header_values_are_legal(response)
    assert orjson.loads(response.body)["detail"] == "line1\r\nSet-Cookie: x=1"


# -- every surface, in process -----------------------------------------------------------------


class Later(BaseException):
    """Neither an Exception nor a rejection: what authorize_request must not swallow."""


def _raise(exc: BaseException) -> Any:
    raise exc


class SubPrincipal(Principal):
    __slots__ = ("roles",)

    def __init__(self, tenant_id: str, user_id: str, roles: tuple[str, ...]) -> None:
        super().__init__(tenant_id, user_id)
        object.__setattr__(self, "roles", roles)


async def _raises_later() -> Principal:
    await asyncio.sleep(0)
    raise RuntimeError("token service said: secret-token-123")


async def _slow() -> Principal:
    await asyncio.sleep(0.6)  # longer than the body timeout below
    return Principal("acme", "ada")


# name -> (what authorize does, status, detail or None to skip)
BEHAVIOURS: dict[str, tuple[Callable[[], Any], int]] = {
    "async raise": (lambda: _raise(RuntimeError("secret-token-123")), 500),
    "coroutine raising later": (_raises_later, 500),
    "returns an awaitable of None": (lambda: asyncio.sleep(0), 500),
    "ExceptionGroup of Unauthorized": (
        lambda: _raise(ExceptionGroup("g", [Unauthorized("secret-token-123")])),
        500,
    ),
    "Principal subclass": (lambda: SubPrincipal("acme", "ada", ("admin",)), 200),
    "Principal with an int user": (lambda: Principal("acme", 7), 500),  # type: ignore[arg-type]
    "Principal with a NUL": (lambda: Principal("acme", "a\x00"), 500),
    "Principal with a 257-char tenant": (lambda: Principal("t" * 257, "ada"), 500),
    "slow authorize": (_slow, 200),
}


def make_authorize(mode_of: Callable[[Any], str]) -> Callable[[Any], Any]:
    def authorize(request: Any) -> Any:
        return BEHAVIOURS[mode_of(request)][0]()

    return authorize


def mode(request: Any) -> str:
    return str(request.headers.get("x-mode"))


@pytest.fixture
async def apps() -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """The same authorize on a Starlette route, the FastAPI dependency and the middleware."""
    supervisor = Supervisor(MemoryStore(), limits=Limits(body_timeout_s=0.3))
    producer = WordProducer(2)
    authorize = make_authorize(mode)

    starlette = chat_app(supervisor, authorize, producer)
    fastapi_app = FastAPI(exception_handlers={TurnstreamError: problem_handler})
    dependency = chat_turn(supervisor, authorize=authorize)

    @fastapi_app.post("/chat")
    async def fastapi_chat(turn: ChatTurn = Depends(dependency)) -> Response:  # noqa: B008
        return await turn.respond(produce=producer)

    @fastapi_app.get("/whoami")
    async def whoami(request: FastAPIRequest) -> Response:
        return Response(b"")

    async with supervisor:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=starlette), base_url="http://t"
            ) as s,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=fastapi_app), base_url="http://t"
            ) as f,
        ):
            yield {"starlette": s, "fastapi": f}


def check(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    if status >= 400:
        assert response.headers["content-type"].startswith(PROBLEM)
        assert response.json()["status"] == status
        assert "secret-token-123" not in response.text


@pytest.mark.parametrize("name", list(BEHAVIOURS))
async def test_authorize_behaviours_on_every_surface(
    apps: dict[str, httpx.AsyncClient], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    status = BEHAVIOURS[name][1]
    headers = {**JSON, "X-Mode": name}
    check(await apps["starlette"].post("/chat", json=TURN, headers=headers), status)
    check(await apps["fastapi"].post("/chat", json=TURN, headers=headers), status)
    # The middleware's turn routes answer the same way (the accepted caller finds s1, which
    # the POSTs above started under the same principal).
    route_status = status
    status_response = await apps["starlette"].get("/turns/chat:s1:0", headers=headers)
    check(status_response, route_status)
    cancel = await apps["starlette"].post("/turns/chat:s1:0/cancel", content=b"{}", headers=headers)
    check(cancel, 202 if route_status == 200 else route_status)
    if status == 500:
        assert any(r.name == "turnstream.authorize" for r in caplog.records)


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), KeyboardInterrupt(), Later()], ids=lambda e: type(e).__name__
)
async def test_authorize_request_does_not_swallow_base_exceptions(exc: BaseException) -> None:
    async def authorize(request: object) -> Principal:
        raise exc

    with pytest.raises(type(exc)):
        await authorize_request(authorize, object())


# -- on the wire, under uvicorn ----------------------------------------------------------------

WIRE_APP = textwrap.dedent(
    """
    from starlette.applications import Starlette
    from starlette.routing import Route

    from turnstream import (MemoryStore, Principal, Supervisor, TurnstreamError,
                            TurnstreamMiddleware, Unauthorized, authorize_request,
                            problem_for_exception)

    VALUES = {"crlf": 'Bearer realm="x"\\r\\nSet-Cookie: pwned=1', "nul": "Bearer\\x00x",
              "unicode": 'Bearer realm="caf\\u00e9\\u2122"'}


    def authorize(request):
        value = VALUES.get(request.headers.get("x-mode", ""))
        if value is None:
            return Principal("acme", "ada")
        raise Unauthorized("sign in", www_authenticate=value)


    async def chat(request):
        try:
            await authorize_request(authorize, request)
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        return problem_for_exception(RuntimeError())


    supervisor = Supervisor(MemoryStore())
    app = TurnstreamMiddleware(Starlette(routes=[Route("/chat", chat, methods=["POST"])]),
                               supervisor=supervisor, authorize=authorize)
    """
)


@pytest.fixture(scope="module")
def wire_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("attack-authorize")
    (directory / "attack_wire_app.py").write_text(WIRE_APP, encoding="utf-8")
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "attack_wire_app:app",
        "--app-dir",
        str(directory),
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--log-level",
        "warning",
    ]
    server = ServerProcess("attack-authorize", argv, health_path="/turns/x")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("value", ["crlf", "nul", "unicode"])
@pytest.mark.parametrize("path", ["/chat", "/turns/chat:s1:0"])
def test_a_bad_www_authenticate_under_uvicorn_is_still_a_problem(
    wire_server: ServerProcess, value: str, path: str
) -> None:
    method = "POST" if path == "/chat" else "GET"
    response = httpx.request(
        method, wire_server.base_url + path, headers={**JSON, "X-Mode": value}, content=b"{}"
    )
    assert response.headers["content-type"].startswith(PROBLEM), response.text
    assert "set-cookie" not in response.headers


def test_an_accepted_caller_under_uvicorn_gets_the_unknown_turn_404(
    wire_server: ServerProcess,
) -> None:
    response = httpx.get(wire_server.base_url + "/turns/chat:s1:0", headers={"X-Mode": "none"})
    assert response.status_code == 404  # accepted: the turn does not exist


# -- Django ------------------------------------------------------------------------------------

DJANGO_SCRIPT = textwrap.dedent(
    """
    import sys
    from django.conf import settings
    settings.configure(DEBUG=False)
    import django
    django.setup()
    from turnstream import Unauthorized
    from turnstream.django import django_problem
    values = {"crlf": 'Bearer realm="x"\\r\\nSet-Cookie: pwned=1',
              "unicode": 'Bearer realm="caf\\u00e9\\u2122"'}
    response = django_problem(Unauthorized("sign in", www_authenticate=values[sys.argv[1]]))
    assert response["Content-Type"].startswith("application/problem+json"), response
    print(response.status_code)
    """
)


@pytest.mark.parametrize("value", ["crlf", "unicode"])
def test_django_problem_survives_a_bad_www_authenticate(value: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DJANGO_SCRIPT, value],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
