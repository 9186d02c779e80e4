"""The demo's controls, in process: the speed of a turn, the page's settings, the worker header,
and the kill button's routes with their refusals (the real SIGKILL of a worker is the browser
test's: ``tests/browser/test_browser_e2e.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from turnstream._demo import create_demo_app, fake_reply
from turnstream._demo._serve import CONFIG_ENV, is_loopback
from turnstream._demo._workers import WorkerRegistry

JSON = {"Content-Type": "application/json"}
EXECUTION_ID = "demo:s1:0"


def body(message: str = "hello there") -> dict[str, Any]:
    return {"sessionId": "s1", "turnIndex": 0, "message": message}


def url(tail: str = "", prefix: str = "/turns/") -> str:
    return prefix + quote(EXECUTION_ID, safe="") + tail


def deltas(content: bytes) -> list[str]:
    events = [orjson.loads(line) for line in content.splitlines()]
    return [e["delta"] for e in events if e["type"] == "text-delta"]


async def make_client(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_demo_app(**options)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo.test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
    finally:
        await app.state.supervisor.aclose()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for c in make_client(tokens=4, token_delay_ms=0):
        yield c


@pytest.fixture
async def workers_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # Slow enough that a turn is still running while the test asks about its owner.
    async for c in make_client(tokens=300, token_delay_ms=10, registry_dir=str(tmp_path)):
        yield c


# -- the speed of a turn ----------------------------------------------------------------------


async def test_a_turn_runs_at_the_speed_it_was_posted_with(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat?tokens=9&tokenDelayMs=0", json=body())
    assert response.status_code == 200
    assert deltas(response.content) == fake_reply("hello there", 9)
    # Without a speed: the server's (4 words). Another turn, since the speed is its input.
    other = await client.post("/chat", json={**body(), "turnIndex": 1})
    assert deltas(other.content) == fake_reply("hello there", 4)
    # The same turn at another speed is another input: a conflict, not a second reply.
    again = await client.post("/chat?tokens=3&tokenDelayMs=0", json=body())
    assert again.status_code == 409


@pytest.mark.parametrize(
    "query, field",
    [
        ("tokens=9", "tokenDelayMs"),
        ("tokenDelayMs=9", "tokens"),
        ("tokens=-1&tokenDelayMs=0", "tokens"),
        ("tokens=2001&tokenDelayMs=0", "tokens"),
        ("tokens=1&tokenDelayMs=5001", "tokenDelayMs"),
        ("tokens=1e3&tokenDelayMs=0", "tokens"),
        ("tokens=%D9%A3&tokenDelayMs=0", "tokens"),  # an Arabic-Indic digit is no ASCII one
    ],
)
async def test_a_bad_speed_is_a_400_naming_it(
    client: httpx.AsyncClient, query: str, field: str
) -> None:
    response = await client.post(f"/chat?{query}", json=body())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert field in response.text


async def test_config_tells_the_page_its_settings(client: httpx.AsyncClient) -> None:
    config = (await client.get("/demo/config")).json()
    assert config["tokens"] == 4 and config["tokenDelayMs"] == 0
    assert config["speedControl"] is True
    assert (config["workers"], config["kill"]) == (1, False)
    assert config["worker"] == os.getpid()


async def test_every_answer_names_its_worker(client: httpx.AsyncClient) -> None:
    await client.post("/chat", json=body())
    for path in ("/", "/healthz", url(), url("/stream"), "/no-such-page"):
        response = await client.get(path)
        assert response.headers["x-demo-worker"] == str(os.getpid()), path


# -- several workers: the owner and the kill routes -------------------------------------------


async def test_without_several_workers_there_is_no_kill_route(client: httpx.AsyncClient) -> None:
    await client.post("/chat", json=body())
    assert (await client.get(url("/owner", "/demo/turns/"))).status_code == 404
    kill = await client.post(url("/kill", "/demo/turns/"), json={})
    assert kill.status_code == 404


async def _start_a_slow_turn(client: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    # ASGITransport buffers whole responses: the turn is driven from a background task.
    turn = asyncio.create_task(client.post("/chat", json=body()))
    for _ in range(500):
        status = await client.get(url())
        if status.status_code == 200 and status.json()["lastSeq"] >= 2:
            return turn
        await asyncio.sleep(0.01)
    raise AssertionError("the turn never went live")


async def test_the_owner_route_names_the_registered_worker(
    workers_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    client = workers_client
    supervisor = client.app.state.supervisor  # type: ignore[attr-defined]
    turn = await _start_a_slow_turn(client)
    owner = (await client.get(url("/owner", "/demo/turns/"))).json()
    # Not registered yet (the lifespan registers, and ASGITransport runs none): no PID.
    assert (owner["workerId"], owner["pid"]) == (supervisor.worker_id, None)
    WorkerRegistry(tmp_path).register(supervisor.worker_id)
    owner = (await client.get(url("/owner", "/demo/turns/"))).json()
    assert (owner["pid"], owner["attempt"], owner["status"]) == (os.getpid(), 1, "running")
    # Another user's turn is not theirs to look at, nor to kill.
    bob = {"X-Demo-User": "bob"}
    assert (await client.get(url("/owner", "/demo/turns/"), headers=bob)).status_code == 404
    kill = await client.post(url("/kill", "/demo/turns/"), json={}, headers=bob)
    assert kill.status_code == 404
    # Only a JSON POST (a cross-site form cannot send one without a preflight).
    form = await client.post(url("/kill", "/demo/turns/"), content=b"{}")
    assert form.status_code == 415
    await client.post(url("/cancel"), json={})
    await turn
    # A finished turn has no owner to kill.
    ended = await client.post(url("/kill", "/demo/turns/"), json={})
    assert ended.status_code == 409
    assert "ended" in ended.json()["detail"]


@pytest.fixture
def bystander() -> Any:
    """A process that is ours (our child), not a worker beside us: never to be killed."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _forge(directory: Path, **changes: object) -> None:
    """Rewrite the registry's one entry with ``changes``."""
    (path,) = directory.glob("*.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_registry_knows_only_live_sibling_workers(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    registry = WorkerRegistry(tmp_path)
    registry.register("w1")
    assert registry.pid_of("w1") == os.getpid()  # as a worker sees itself
    assert registry.pid_of("w2") is None
    _forge(tmp_path, pid=bystander.pid)  # a reused PID: alive, but not our parent's child
    assert registry.pid_of("w1") is None
    _forge(tmp_path, pid=2**22 + 12345)  # above Linux's pid_max: no such process
    assert registry.pid_of("w1") is None
    _forge(tmp_path, pid=os.getpid(), workerId="w2")  # filed under another worker's name
    assert registry.pid_of("w1") is None
    registry.unregister("w1")
    assert list(tmp_path.iterdir()) == []


async def test_the_kill_route_refuses_a_pid_that_is_no_sibling_worker(
    workers_client: httpx.AsyncClient, tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    client = workers_client
    supervisor = client.app.state.supervisor  # type: ignore[attr-defined]
    turn = await _start_a_slow_turn(client)
    try:
        WorkerRegistry(tmp_path).register(supervisor.worker_id)
        _forge(tmp_path, pid=bystander.pid)
        kill = await client.post(url("/kill", "/demo/turns/"), json={})
        assert kill.status_code == 409
        assert "no live demo worker" in kill.json()["detail"]
        assert bystander.poll() is None
    finally:
        await client.post(url("/cancel"), json={})
        await turn


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--workers", "2"],  # a memory store per worker could take nothing over
        ["demo", "--workers", "0", "--redis", "redis://127.0.0.1:1/0"],
        ["demo", "--workers", "17", "--redis", "redis://127.0.0.1:1/0"],
    ],
)
def test_cli_refuses_bad_workers(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from turnstream.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_serves_several_workers_through_an_app_factory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    from turnstream.__main__ import main

    runs: list[tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]] = []

    def fake_run(*args: Any, **kwargs: Any) -> None:
        settings = json.loads(os.environ[CONFIG_ENV])
        if settings["registry_dir"] is not None:
            assert Path(settings["registry_dir"]).is_dir()  # made for the run
        runs.append((args, kwargs, settings))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv(CONFIG_ENV, "")  # restored (removed) after the test
    redis = "redis://127.0.0.1:1/0"
    assert main(["demo", "--workers", "2", "--redis", redis, "--lease-ms", "900"]) == 0
    assert main(["demo", "--workers", "3", "--redis", redis, "--host", "0.0.0.0"]) == 0
    (args, kwargs, settings), (_, public_kwargs, public_settings) = runs
    assert args == ("turnstream._demo._serve:app_from_env",)
    assert kwargs["factory"] is True and kwargs["workers"] == 2
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8000)
    assert settings["redis_url"] == redis and settings["lease_ms"] == 900
    assert settings["workers"] == 2
    assert not Path(settings["registry_dir"]).exists()  # removed after the run
    # Not on a loopback address: no kill button.
    assert public_kwargs["workers"] == 3 and public_settings["registry_dir"] is None


def test_the_default_reply_lasts_long_enough_to_reload_mid_turn() -> None:
    from turnstream.__main__ import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.tokens * args.token_delay_ms >= 5000


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("h", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
