"""RFC 9457 problem documents: how an error before the stream starts reaches the client.

Once a turn's stream has started, errors are in-band (``error`` + ``session.run.failed``);
everything here is for the moment before, when an HTTP status can still say what went wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import orjson
from starlette.responses import Response

from ._exceptions import (
    Forbidden,
    InvalidTurnInput,
    PayloadTooLarge,
    RequestTimeout,
    RunNotFound,
    StoreUnavailable,
    TurnInputMismatch,
    Unauthorized,
)

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "PROBLEM_TYPE_BASE",
    "ProblemResponse",
    "problem_body",
    "problem_for_exception",
]

logger = logging.getLogger("turnstream.problems")

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"

# One stable URI per problem kind, so a client can branch on `type` rather than on the
# wording of `title`. Every problem about a turn gets one of these; `about:blank` (RFC 9457
# §4.2.1: the status says it all) is the default of `problem_body`, for an app's own problems
# and for plain HTTP ones, such as the turn routes' 405 and 415.
PROBLEM_TYPE_BASE: Final = "https://turnstream.dev/problems/"

# A store outage is usually a failover or a restart: seconds, not minutes.
DEFAULT_RETRY_AFTER: Final = 1


def problem_body(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str = "about:blank",
    **extensions: Any,
) -> bytes:
    """The JSON of one problem document: ``type``, ``title``, ``status``, ``detail``, extensions.

    ``detail`` is left out when ``None``. ``status`` repeats the HTTP status (RFC 9457 §3.1.2).
    Extensions come after the standard members; they cannot replace ``type``, ``title``,
    ``status`` or ``detail`` (Python binds those names to the parameters).
    """
    document: dict[str, Any] = {"type": type, "title": title, "status": status}
    if detail is not None:
        document["detail"] = detail
    document.update(extensions)
    return orjson.dumps(document)


class ProblemResponse(Response):
    """A problem document as a Starlette response (``application/problem+json``)."""

    media_type = PROBLEM_MEDIA_TYPE

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type: str = "about:blank",
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        merged: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            # Only the delay-seconds form: an HTTP-date needs a clock the client may not share.
            if not isinstance(retry_after, int) or isinstance(retry_after, bool) or retry_after < 0:
                raise ValueError(f"retry_after must be a non-negative integer, got {retry_after!r}")
            merged["Retry-After"] = str(retry_after)
        super().__init__(
            problem_body(status, title, detail, type=type, **extensions),
            status_code=status,
            headers=merged,
        )
        # An error about one tenant's turn must not be served from a shared cache to another;
        # set after init_headers so a caller-given Cache-Control (any spelling) is kept.
        self.headers.setdefault("Cache-Control", "no-store")


def _problem_type(slug: str) -> str:
    return PROBLEM_TYPE_BASE + slug


def problem_for_exception(
    exc: BaseException, *, retry_after: int = DEFAULT_RETRY_AFTER
) -> ProblemResponse:
    """Translate an error raised before the stream started into its problem response.

    ==================== ====== =====================================================
    exception            status detail
    ==================== ====== =====================================================
    PayloadTooLarge      413    the message (written for the client), ``field``
    RequestTimeout       408    the message, ``field``, with ``Connection: close``
    InvalidTurnInput     400    the message (written for the client), ``field``
    Unauthorized         401    the message, if any; ``WWW-Authenticate`` if given
    Forbidden            403    the message, if any (``authorize_request`` turns a
                                ``PermissionError`` of ``authorize`` into one)
    TurnInputMismatch    409    fixed
    RunNotFound          404    fixed: an unknown run and another tenant's run answer
                                byte for byte alike
    StoreUnavailable     503    fixed, with ``Retry-After: retry_after``
    anything else        500    fixed: internals never reach the client
    ==================== ====== =====================================================

    Logging a 500's cause is the caller's job: it knows the request.
    """
    # PayloadTooLarge and RequestTimeout are InvalidTurnInputs and StoreUnavailable a
    # StoreError: the more specific class is tested first.
    if isinstance(exc, PayloadTooLarge):
        return _input_problem(exc, 413, "Payload too large", "payload-too-large")
    if isinstance(exc, RequestTimeout):
        # RFC 9110 §15.5.9: a 408 means the server will not wait any longer, so it says
        # `close`; without it a keep-alive server would go on reading the trickled body.
        return _input_problem(
            exc, 408, "Request Timeout", "request-timeout", headers={"Connection": "close"}
        )
    if isinstance(exc, InvalidTurnInput):
        return _input_problem(exc, 400, "Invalid turn input", "invalid-input")
    if isinstance(exc, Unauthorized):
        headers: dict[str, str] = {}
        challenge = exc.www_authenticate
        if challenge is not None:
            if _is_field_value(challenge):
                headers["WWW-Authenticate"] = challenge
            else:
                # CR/LF would inject headers, non-latin-1 text cannot be sent at all: the
                # client still gets its 401, without the challenge.
                logger.warning("dropped a WWW-Authenticate that is no HTTP field value: %r",
                               challenge)  # fmt: skip
        return ProblemResponse(
            401,
            "Unauthorized",
            str(exc) or None,
            type=_problem_type("unauthorized"),
            headers=headers,
        )
    if isinstance(exc, Forbidden):
        return ProblemResponse(403, "Forbidden", str(exc) or None, type=_problem_type("forbidden"))
    if isinstance(exc, TurnInputMismatch):
        return ProblemResponse(
            409,
            "Turn input mismatch",
            "This turn already exists with a different input; it is neither replayed nor "
            "produced again.",
            type=_problem_type("input-mismatch"),
        )
    if isinstance(exc, RunNotFound):
        return ProblemResponse(
            404,
            "Run not found",
            "No run with this execution id is visible to you.",
            type=_problem_type("run-not-found"),
        )
    if isinstance(exc, StoreUnavailable):
        return ProblemResponse(
            503,
            "Store unavailable",
            "The turn store cannot be reached right now; retry later.",
            type=_problem_type("store-unavailable"),
            retry_after=retry_after,
        )
    # One fixed text for every other TurnstreamError and for anything unexpected alike: even
    # the class name would tell a client something about the internals.
    return ProblemResponse(
        500,
        "Internal error",
        "The turn could not be started because of an internal error.",
        type=_problem_type("internal-error"),
    )


def _is_field_value(value: object) -> bool:
    """RFC 9110 §5.5: visible latin-1 characters, spaces and tabs; nothing else."""
    return isinstance(value, str) and all(
        ch == "\t" or " " <= ch <= "~" or "\x80" <= ch <= "\xff" for ch in value
    )


def _input_problem(
    exc: InvalidTurnInput,
    status: int,
    title: str,
    slug: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    extensions: dict[str, Any] = {}
    if exc.field is not None:
        extensions["field"] = exc.field
    return ProblemResponse(
        status, title, str(exc), type=_problem_type(slug), headers=headers, **extensions
    )
