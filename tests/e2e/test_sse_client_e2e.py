"""A Python SSE client (httpx-sse) against the demo on real uvicorn: start a turn with
``POST /chat?format=sse``, drop the connection after a few events, resume with
``GET /turns/{id}/stream`` and ``Last-Event-ID``; the whole text arrives exactly once."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from turnstream._demo import fake_reply

from ._server import ServerProcess, demo_argv, running

pytestmark = pytest.mark.e2e

TOKENS = 60
MESSAGE = "a python client drops the stream and picks it up where it left off"


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    with running("demo-sse", demo_argv(tokens=TOKENS, token_delay_ms=20)) as server:
        yield server


def check(sse: ServerSentEvent) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(sse.data)
    assert sse.id == str(data["seq"])  # the SSE id is the seq: Last-Event-ID is the cursor
    assert sse.event == data["type"]
    return data


@pytest.mark.parametrize("resume_when", ["live", "finished"])
async def test_drop_and_resume_with_last_event_id(demo: ServerProcess, resume_when: str) -> None:
    session = f"sse-{os.getpid()}-{time.monotonic_ns()}"
    body = {"sessionId": session, "turnIndex": 0, "message": MESSAGE}
    received: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=demo.base_url, timeout=10) as client:
        async with aconnect_sse(client, "POST", "/chat?format=sse", json=body) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            assert source.response.headers["x-turn-mode"] == "fresh"
            execution_id = source.response.headers["x-execution-id"]
            async for sse in source.aiter_sse():
                received.append(check(sse))
                if len(received) == 5:
                    break  # leaving the block drops the connection mid-turn
        last_event_id = str(received[-1]["seq"])
        status_url = "/turns/" + quote(execution_id, safe="")

        status = (await client.get(status_url)).json()
        if resume_when == "live":
            assert status["status"] == "running"
        else:
            for _ in range(500):  # bounded: 10 s
                if status["status"] != "running":
                    break
                await asyncio.sleep(0.02)
                status = (await client.get(status_url)).json()
            assert status["status"] == "completed"

        async with aconnect_sse(
            client, "GET", status_url + "/stream", headers={"Last-Event-ID": last_event_id}
        ) as source:
            assert source.response.status_code == 200
            expected_mode = "joined" if resume_when == "live" else "replayed"
            assert source.response.headers["x-turn-mode"] == expected_mode
            async for sse in source.aiter_sse():
                received.append(check(sse))

    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))
    assert received[0]["type"] == "session.run.started"
    assert received[-1]["type"] == "session.run.completed"
    deltas = [e["delta"] for e in received if e["type"] == "text-delta"]
    assert deltas == fake_reply(MESSAGE, TOKENS)
    assert received[-1]["finalText"] == "".join(deltas)
    async with httpx.AsyncClient(base_url=demo.base_url, timeout=10) as client:
        calls = await client.get("/debug/producer-calls", params={"executionId": execution_id})
        assert calls.json()["calls"] == 1
