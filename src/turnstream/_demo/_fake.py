"""The demo's fake model: a deterministic reply, its speed, and a count of its calls."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .._exceptions import InvalidTurnInput
from .._store import RunKey

__all__ = ["MAX_TOKENS", "MAX_TOKEN_DELAY_MS", "ProducerCalls", "Speed", "fake_reply"]

# 64 words, so two digest bytes modulo 64 pick each word without bias.
VOCABULARY: Final = tuple(
    "turn stream log lease pump reader replay resume event cursor worker redis durable "
    "fenced idempotent ordered the a every each one no never always is was keeps joins "
    "writes reads ends starts quietly exactly once again later now still here and but so "
    "then because while after before client server token message session tenant model "
    "answer bright calm steady small whole gentle honest simple".split()
)
# The page's speed control may ask for this much at most: a turn of a few minutes, not a
# way to keep a worker busy for a day.
MAX_TOKENS: Final = 2000
MAX_TOKEN_DELAY_MS: Final = 5000


def fake_reply(message: str, tokens: int) -> list[str]:
    """The fake model's reply to ``message``: ``tokens`` words, each followed by a space.

    Deterministic: the words are drawn from a SHAKE-256 digest of the message, so the same
    message always gets the same reply (in any process, on any Python).
    """
    if tokens < 0:
        raise ValueError("tokens must not be negative")
    digest = hashlib.shake_256(message.encode("utf-8", "surrogatepass")).digest(2 * tokens)
    return [
        VOCABULARY[int.from_bytes(digest[2 * i : 2 * i + 2], "big") % len(VOCABULARY)] + " "
        for i in range(tokens)
    ]


@dataclass(frozen=True, slots=True)
class Speed:
    """How long a reply is (``tokens`` words) and how fast it comes (a word per delay)."""

    tokens: int
    token_delay_ms: int

    def to_input(self) -> dict[str, int]:
        return {"tokens": self.tokens, "tokenDelayMs": self.token_delay_ms}

    @classmethod
    def from_input(cls, turn_input: Mapping[str, Any], default: Speed) -> Speed:
        """The speed a turn was posted with (it is part of the turn's input, so a worker
        that restarts the turn after its owner died replays it at the same speed)."""
        tokens = turn_input.get("tokens", default.tokens)
        delay = turn_input.get("tokenDelayMs", default.token_delay_ms)
        return cls(int(tokens), int(delay))

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Speed | None:
        """``?tokens=N&tokenDelayMs=MS`` (both or neither), or None for the server's default.

        Bounded, and a 400 problem naming the parameter otherwise."""
        if "tokens" not in query and "tokenDelayMs" not in query:
            return None
        values: list[int] = []
        for name, maximum in (("tokens", MAX_TOKENS), ("tokenDelayMs", MAX_TOKEN_DELAY_MS)):
            text = query.get(name)
            if text is None or not text.isascii() or not text.isdigit() or len(text) > 6:
                raise InvalidTurnInput(f"{name} must be given as an integer", field=name)
            value = int(text)
            if value > maximum:
                raise InvalidTurnInput(f"{name} must be at most {maximum}", field=name)
            values.append(value)
        return cls(values[0], values[1])


class ProducerCalls:
    """How many times the fake model started in this process, in total and per run.

    This is the demo's witness that a replay or a join never prompts the model again: the
    producer records itself when its first step runs, which is exactly when a real app would
    call its LLM. The per-run counts keep the ``max_runs`` most recently started runs only
    (bounded memory); ``total`` counts every start.
    """

    def __init__(self, *, max_runs: int = 4096) -> None:
        self.total = 0
        self.max_runs = max_runs
        self._by_run: OrderedDict[RunKey, int] = OrderedDict()

    def record(self, key: RunKey) -> None:
        self.total += 1
        self._by_run[key] = self._by_run.get(key, 0) + 1
        self._by_run.move_to_end(key)
        while len(self._by_run) > self.max_runs:
            self._by_run.popitem(last=False)

    def count(self, key: RunKey) -> int:
        return self._by_run.get(key, 0)
