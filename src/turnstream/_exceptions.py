"""The exception tree of turnstream.

    TurnstreamError
    ├── InvalidTurnInput        (bad identity, body or cursor: a 400 before the stream starts)
    │   ├── PayloadTooLarge     (body, message or event over a configured limit: 413)
    │   └── RequestTimeout      (the body did not arrive within ``body_timeout_s``: 408)
    ├── TurnInputMismatch       (same execution id, different input: 409)
    ├── RunNotFound             (no such run for this tenant: 404)
    ├── Unauthorized            (``authorize`` found no or bad credentials: 401)
    ├── Forbidden               (``authorize`` knows the caller, who may not: 403; also a
    │                            PermissionError, which ``authorize`` may raise instead)
    ├── StoreError              (the store failed; redis-py errors are translated here)
    │   └── StoreUnavailable    (cannot reach the store: 503 with Retry-After)
    ├── LeaseLost               (a fenced write by a writer whose lease was taken over)
    ├── OwnerLost               (a run's owner died and nothing can re-attach to it)
    ├── RunFinished             (a write to a run that already has its terminal event)
    └── AdapterError            (a reconnect adapter failed to start or attach)

Every error that crosses the HTTP boundary is translated there: before the stream starts into
an RFC 9457 problem document, after it into an in-band ``error`` event.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "Forbidden",
    "InvalidTurnInput",
    "LeaseLost",
    "OwnerLost",
    "PayloadTooLarge",
    "RequestTimeout",
    "RunFinished",
    "RunNotFound",
    "StoreError",
    "StoreUnavailable",
    "TurnInputMismatch",
    "TurnstreamError",
    "Unauthorized",
]


class TurnstreamError(Exception):
    """Root of every error turnstream raises on purpose."""


class InvalidTurnInput(TurnstreamError, ValueError):
    """An identity, request body, event or cursor is malformed.

    ``field`` names the offending part (``"sessionId"``, ``"Last-Event-ID"``…) when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLarge(InvalidTurnInput):
    """A body, message or event is over its configured limit."""


class RequestTimeout(InvalidTurnInput):
    """The request body did not arrive whole within ``Limits.body_timeout_s``.

    An :class:`InvalidTurnInput` because, like a malformed body, it is the client's request
    that cannot be used; the answer is a 408 that closes the connection.
    """


class TurnInputMismatch(TurnstreamError):
    """The execution id exists with a different input hash: a conflict, not a replay."""


class RunNotFound(TurnstreamError):
    """No run with this execution id is visible to this tenant."""


class Unauthorized(TurnstreamError):
    """``authorize`` rejects the request: no credentials, or bad ones (401).

    ``www_authenticate`` becomes the response's ``WWW-Authenticate`` header (RFC 9110
    §11.6.1 asks a 401 for one), e.g. ``'Bearer realm="chat"'``; a value that is no HTTP
    field value (CR, LF, other control characters, text beyond latin-1) is dropped with a
    warning, never sent. The message is shown to the client as the problem's ``detail``.
    """

    def __init__(self, message: str = "", *, www_authenticate: str | None = None) -> None:
        super().__init__(message)
        self.www_authenticate = www_authenticate


class Forbidden(TurnstreamError, PermissionError):
    """``authorize`` knows the caller, who may not do this (403).

    A plain ``PermissionError`` raised by ``authorize`` is answered the same way. The message
    is shown to the client as the problem's ``detail``.
    """


class StoreError(TurnstreamError):
    """The store failed to carry out an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; the request may be retried later."""


class LeaseLost(TurnstreamError):
    """The writer's lease was taken over by another writer: its write did not land.

    A lease that merely lapsed (or was released) fences nothing until someone takes the run
    over: until then no other writer exists, so the old holder's writes are still safe.
    """


class OwnerLost(TurnstreamError):
    """The worker that owned an unfinished run died, and the run cannot be re-attached (its
    events came from a local producer): retrying the turn restarts it."""


class RunFinished(TurnstreamError):
    """The run already holds its terminal event; nothing is appended after it."""


class AdapterError(TurnstreamError):
    """A reconnect adapter failed to start or re-attach to its substrate run."""
