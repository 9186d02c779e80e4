"""Store implementations: ``MemoryStore`` (embedded) and ``RedisStore`` (production)."""

from typing import TYPE_CHECKING

from ._memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisSettings, RedisStore

__all__ = ["MemoryStore", "RedisSettings", "RedisStore"]


def __getattr__(name: str) -> object:
    # The Redis store pulls in redis-py; `import turnstream` must not (see turnstream.__getattr__).
    if name in ("RedisSettings", "RedisStore"):
        from . import redis

        return getattr(redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
