from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from turnstream._exceptions import (
    AdapterError,
    InvalidTurnInput,
    LeaseLost,
    PayloadTooLarge,
    RequestTimeout,
    RunFinished,
    RunNotFound,
    StoreError,
    StoreUnavailable,
    TurnInputMismatch,
    TurnstreamError,
)
from turnstream._problems import (
    PROBLEM_MEDIA_TYPE,
    ProblemResponse,
    problem_body,
    problem_for_exception,
)

BASE = "https://turnstream.dev/problems/"


def document(response: Response) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(bytes(response.body))
    return body


def test_problem_body_exact_bytes() -> None:
    assert problem_body(400, "Bad request", "sessionId must not be empty") == (
        b'{"type":"about:blank","title":"Bad request","status":400,'
        b'"detail":"sessionId must not be empty"}'
    )


def test_problem_body_leaves_out_a_missing_detail() -> None:
    assert (
        problem_body(404, "Not Found") == b'{"type":"about:blank","title":"Not Found","status":404}'
    )


def test_problem_body_type_and_extensions_come_after_the_standard_members() -> None:
    body = problem_body(
        409,
        "Conflict",
        "d\u00e9tail \u2713",
        type=BASE + "x",
        instance="/turns/p:s:0",
        field=None,
        nested={"a": [1]},
    )
    assert body == (
        b'{"type":"https://turnstream.dev/problems/x","title":"Conflict","status":409,'
        + '"detail":"d\u00e9tail \u2713",'.encode()
        + b'"instance":"/turns/p:s:0","field":null,"nested":{"a":[1]}}'
    )


def test_problem_body_extensions_cannot_replace_standard_members() -> None:
    with pytest.raises(TypeError):
        problem_body(400, "t", status=500)  # type: ignore[misc]


def test_problem_response_headers() -> None:
    response = ProblemResponse(400, "Bad", "why", field="sessionId")
    assert response.status_code == 400
    assert response.media_type == PROBLEM_MEDIA_TYPE
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-length"] == str(len(bytes(response.body)))
    assert "retry-after" not in response.headers
    assert document(response) == {
        "type": "about:blank",
        "title": "Bad",
        "status": 400,
        "detail": "why",
        "field": "sessionId",
    }


def test_problem_response_retry_after_and_given_headers() -> None:
    response = ProblemResponse(
        503, "Unavailable", retry_after=30, headers={"cache-control": "private", "X-A": "b"}
    )
    assert response.headers["retry-after"] == "30"
    assert response.headers["cache-control"] == "private"
    assert response.headers.getlist("cache-control") == ["private"]
    assert response.headers["x-a"] == "b"


@pytest.mark.parametrize("retry_after", [-1, True, 1.5])
def test_problem_response_rejects_a_bad_retry_after(retry_after: Any) -> None:
    with pytest.raises(ValueError):
        ProblemResponse(503, "Unavailable", retry_after=retry_after)


MAPPING = [
    (InvalidTurnInput("sessionId must not be empty", field="sessionId"), 400, "invalid-input"),
    (
        PayloadTooLarge("event of 9 bytes is over the limit of 8", field="event"),
        413,
        "payload-too-large",
    ),
    (RequestTimeout("the body did not arrive within 10 s", field="body"), 408, "request-timeout"),
    (TurnInputMismatch("hash abc != def"), 409, "input-mismatch"),
    (RunNotFound("tenant t2 has no run p:s:0"), 404, "run-not-found"),
    (StoreUnavailable("ConnectionError('redis://10.0.0.7:6379')"), 503, "store-unavailable"),
    (StoreError("ResponseError('WRONGTYPE at key ts:{t/p:s:0}:log')"), 500, "internal-error"),
    (LeaseLost("token 41 != 42"), 500, "internal-error"),
    (RunFinished("p:s:0"), 500, "internal-error"),
    (AdapterError("POST http://sandbox.internal/agents/run/stream: 502"), 500, "internal-error"),
    (TurnstreamError("secret internals"), 500, "internal-error"),
    (RuntimeError("secret internals"), 500, "internal-error"),
    (KeyError("secret internals"), 500, "internal-error"),
]


