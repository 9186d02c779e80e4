"""A store wrapper that fails on command: down, lost replies, black holes.

It wraps any TurnStore and passes every call through, unless told otherwise:

* ``down`` — every call raises StoreUnavailable before reaching the store (Redis refused);
* ``lose_replies[name] = n`` — the next ``n`` calls of ``name`` reach the store, then raise
  StoreUnavailable as if the reply was lost on the way back (the write landed);
* ``black_hole`` — every call hangs until the hole is closed (a stalled network).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from turnstream import StoreUnavailable, TurnStore


class FlakyStore:
    def __init__(self, inner: TurnStore) -> None:
        self.inner = inner
        self.down = False
        self.lose_replies: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._hole: anyio.Event | None = None

    @property
    def black_hole(self) -> bool:
        return self._hole is not None

    @black_hole.setter
    def black_hole(self, on: bool) -> None:
        if on and self._hole is None:
            self._hole = anyio.Event()
        elif not on and self._hole is not None:
            self._hole.set()
            self._hole = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        return self._wrap(name, attribute)

    def _wrap(self, name: str, method: Callable[..., Awaitable[Any]]) -> Any:
        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == "aclose":
                return await method(*args, **kwargs)
            while self._hole is not None:
                await self._hole.wait()
            if self.down:
                self.failures[name] += 1
                raise StoreUnavailable(f"the store is down ({name})")
            result = await method(*args, **kwargs)
            if self.lose_replies[name] > 0:
                self.lose_replies[name] -= 1
                self.failures[name] += 1
                raise StoreUnavailable(f"the reply to {name} was lost")
            return result

        return call
