"""Events: what a writer submits (:class:`NewEvent`) and what the log holds (:class:`LoggedEvent`).

An event is a JSON object with a ``type``. The producer's fields are kept verbatim; the pump adds
``eventId`` (the dedup key) and the store adds ``seq`` (reserved: a producer may not set it).
The serialised JSON is kept as bytes from the moment it is accepted, so a replay sends the very
bytes that were logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from ._exceptions import InvalidTurnInput, PayloadTooLarge

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "ERROR",
    "FAILED",
    "MAX_EVENT_ID_LENGTH",
    "MAX_LOGGED_ID_LENGTH",
    "RESTARTED",
    "STARTED",
    "TERMINAL_TYPES",
    "TEXT_DELTA",
    "LoggedEvent",
    "NewEvent",
    "fast_logged_event",
    "fast_new_event",
]

STARTED: Final = "session.run.started"
RESTARTED: Final = "session.run.restarted"
COMPLETED: Final = "session.run.completed"
FAILED: Final = "session.run.failed"
CANCELLED: Final = "session.run.cancelled"
ERROR: Final = "error"
TEXT_DELTA: Final = "text-delta"
TERMINAL_TYPES: Final = frozenset({COMPLETED, FAILED, CANCELLED})

MAX_EVENT_ID_LENGTH: Final = 256  # an id a producer or substrate gives
# A logged id: a given one plus the attempt scope the pump puts in front (see _produce).
MAX_LOGGED_ID_LENGTH: Final = MAX_EVENT_ID_LENGTH + 32
DEFAULT_MAX_EVENT_BYTES: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event accepted for the log but not yet given a ``seq``.

    ``data`` is the JSON object (``type`` first, ``eventId`` included, no ``seq``).
    """

    event_id: str
    type: str
    data: bytes
    # The text a ``text-delta`` adds to the turn under the default fold, kept so the pump
    # folds its own events without parsing their JSON back.
    text_delta: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        event_id: str,
        payload: Mapping[str, Any],
        *,
        max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> NewEvent:
        """Validate and serialise one event; raise :class:`InvalidTurnInput` when it is not one."""
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_LOGGED_ID_LENGTH:
            raise InvalidTurnInput(
                f"eventId must be a non-empty string of at most {MAX_LOGGED_ID_LENGTH} characters",
                field="eventId",
            )
        if type(payload) is not dict and not isinstance(payload, Mapping):
            raise InvalidTurnInput("an event must be a JSON object", field="event")
        event_type = payload.get("type")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidTurnInput("an event needs a non-empty string 'type'", field="type")
        if "seq" in payload:
            raise InvalidTurnInput("'seq' is reserved: the store assigns it", field="seq")
        # `type` first, the producer's fields in their order, `eventId` (ours) last. One dict
        # display does it: a repeated key keeps its first position and takes the last value.
        if "eventId" in payload:  # a given eventId is replaced by ours, which goes last
            given = {k: v for k, v in payload.items() if k != "eventId"}
            body = {"type": event_type, **given, "eventId": event_id}
        else:
            body = {"type": event_type, **payload, "eventId": event_id}
        try:
            # Copied into a bytes object of its own size: orjson's result keeps the 4 KiB
            # buffer it was written into, so a log of short deltas held ~4 KiB per event
            # (490 KB per streamed turn) until it was copied. The copy costs ~0.1 µs.
            data = b"%b" % _dumps(body)
        except TypeError as exc:
            raise InvalidTurnInput(f"event is not JSON-serialisable: {exc}", field="event") from exc
        if len(data) > max_bytes:
            raise PayloadTooLarge(
                f"event of {len(data)} bytes is over the limit of {max_bytes}", field="event"
            )
        delta = payload.get("delta") if event_type == TEXT_DELTA else None
        return fast_new_event(event_id, event_type, data, delta if type(delta) is str else None)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event the store has acknowledged, at position ``seq`` (1, 2, 3…) of its run's log."""

    seq: int
    event_id: str
    type: str
    data: bytes

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def to_json(self) -> bytes:
        """The wire JSON: the logged object with ``seq`` first."""
        # `data` always starts with `{"type":`, so splicing keeps it one valid object and
        # avoids a parse + dump per event on every read.
        return b'{"seq":%d,%s' % (self.seq, self.data[1:])

    def payload(self) -> dict[str, Any]:
        """The event as a dict, ``seq`` included."""
        value: dict[str, Any] = orjson.loads(self.data)
        value["seq"] = self.seq
        return value


# Fast constructors for the hot path (several per streamed event). A frozen dataclass's
# generated __init__ sets each field through ``object.__setattr__`` looked up anew: 0.9 µs
# for four fields, against 0.4 µs through the slots' own descriptors. The classes stay frozen
# for their users; only the construction differs.
_dumps = orjson.dumps
_object_new = object.__new__
_set_new_id = NewEvent.__dict__["event_id"].__set__
_set_new_type = NewEvent.__dict__["type"].__set__
_set_new_data = NewEvent.__dict__["data"].__set__
_set_new_delta = NewEvent.__dict__["text_delta"].__set__
_set_seq = LoggedEvent.__dict__["seq"].__set__
_set_id = LoggedEvent.__dict__["event_id"].__set__
_set_type = LoggedEvent.__dict__["type"].__set__
_set_data = LoggedEvent.__dict__["data"].__set__


def fast_new_event(event_id: str, type: str, data: bytes, text_delta: str | None) -> NewEvent:
    """``NewEvent(event_id, type, data, text_delta)``, built without re-validation."""
    event: NewEvent = _object_new(NewEvent)
    _set_new_id(event, event_id)
    _set_new_type(event, type)
    _set_new_data(event, data)
    _set_new_delta(event, text_delta)
    return event


def fast_logged_event(seq: int, event_id: str, type: str, data: bytes) -> LoggedEvent:
    """``LoggedEvent(seq, event_id, type, data)``, built the fast way."""
    event: LoggedEvent = _object_new(LoggedEvent)
    _set_seq(event, seq)
    _set_id(event, event_id)
    _set_type(event, type)
    _set_data(event, data)
    return event
