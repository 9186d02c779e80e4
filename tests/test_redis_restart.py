"""A real Redis killed and restarted mid-turn (AOF, fsync always): the turn goes on.

The regression this guards: a worker on Redis with ``lease_ms=1500`` whose Redis was
SIGKILLed 0.8 s into a turn and restarted 0.5 s later left the run ``running`` with no
terminal event, and the next retry restarted it, calling the model a second time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import anyio
import pytest

from tests._helpers import WordProducer, collect, ndjson, text_of
from tests._redis_process import RedisProcess, redis_binary
from turnstream import RedisStore, RunKey, RunStatus, Supervisor, TurnIdentity, handle_chat_turn
from turnstream._framing import StreamFormat

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_aof() -> Iterator[RedisProcess]:
    server = RedisProcess(redis_binary(), aof=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("fmt", [StreamFormat.NDJSON, StreamFormat.SSE])
async def test_a_redis_restart_mid_turn_loses_nothing_and_calls_the_model_once(
    redis_aof: RedisProcess, fmt: StreamFormat
) -> None:
    identity = TurnIdentity("t1", "proj", f"s-{uuid.uuid4().hex}", "u1", 0)
    key = RunKey("t1", identity.execution_id, "u1")
    producer = WordProducer(words=40, delay=0.05)
    store = RedisStore.from_url(redis_aof.url, prefix=f"restart-{uuid.uuid4().hex[:8]}")
    try:
        async with Supervisor(store, lease_ms=1500) as supervisor:
            result = await handle_chat_turn(
                identity, {"m": 1}, supervisor=supervisor, produce=producer, format=fmt.value
            )
            await anyio.sleep(0.8)
            redis_aof.kill()
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(redis_aof.start)  # AOF brings the log back
            with anyio.fail_after(20):
                body = await collect(result)
            run = await store.get_run(key)
            replay = ndjson(await collect(
                await handle_chat_turn(identity, {"m": 1}, supervisor=supervisor, produce=producer)
            ))
    finally:
        await store.aclose()
    assert run is not None and run.status is RunStatus.COMPLETED
    assert producer.calls == 1
    assert [e["seq"] for e in replay] == list(range(1, len(replay) + 1))
    assert replay[-1]["type"] == "session.run.completed"
    assert text_of(replay) == producer.expected_text() == replay[-1]["finalText"]
    if fmt is StreamFormat.NDJSON:
        assert ndjson(body) == replay  # what the client saw, exactly once each
    else:
        ids = [int(line[4:]) for line in body.decode().splitlines() if line.startswith("id: ")]
        assert ids == list(range(1, len(replay) + 1))
