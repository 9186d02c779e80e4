"""How long a turn stalls when the worker that owns it is SIGKILLed.

Real processes, as in tests/e2e/test_takeover_e2e.py: one reference substrate, one throwaway
redis-server, demo workers A and B (``--redis … --substrate … --lease-ms L``), all on
127.0.0.1 free ports. In every trial two turns start on A, A is SIGKILLed mid-turn, and:

* **reconnect** — one client reconnects to B at once (``GET /turns/{id}/stream`` with
  ``Last-Event-ID``); measured: SIGKILL → the first event on that connection that A had not
  logged (the stall a user sees; events A had logged but not yet delivered come back from
  the log at once and are not counted);
* **sweeper** — nobody asks for the other turn; measured: SIGKILL → its log grows again
  (polled every 5 ms through B's status route), i.e. B's orphan sweeper re-attached.

Both are timed from the same kill. The lease lapses between ``lease - heartbeat`` and
``lease`` after the kill (the last renewal happened up to one heartbeat, ``lease / 3``,
before it); B notices within one follow block or one sweep interval (``lease / 2`` each).

Usage: ``.venv/bin/python bench/takeover.py --trials 20 [--lease-ms 500,1000,2000]``.
Not part of the test suite; see bench/README.md and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e._server import ServerProcess, demo_argv, free_port  # noqa: E402

# Long enough that the run is still going on the substrate when the slowest takeover
# (lease 2000 ms: about 3 s) happens; every turn is cancelled once it has been measured.
SUBSTRATE_TOKENS = 400
SUBSTRATE_DELAY_MS = 20
STEP_S = 30.0  # bound on any one wait
POLL_S = 0.005


# -- processes ----------------------------------------------------------------------------------


class Redis:
    """A throwaway redis-server on a free loopback port (never the shared one on 6379)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench/takeover.py needs a redis-server binary on PATH")
        self.workdir = tempfile.mkdtemp(prefix="turnstream-bench-redis-")
        for _ in range(5):
            self.port = free_port()
            argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", self.workdir]
            self.process = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_until_up():
                self.url = f"redis://127.0.0.1:{self.port}/0"
                return
            self.stop()
        raise SystemExit("could not start a throwaway redis-server")

    def _wait_until_up(self) -> bool:
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def substrate_argv() -> list[str]:
    return [
        sys.executable,
        *"-m turnstream.adapters.orchestrator --host 127.0.0.1 --port {port}".split(),
        *f"--tokens {SUBSTRATE_TOKENS} --token-delay-ms {SUBSTRATE_DELAY_MS}".split(),
        *"--log-level warning".split(),
    ]


def sigkill(server: ServerProcess) -> float:
    """SIGKILL the server; the ``perf_counter`` at the kill."""
    process = server.process
    assert process is not None
    killed_at = time.perf_counter()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=STEP_S)
    return killed_at


# -- one trial ----------------------------------------------------------------------------------


@dataclass
class Trial:
    reconnect_ms: float
    sweeper_ms: float
    logged_at_kill: tuple[int, int]
    modes: list[str] = field(default_factory=list)


def turn_url(base: str, execution_id: str, tail: str = "") -> str:
    return f"{base}/turns/{quote(execution_id, safe='')}{tail}"


async def last_seq(client: httpx.AsyncClient, base: str, execution_id: str) -> int:
    response = await client.get(turn_url(base, execution_id))
    response.raise_for_status()
    seq: int = response.json()["lastSeq"]
    return seq


async def start_turn(
    client: httpx.AsyncClient, a: ServerProcess, session: str
) -> tuple[httpx.Response, Any]:
    body = {"sessionId": session, "turnIndex": 0, "message": f"takeover bench {session}"}
    request = client.build_request("POST", a.base_url + "/chat", json=body)
    response = await client.send(request, stream=True)
    if response.headers.get("x-turn-mode") != "fresh":
        raise RuntimeError(f"expected a fresh turn, got {response.headers}")
    return response, response.aiter_lines()


