"""turnstream.readiness: ready when the supervisor runs and the store answers a ping in time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from tests._redis_process import RedisProcess, free_port, redis_binary
from turnstream import MemoryStore, ReadinessCheck, RedisStore, Supervisor, readiness
from turnstream._store import TurnStore

PROBLEMS = "https://turnstream.dev/problems/"


class HungStore(MemoryStore):
    """A store whose ping never answers: a black-holed Redis host."""

    async def ping(self) -> None:
        await anyio.sleep_forever()


class BrokenStore(MemoryStore):
    """A store whose ping breaks its contract."""

    async def ping(self) -> None:
        raise RuntimeError("store is closed")


def client_for(check: ReadinessCheck) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/readyz", check, methods=["GET", "HEAD"])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(MemoryStore(), lease_ms=2000)
    try:
        yield supervisor
    finally:
        await supervisor.aclose()


def assert_not_ready(response: httpx.Response, slug: str, retry_after: str = "1") -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == retry_after
    assert response.headers["cache-control"] == "no-store"
    document = response.json()
    assert document["status"] == 503
    assert document["type"] == PROBLEMS + slug


async def test_ready_only_while_the_supervisor_runs(supervisor: Supervisor) -> None:
    async with client_for(readiness(supervisor)) as client:
        assert_not_ready(await client.get("/readyz"), "not-ready")
        await supervisor.start()
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready"}
        assert ready.headers["cache-control"] == "no-store"
        assert (await client.head("/readyz")).status_code == 200
        await supervisor.aclose()
        # Stopped: out of rotation, and the check does not start it again.
        assert_not_ready(await client.get("/readyz"), "not-ready")
        assert not supervisor.started


async def test_a_hung_store_is_not_ready_within_the_timeout() -> None:
    async with Supervisor(HungStore(), lease_ms=2000) as supervisor:
        async with client_for(readiness(supervisor, timeout_s=0.1, retry_after=5)) as client:
            started = anyio.current_time()
            response = await client.get("/readyz")
            took = anyio.current_time() - started
    assert_not_ready(response, "store-unavailable", retry_after="5")
    assert took < 1.0, took


async def test_a_store_that_breaks_its_contract_is_not_ready_not_a_500() -> None:
    async with Supervisor(BrokenStore(), lease_ms=2000) as supervisor:
        async with client_for(readiness(supervisor)) as client:
            assert_not_ready(await client.get("/readyz"), "store-unavailable")


async def test_the_not_ready_document_says_nothing_of_the_store() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        async with Supervisor(store, lease_ms=2000) as supervisor:
            async with client_for(readiness(supervisor)) as client:
                response = await client.get("/readyz")
    finally:
        await store.aclose()
    assert_not_ready(response, "store-unavailable")
    # The same fixed document a turn route answers: no host, no port, no redis-py text.
    assert response.json() == {
        "type": PROBLEMS + "store-unavailable",
        "title": "Store unavailable",
        "status": 503,
        "detail": "The turn store cannot be reached right now; retry later.",
    }


async def test_a_redis_store_on_a_closed_port_is_not_ready_quickly() -> None:
    # The store's own defaults (connect timeout, retries with backoff): refused at once, so
    # the answer comes well within the check's timeout.
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        async with Supervisor(store, lease_ms=2000) as supervisor:
            async with client_for(readiness(supervisor)) as client:
                started = anyio.current_time()
                response = await client.get("/readyz")
                took = anyio.current_time() - started
    finally:
        await store.aclose()
    assert_not_ready(response, "store-unavailable")
    assert took < 2.0, took


async def test_other_methods_are_a_405(supervisor: Supervisor) -> None:
    check = readiness(supervisor)
    app = Starlette(routes=[Route("/readyz", check)])  # no methods=: the check decides
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/readyz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("nan")])
def test_the_timeout_must_be_positive(supervisor: Supervisor, timeout_s: float) -> None:
    with pytest.raises(ValueError):
        readiness(supervisor, timeout_s=timeout_s)


async def test_problem_is_usable_without_asgi(supervisor: Supervisor) -> None:
    # What a Django view would do: ask, and answer with its own response type.
    check = readiness(supervisor)
    problem = await check.problem()
    assert problem is not None and problem.status_code == 503
    await supervisor.start()
    assert await check.problem() is None


# -- a real store going away and coming back --------------------------------------------------


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    server = RedisProcess(redis_binary())
    try:
        yield server
    finally:
        server.stop()


async def wait_for_status(client: httpx.AsyncClient, status: int, timeout_s: float = 10) -> Any:
    with anyio.fail_after(timeout_s):
        while True:
            response = await client.get("/readyz")
            if response.status_code == status:
                return response
            await anyio.sleep(0.05)


@pytest.mark.redis
async def test_readiness_follows_a_real_redis_down_and_back(redis_process: RedisProcess) -> None:
    redis_process.start()
    store: TurnStore = RedisStore.from_url(redis_process.url)
    try:
        async with Supervisor(store, lease_ms=2000) as supervisor:
            async with client_for(readiness(supervisor)) as client:
                assert (await client.get("/readyz")).status_code == 200
                redis_process.stop()
                assert_not_ready(await wait_for_status(client, 503), "store-unavailable")
                redis_process.start()  # the same port: the store's clients reconnect
                ready = await wait_for_status(client, 200)
                assert ready.json() == {"status": "ready"}
                assert supervisor.started  # nothing was restarted
    finally:
        await store.aclose()
