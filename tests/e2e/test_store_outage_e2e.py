"""A worker and a Redis outage, on real processes: the demo starts while Redis is down,
answers 503 problem documents (with ``Retry-After``) until it is back, then serves turns
without a restart; ``/healthz`` (``turnstream.readiness``) says which state it is in.

Redis is a throwaway redis-server of this test, on a free loopback port, stopped by PID and
started again on the same port.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests._redis_process import RedisProcess, redis_binary

from ._server import demo_argv, running

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TOKENS = 5


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    server = RedisProcess(redis_binary())  # a port, nothing listening on it yet
    try:
        yield server
    finally:
        server.stop()


def wait_for_health(client: httpx.Client, status_code: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/healthz").status_code != status_code:
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz did not answer {status_code} within {timeout_s} s")
        time.sleep(0.05)


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["type"] == "https://turnstream.dev/problems/store-unavailable"


def chat(client: httpx.Client, session: str) -> httpx.Response:
    return client.post("/chat", json={"sessionId": session, "turnIndex": 0, "message": "hi"})


def test_a_worker_started_during_an_outage_serves_once_redis_is_back(
    redis_process: RedisProcess,
) -> None:
    session = f"outage-{os.getpid()}-{time.monotonic_ns()}"
    argv = demo_argv("--redis", redis_process.url, tokens=TOKENS, token_delay_ms=0)
    with running("demo-outage", argv) as demo, httpx.Client(
        base_url=demo.base_url, timeout=10
    ) as client:
        # Up, though its store is not: it said so at startup and refuses turns, briefly.
        assert "the turn store is unreachable" in demo.log_tail()
        not_ready = client.get("/healthz")
        assert not_ready.status_code == 503
        assert not_ready.headers["retry-after"] == "1"
        assert_store_unavailable(chat(client, session))
        assert_store_unavailable(client.get(f"/turns/demo%3A{session}%3A0/stream"))

        redis_process.start()
        wait_for_health(client, 200)
        assert client.get("/healthz").json() == {"status": "ready"}
        served = chat(client, session)
        assert served.status_code == 200, served.text
        assert served.headers["x-turn-mode"] == "fresh"
        events = [orjson.loads(line) for line in served.content.splitlines()]
        assert events[-1]["type"] == "session.run.completed"

        # Down again, then back on the same port: the same process follows, unrestarted.
        redis_process.stop()
        wait_for_health(client, 503)
        assert_store_unavailable(chat(client, session + "-b"))
        redis_process.start()
        wait_for_health(client, 200)
        again = chat(client, session + "-b")
        assert again.status_code == 200, again.text
        assert demo.process is not None and demo.process.poll() is None