async def one_trial(
    client: httpx.AsyncClient, a: ServerProcess, b: ServerProcess, rng: random.Random
) -> Trial:
    sessions = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    reconnecting, quiet = (f"demo:{s}:0" for s in sessions)
    cursor = 0
    r_response, r_lines = await start_turn(client, a, sessions[0])
    q_response, q_lines = await start_turn(client, a, sessions[1])
    with anyio.fail_after(STEP_S):
        for _ in range(3):
            cursor = orjson.loads(await anext(r_lines))["seq"]
            await anext(q_lines)
    await q_response.aclose()  # the quiet turn's client leaves; the turn goes on
    await anyio.sleep(rng.uniform(0, 0.2))  # any phase of A's heartbeat

    killed_at = sigkill(a)
    # What A had sent before it died is in the socket: the cursor a client would resume from.
    try:
        with anyio.fail_after(STEP_S):
            async for line in r_lines:
                if line:
                    cursor = orjson.loads(line)["seq"]
    except httpx.HTTPError:
        pass
    await r_response.aclose()
    logged = (
        await last_seq(client, b.base_url, reconnecting),
        await last_seq(client, b.base_url, quiet),
    )
    reconnect_s = sweeper_s = math.nan
    modes: list[str] = []

    async def reconnect() -> None:
        nonlocal reconnect_s
        headers = {"Last-Event-ID": str(cursor)}
        url = turn_url(b.base_url, reconnecting, "/stream")
        async with client.stream("GET", url, headers=headers) as response:
            modes.append(response.headers["x-turn-mode"])
            async for line in response.aiter_lines():
                if line and orjson.loads(line)["seq"] > logged[0]:
                    reconnect_s = time.perf_counter() - killed_at
                    return

    async def sweeper() -> None:
        nonlocal sweeper_s
        # Polling another process's store: there is no event here to wait on.
        while await last_seq(client, b.base_url, quiet) <= logged[1]:  # noqa: ASYNC110
            await anyio.sleep(POLL_S)
        sweeper_s = time.perf_counter() - killed_at

    with anyio.fail_after(STEP_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reconnect)
            tg.start_soon(sweeper)
    # Measured: stop both runs so that the substrate is idle for the next trial.
    for execution_id in (reconnecting, quiet):
        await client.post(turn_url(b.base_url, execution_id, "/cancel"), json={})
    return Trial(reconnect_s * 1000, sweeper_s * 1000, logged, modes)


# -- the run ------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least ``p`` % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def summary(values: list[float], lease_ms: int) -> dict[str, float]:
    figures = {
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "max": max(values),
    }
    return {**figures, **{f"{k}/lease": v / lease_ms for k, v in figures.items()}}


def print_row(label: str, lease_ms: int, values: list[float]) -> None:
    s = summary(values, lease_ms)
    ms = "  ".join(f"{s[k]:7.0f}" for k in ("min", "median", "p95", "max"))
    ratio = "  ".join(f"{s[k + '/lease']:5.2f}" for k in ("min", "median", "p95", "max"))
    print(f"{lease_ms:>8}  {label:<9} {len(values):>3}  {ms}    {ratio}", flush=True)


async def bench_lease(
    lease_ms: int, trials: int, redis: Redis, substrate: ServerProcess, rng: random.Random
) -> list[Trial]:
    argv = demo_argv(
        "--redis", redis.url, "--substrate", substrate.base_url, "--lease-ms", str(lease_ms)
    )
    a = ServerProcess(f"bench-a-{lease_ms}", argv)
    b = ServerProcess(f"bench-b-{lease_ms}", argv)
    results: list[Trial] = []
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
    try:
        await anyio.to_thread.run_sync(b.start)
        async with httpx.AsyncClient(timeout=httpx.Timeout(STEP_S), limits=limits) as client:
            for _ in range(trials):
                await anyio.to_thread.run_sync(a.start)
                results.append(await one_trial(client, a, b, rng))
    finally:
        a.close()
        b.close()
    return results


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per lease (default 20)")
    parser.add_argument(
        "--lease-ms",
        default="500,1000,2000",
        help="comma-separated lease lengths in ms (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill phases")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    args = parser.parse_args(argv)
    leases = [int(x) for x in args.lease_ms.split(",")]
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(seed)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"seed {seed}, {args.trials} trials per lease"
    )
    print("lease_ms  client    n      min   median      p95      max    (ms; then / lease)")
    redis = Redis()
    substrate = ServerProcess("bench-substrate", substrate_argv(), health_path="/agents/runs")
    report: dict[str, Any] = {"seed": seed, "leases": {}}
    try:
        await anyio.to_thread.run_sync(substrate.start)
        for lease_ms in leases:
            trials = await bench_lease(lease_ms, args.trials, redis, substrate, rng)
            print_row("reconnect", lease_ms, [t.reconnect_ms for t in trials])
            print_row("sweeper", lease_ms, [t.sweeper_ms for t in trials])
            report["leases"][lease_ms] = [t.__dict__ for t in trials]
    finally:
        substrate.close()
        redis.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
