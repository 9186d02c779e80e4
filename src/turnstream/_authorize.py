"""Who is asking: the application's ``authorize`` callable, and what its answer may be.

turnstream has no auth of its own. Every route that touches a turn (the chat route helpers
and the middleware's ``/turns/...`` routes) calls the app's ``authorize(request)``, which
returns a :class:`Principal` or says no:

* ``raise Unauthorized(...)``: no or bad credentials → ``401`` (with ``WWW-Authenticate``
  when given);
* ``raise Forbidden(...)`` or any ``PermissionError``: a known caller that may not do this
  → ``403``;
* anything else it raises, or a return value that is not a valid :class:`Principal`, is a
  bug of the app: logged with its traceback, answered with a ``500`` problem document that
  says nothing about it (never a traceback page).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ._exceptions import Forbidden, InvalidTurnInput, TurnstreamError, Unauthorized
from ._identity import check_component

__all__ = ["Authorize", "AuthorizeFailed", "Principal", "authorize_request"]

logger = logging.getLogger("turnstream.authorize")

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking, as the application's own auth resolved it."""

    tenant_id: str
    user_id: str


Authorize = Callable[[R], Principal | Awaitable[Principal]]


class AuthorizeFailed(TurnstreamError):
    """``authorize`` raised something other than a rejection, or returned no valid Principal.

    A bug of the application, not of the client: a 500 whose cause is logged here.
    """


async def authorize_request(authorize: Callable[[R], object], request: R) -> Principal:
    """Call ``authorize(request)`` (sync or async) and return the :class:`Principal`.

    Raises :class:`Unauthorized` or :class:`Forbidden` (a ``PermissionError`` it raised
    becomes a :class:`Forbidden` with the same message) for a rejection, and
    :class:`AuthorizeFailed` for anything else; :func:`problem_for_exception` answers each.
    Works with any request object (a Starlette ``Request``, a Django ``HttpRequest``…).
    """
    try:
        principal = authorize(request)
        if inspect.isawaitable(principal):
            principal = await principal
    except (Unauthorized, Forbidden):
        raise
    except TurnstreamError:
        raise  # the app answered in turnstream's own terms (an InvalidTurnInput is a 400)
    except PermissionError as exc:
        raise Forbidden(str(exc)) from exc
    except Exception as exc:
        logger.exception("authorize() raised %s; answering 500", type(exc).__name__)
        raise AuthorizeFailed("authorize() raised") from exc
    if not isinstance(principal, Principal):
        logger.error(
            "authorize() returned %s, not a turnstream.Principal; answering 500",
            type(principal).__name__,
        )
        raise AuthorizeFailed("authorize() must return a turnstream.Principal")
    try:
        check_component(principal.tenant_id, "tenant_id")
        check_component(principal.user_id, "user_id")
    except InvalidTurnInput as exc:
        # The app's bug, not the client's request: a 500, not the 400 this would be.
        logger.error("authorize() returned an unusable Principal (%s); answering 500", exc)
        raise AuthorizeFailed(f"authorize() returned an unusable Principal: {exc}") from None
    return principal
