"""Store implementations: ``MemoryStore`` (embedded) and ``RedisStore`` (production)."""

from ._memory import MemoryStore
from .redis import RedisSettings, RedisStore

__all__ = ["MemoryStore", "RedisSettings", "RedisStore"]
