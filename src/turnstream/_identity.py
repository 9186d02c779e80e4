"""Who a turn belongs to and the stable id it is known by."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import orjson

from ._exceptions import InvalidTurnInput

__all__ = [
    "TurnIdentity",
    "canonical_input_hash",
    "derive_execution_id",
    "parse_execution_id",
]

# A component may hold any printable text; everything that could break the
# `project:session:turn` shape, a Redis hash tag or a header is percent-encoded.
# Keeping `%` itself out of the safe set is what makes the encoding injective; `/` is
# encoded too so an execution id is one URL path segment.
_SAFE = "-._~!$&'()*+,;=@"
MAX_COMPONENT_LENGTH = 256
MAX_TURN_INDEX = 2**53 - 1  # stays exact through JSON in every language
# The longest derivable id: every code point of both components is up to 4 UTF-8 bytes, each
# percent-encoded as 3 characters, plus the two colons and the turn index.
MAX_EXECUTION_ID_LENGTH = 2 * (MAX_COMPONENT_LENGTH * 4 * 3) + 2 + len(str(MAX_TURN_INDEX))


def check_component(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidTurnInput(f"{field} must be a string", field=field)
    if not value:
        raise InvalidTurnInput(f"{field} must not be empty", field=field)
    if len(value) > MAX_COMPONENT_LENGTH:
        raise InvalidTurnInput(
            f"{field} is longer than {MAX_COMPONENT_LENGTH} characters", field=field
        )
    # C0 and DEL: they break lines and headers. C1 (U+0080-U+009F) stays allowed: a latin-1
    # header byte decodes to it, and an id percent-encodes it anyway (an app that logs ids
    # raw should escape them).
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidTurnInput(f"{field} must not contain control characters", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTurnInput(f"{field} must be valid Unicode text", field=field) from None
    return value


def _check_turn_index(value: object) -> int:
    # bool is an int in Python; a JSON `true` is not a turn index.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTurnInput("turnIndex must be an integer", field="turnIndex")
    if value < 0 or value > MAX_TURN_INDEX:
        raise InvalidTurnInput(
            f"turnIndex must be between 0 and {MAX_TURN_INDEX}", field="turnIndex"
        )
    return value


def _encode(component: str) -> str:
    return quote(component, safe=_SAFE)


def derive_execution_id(project_id: str, session_id: str, turn_index: int) -> str:
    """The stable id of one turn: ``"{project}:{session}:{turn}"``.

    Readable on purpose (operators grep logs for it). Components are percent-encoded, so the
    mapping is injective and no component ever contains ``:``, ``{``, ``}``, ``%`` (other than
    as an escape) or a control character.
    """
    project = check_component(project_id, "projectId")
    session = check_component(session_id, "sessionId")
    turn = _check_turn_index(turn_index)
    return f"{_encode(project)}:{_encode(session)}:{turn}"


def parse_execution_id(execution_id: str) -> tuple[str, str, int]:
    """Invert :func:`derive_execution_id`; raise :class:`InvalidTurnInput` for anything else."""
    if not isinstance(execution_id, str) or len(execution_id) > MAX_EXECUTION_ID_LENGTH:
        raise InvalidTurnInput("malformed execution id", field="executionId")
    parts = execution_id.split(":")
    if len(parts) != 3:
        raise InvalidTurnInput("malformed execution id", field="executionId")
    project_raw, session_raw, turn_raw = parts
    if not turn_raw.isascii() or not turn_raw.isdigit() or (turn_raw != "0" and turn_raw[0] == "0"):
        raise InvalidTurnInput("malformed execution id", field="executionId")
    try:
        project = unquote(project_raw, errors="strict")
        session = unquote(session_raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidTurnInput("malformed execution id", field="executionId") from None
    try:
        canonical = derive_execution_id(project, session, int(turn_raw))
    except InvalidTurnInput:
        raise InvalidTurnInput("malformed execution id", field="executionId") from None
    # Only the canonical spelling is an execution id: `a%3Ab` and `a%3ab` must not both
    # name the same run, and a non-canonical one never came from derive_execution_id.
    if canonical != execution_id:
        raise InvalidTurnInput("malformed execution id", field="executionId")
    return project, session, int(turn_raw)


@dataclass(frozen=True, slots=True)
class TurnIdentity:
    """Who and where a turn is; resolved by the application's own auth."""

    tenant_id: str
    project_id: str
    session_id: str
    user_id: str
    turn_index: int

    def __post_init__(self) -> None:
        check_component(self.tenant_id, "tenantId")
        check_component(self.project_id, "projectId")
        check_component(self.session_id, "sessionId")
        check_component(self.user_id, "userId")
        _check_turn_index(self.turn_index)

    @property
    def execution_id(self) -> str:
        return derive_execution_id(self.project_id, self.session_id, self.turn_index)


def canonical_input_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of a turn's input (sorted keys, no whitespace).

    Two requests for one execution id with the same hash are the same turn (replay or join);
    a different hash is a conflict.
    """
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise InvalidTurnInput(f"turn input is not JSON-serialisable: {exc}") from exc
    return hashlib.sha256(data).hexdigest()
