"""The Redis store: ``RedisStore`` and the ``RedisSettings`` its ``from_url`` uses."""

from ._settings import RedisSettings
from ._store import RedisStore

__all__ = ["RedisSettings", "RedisStore"]
