"""The demo's stand-in for auth: who is asking, from two headers.

``X-Demo-Tenant`` and ``X-Demo-User`` (defaults ``demo`` and ``guest``), used alike by the chat
route, the middleware's turn routes and the kill button's routes. A real app authenticates;
the demo lets the page switch user to show that another user's turn is invisible.
"""

from __future__ import annotations

from typing import Final

from starlette.requests import Request

from .._exceptions import InvalidTurnInput
from .._middleware import Principal

__all__ = ["DEFAULT_TENANT", "DEFAULT_USER", "TENANT_HEADER", "USER_HEADER", "demo_principal"]

DEFAULT_TENANT: Final = "demo"
DEFAULT_USER: Final = "guest"
TENANT_HEADER: Final = "X-Demo-Tenant"
USER_HEADER: Final = "X-Demo-User"

_MAX_COMPONENT: Final = 256


def _header_component(request: Request, header: str, default: str) -> str:
    value = request.headers.get(header)
    if value is None:
        return default
    # Checked here rather than left to TurnIdentity so that the turn routes (which build no
    # identity) refuse the same values the chat route does, naming the header.
    if (
        not value
        or len(value) > _MAX_COMPONENT
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise InvalidTurnInput(
            f"{header} must be 1 to {_MAX_COMPONENT} printable characters", field=header
        )
    return value


def demo_principal(request: Request) -> Principal:
    """The demo's stand-in for auth: who is asking, from two headers."""
    return Principal(
        tenant_id=_header_component(request, TENANT_HEADER, DEFAULT_TENANT),
        user_id=_header_component(request, USER_HEADER, DEFAULT_USER),
    )
