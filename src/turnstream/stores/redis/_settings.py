"""How :meth:`RedisStore.from_url` builds its clients: one frozen value, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from ._keys import DEFAULT_PREFIX, check_prefix

__all__ = ["DEFAULT_RETENTION_MS", "DEFAULT_RUNNING_TTL_MS", "RedisSettings"]

DEFAULT_RETENTION_MS: Final = 24 * 3600 * 1000
DEFAULT_RUNNING_TTL_MS: Final = 24 * 3600 * 1000
_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Connection and layout settings of a :class:`RedisStore` built by ``from_url``.

    ``max_block_ms`` bounds one ``XREAD BLOCK`` of :meth:`RedisStore.follow` (a longer
    ``block_ms`` waits this long and returns empty, which a follower treats as "nothing yet").
    The blocking connection pool gets ``socket_timeout = max_block_ms + block_socket_margin``
    so a block that runs its full course is never cut short by the socket.

    The store has three pools, each bounded, each *waiting* up to ``pool_timeout_s`` for a
    free connection rather than failing at once: ``max_connections`` for requests (begin,
    claim, reads, status), ``write_connections`` for the pumps' writes (appends are batched
    across all runs of the process, so a few suffice), ``follow_connections`` for blocking
    reads (shared by every follower of the process: one ``XREAD BLOCK`` watches up to 512
    runs' logs).
    """

    url: str = "redis://localhost:6379/0"
    prefix: str = DEFAULT_PREFIX
    retention_ms: int = DEFAULT_RETENTION_MS  # a finished run is kept this long
    running_ttl_ms: int = DEFAULT_RUNNING_TTL_MS  # an unfinished one, after its last lease write
    socket_timeout_s: float | None = 5.0  # every command but the blocking read
    connect_timeout_s: float = 5.0
    max_block_ms: int = 30_000
    block_socket_margin_s: float = 5.0
    max_connections: int = 64
    write_connections: int = 4
    follow_connections: int = 4  # each one XREAD BLOCK listing up to 512 runs' logs
    pool_timeout_s: float = 5.0
    # Resends after a connection error or timeout, with jittered backoff from 10 ms up to
    # 500 ms. Every script is safe to resend. Kept low on purpose: redis-py's own default
    # (10) turns an unresponsive server into a minute-long wait behind each request.
    retries: int = 2

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(
                f"a Redis URL starts with redis://, rediss:// or unix://, not {scheme or '…'}://"
            )
        check_prefix(self.prefix)
        if self.retention_ms < 0:
            raise ValueError("retention_ms must not be negative")
        if self.socket_timeout_s is not None and self.socket_timeout_s <= 0:
            raise ValueError("socket_timeout_s must be positive (or None for no timeout)")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be positive")
        if self.max_block_ms <= 0:
            raise ValueError("max_block_ms must be positive")
        if self.block_socket_margin_s <= 0:
            raise ValueError("block_socket_margin_s must be positive")
        for name in ("max_connections", "write_connections", "follow_connections"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer of at least 1")
        if self.pool_timeout_s <= 0:
            raise ValueError("pool_timeout_s must be positive")
        if self.running_ttl_ms <= 0:
            raise ValueError("running_ttl_ms must be positive")
        if self.retries < 0:
            raise ValueError("retries must not be negative")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RedisSettings:
        """Settings for ``url`` (``redis://[[user]:password@]host[:port][/db]``, ``rediss://``,
        ``unix://``), every other field defaulted unless given in ``overrides``."""
        return cls(url=url, **overrides)

    def replace(self, **changes: Any) -> RedisSettings:
        return dataclasses.replace(self, **changes)

    @property
    def blocking_socket_timeout_s(self) -> float:
        return self.max_block_ms / 1000 + self.block_socket_margin_s
