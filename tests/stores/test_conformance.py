"""The store conformance suite against every backend: memory, fakeredis and a real Redis server.

One backend's quirks belong in its own test file; this one only says how to build each store.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import fakeredis
import pytest

from turnstream._store import Lease, RunKey, TurnStore
from turnstream.stores import MemoryStore
from turnstream.stores.redis import RedisStore
from turnstream.testing import StoreConformance


class TestStoreConformance(StoreConformance):
    @pytest.fixture(
        params=[
            "memory",
            "fakeredis",
            pytest.param("redis", marks=pytest.mark.redis),
        ]
    )
    async def store(self, request: pytest.FixtureRequest) -> AsyncIterator[TurnStore]:
        # A prefix of its own per test: the real server is shared by the whole session.
        prefix = f"turnstream-test-{uuid.uuid4().hex}"
        if request.param == "memory":
            memory = MemoryStore()
            yield memory
            await memory.aclose()
        elif request.param == "fakeredis":
            server = fakeredis.FakeServer()
            client = fakeredis.FakeAsyncRedis(server=server)
            blocking_client = fakeredis.FakeAsyncRedis(server=server)
            fake = RedisStore(client, prefix=prefix, blocking_client=blocking_client)
            try:
                yield fake
            finally:
                await fake.aclose()
                await blocking_client.aclose()
                await client.aclose()
        else:
            redis_server = request.getfixturevalue("redis_server")
            real = RedisStore.from_url(redis_server.url, prefix=prefix)
            try:
                yield real
            finally:
                await real.aclose()

    async def lapse_lease(self, store: TurnStore, key: RunKey, lease: Lease) -> None:
        if isinstance(store, MemoryStore):
            store.expire_lease(key)  # the memory store's own chaos hook: no sleep needed
        else:
            await super().lapse_lease(store, key, lease)
