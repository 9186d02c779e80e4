"""Small producers and helpers shared by the handler, pump and supervisor tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import orjson

from turnstream import ChatTurnResult, TurnContext


class WordProducer:
    """A fake model: ``words`` text deltas, ``delay`` seconds apart; counts its calls."""

    def __init__(self, words: int = 5, delay: float = 0.0, fail_after: int | None = None) -> None:
        self.words = words
        self.delay = delay
        self.fail_after = fail_after
        self.calls = 0
        self.closed = 0
        self.gate: anyio.Event | None = None

    def expected_text(self) -> str:
        return "".join(f"w{i} " for i in range(self.words))

    async def __call__(self, context: TurnContext) -> AsyncIterator[Mapping[str, Any]]:
        self.calls += 1
        try:
            for i in range(self.words):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("the model broke")
                if self.gate is not None and i == 2:
                    await self.gate.wait()
                if self.delay:
                    await anyio.sleep(self.delay)
                yield {"type": "text-delta", "delta": f"w{i} "}
        finally:
            self.closed += 1


async def collect(result: ChatTurnResult) -> bytes:
    assert not isinstance(result.body, bytes), result.body
    chunks = [chunk async for chunk in result.body]
    return b"".join(chunks)


def ndjson(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text-delta")
