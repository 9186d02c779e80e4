"""The turn's text: the fold of its log (docs/lifecycle.md), as the pump keeps it up to date.

With the default fold (``accumulate_text_deltas``) each delta is appended to a list and the
text joined when asked for: a turn of n deltas costs O(n), where ``text + delta`` each time
would cost O(n²) (100,000 deltas: seconds of copying). A custom ``accumulate`` gets the
text and each event's payload, as documented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ._events import RESTARTED, TEXT_DELTA, LoggedEvent
from ._hooks import TextAccumulator, accumulate_text_deltas

__all__ = ["TextFold"]


class TextFold:
    def __init__(self, accumulate: TextAccumulator) -> None:
        self._accumulate = accumulate
        self._default = accumulate is accumulate_text_deltas
        self._parts: list[str] = []
        self._text = ""

    @property
    def text(self) -> str:
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def reset(self) -> None:
        """A restarted attempt's text replaces the dead attempt's."""
        self._parts.clear()
        self._text = ""

    def add(self, event: LoggedEvent, text_delta: str | None = None) -> None:
        """Fold one logged event; ``text_delta`` is its delta when the caller already knows
        it (the pump does, for the events it built), so nothing is parsed again."""
        if event.type == RESTARTED:
            self.reset()
            return
        if self._default:
            if event.type != TEXT_DELTA:
                return
            if text_delta is None:
                delta = orjson.loads(event.data).get("delta")
                text_delta = delta if isinstance(delta, str) else None
            if text_delta:
                self._parts.append(text_delta)
            return
        payload: Mapping[str, Any] = orjson.loads(event.data)
        self._text = self._accumulate(self.text, payload)