@pytest.mark.parametrize(("exc", "status", "slug"), MAPPING)
def test_problem_for_exception(exc: BaseException, status: int, slug: str) -> None:
    response = problem_for_exception(exc)
    body = document(response)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert body["status"] == status
    assert body["type"] == BASE + slug
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert ("retry-after" in response.headers) == (status == 503)


@pytest.mark.parametrize(("exc", "status", "slug"), MAPPING[:3])
def test_input_problems_explain_themselves(exc: InvalidTurnInput, status: int, slug: str) -> None:
    body = document(problem_for_exception(exc))
    assert body["detail"] == str(exc)
    assert body["field"] == exc.field


def test_input_problem_without_a_field_has_no_field_member() -> None:
    body = document(problem_for_exception(InvalidTurnInput("bad body")))
    assert "field" not in body
    assert body == {
        "type": BASE + "invalid-input",
        "title": "Invalid turn input",
        "status": 400,
        "detail": "bad body",
    }


@pytest.mark.parametrize(("exc", "status", "slug"), MAPPING[3:])
def test_other_problems_leak_nothing(exc: BaseException, status: int, slug: str) -> None:
    raw = bytes(problem_for_exception(exc).body)
    for word in (str(exc), type(exc).__name__, "secret", "redis", "token", "tenant", "hash"):
        assert word.encode() not in raw


def test_all_internal_errors_answer_alike() -> None:
    bodies = {bytes(problem_for_exception(exc).body) for exc, status, _ in MAPPING if status == 500}
    assert len(bodies) == 1


def test_unknown_and_foreign_runs_answer_byte_for_byte_alike() -> None:
    unknown = problem_for_exception(RunNotFound("no run p:s:0"))
    foreign = problem_for_exception(RunNotFound("p:s:0 belongs to tenant t1"))
    assert bytes(unknown.body) == bytes(foreign.body)
    assert unknown.raw_headers == foreign.raw_headers


def test_request_timeout_closes_the_connection() -> None:
    # RFC 9110 §15.5.9: the server gave up waiting, so it says so; a keep-alive server would
    # otherwise go on reading the trickled body after the answer.
    response = problem_for_exception(RequestTimeout("the body did not arrive within 10 s"))
    assert response.status_code == 408
    assert response.headers["connection"] == "close"
    assert "retry-after" not in response.headers
    assert document(response) == {
        "type": BASE + "request-timeout",
        "title": "Request Timeout",
        "status": 408,
        "detail": "the body did not arrive within 10 s",
    }
    # Still an InvalidTurnInput: code that catches those catches this one too.
    assert isinstance(RequestTimeout("x"), InvalidTurnInput)


def test_store_unavailable_retry_after() -> None:
    assert problem_for_exception(StoreUnavailable()).headers["retry-after"] == "1"
    response = problem_for_exception(StoreUnavailable(), retry_after=7)
    assert response.headers["retry-after"] == "7"
    assert document(response) == {
        "type": BASE + "store-unavailable",
        "title": "Store unavailable",
        "status": 503,
        "detail": "The turn store cannot be reached right now; retry later.",
    }


async def test_problem_response_through_an_app() -> None:
    async def endpoint(request: Request) -> Response:
        raise PayloadTooLarge("message over 4 bytes", field="message")

    async def on_error(request: Request, exc: Exception) -> Response:
        return problem_for_exception(exc)

    app = Starlette(
        routes=[Route("/chat", endpoint, methods=["POST"])],
        exception_handlers={TurnstreamError: on_error},
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://test"
    ) as client:
        response = await client.post("/chat", content=b"hello")
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": BASE + "payload-too-large",
        "title": "Payload too large",
        "status": 413,
        "detail": "message over 4 bytes",
        "field": "message",
    }
