"""Redaction: secrets a producer or substrate emits never reach the store, the wire or the logs.

``Supervisor(redact=Redact(keys=["api_key", "authorization"], patterns=[r"sk-[A-Za-z0-9]{20,}"]))``
masks, in every event before it is logged (and so before any client or log line sees it):

* the value of every mapping key whose name is one of ``keys`` (case-insensitive, at any
  depth: ``{"tool": {"input": {"API_KEY": …}}}`` too), whatever the value is;
* every match of one of ``patterns`` inside any string value, at any depth.

Masking happens where the event enters turnstream, so the log, the checkpointed final text,
the live fan-out, replays and the ``on_event`` hook all see the masked event. The turn's
*input* is never stored or logged by turnstream (only its hash, taken from the input as given,
so a retry still matches); it is handed to the producer or adapter as it is, since the model
needs it.

What it cannot do: a secret split across two events (``"sk-12"`` in one text delta, the rest
in the next) matches no pattern in either. Mask at the source when a model may spell one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["Redact"]

DEFAULT_MASK: Final = "[redacted]"


class Redact:
    """What to mask in events (see the module docs). Immutable; cheap to call on an event
    that holds nothing to mask (one dict walk and one regex search per string)."""

    __slots__ = ("_keys", "_pattern", "keys", "mask", "patterns")

    def __init__(
        self,
        *,
        keys: Iterable[str] = (),
        patterns: Iterable[str | re.Pattern[str]] = (),
        mask: str = DEFAULT_MASK,
    ) -> None:
        self.keys = tuple(keys)
        self.patterns = tuple(patterns)
        self.mask = mask
        if not self.keys and not self.patterns:
            raise ValueError("Redact needs keys or patterns to mask")
        for key in self.keys:
            if not isinstance(key, str) or not key:
                raise ValueError(f"a key to redact must be a non-empty string, not {key!r}")
        self._keys = frozenset(key.casefold() for key in self.keys)
        compiled = [re.compile(p) if isinstance(p, str) else p for p in self.patterns]
        for pattern in compiled:
            if pattern.search(""):
                # It would mask between every two characters: a configuration error.
                raise ValueError(f"a pattern to redact matches the empty string: {pattern!r}")
        # One alternation: one scan per string instead of one per pattern.
        self._pattern = (
            re.compile("|".join(f"(?:{p.pattern})" for p in compiled)) if compiled else None
        )

    def __repr__(self) -> str:
        return f"Redact(keys={list(self.keys)!r}, patterns={list(self.patterns)!r})"

    def __call__(self, value: Any) -> Any:
        """``value`` with what is configured masked; ``value`` itself when nothing matched."""
        masked, changed = self._walk(value)
        return masked if changed else value

    def _walk(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, str):
            if self._pattern is None:
                return value, False
            masked, count = self._pattern.subn(self.mask, value)
            return masked, count > 0
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            changed = False
            for key, item in value.items():
                if isinstance(key, str) and key.casefold() in self._keys:
                    out[key] = self.mask
                    changed = True
                    continue
                out[key], item_changed = self._walk(item)
                changed = changed or item_changed
            return out, changed
        if isinstance(value, (list, tuple)):
            items = [self._walk(item) for item in value]
            if any(changed for _, changed in items):
                return [item for item, _ in items], True
            return value, False
        return value, False
