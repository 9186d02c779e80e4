"""The processes of a chaos run: one redis-server (AOF), a fault proxy in front of it per
worker, the reference substrate and two workers of the app under test, all on 127.0.0.1
free ports.

Each worker reaches Redis through its own proxy (so one worker can be cut off while the other
is not); the checker reads Redis directly. A worker is a real
uvicorn process (tests/e2e/_server.py) that the scenarios SIGKILL, SIGSTOP and start again,
each start with its own ``TURNSTREAM_FAULTS``. Every process is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from e2e._server import ServerProcess

from ._proxy import FaultProxy
from ._redis import RedisProcess

PREFIX = "chaos"
STEP_S = 20.0  # a generous bound on any one wait on a process; never a timing assertion
PERSIST_AFTER_MS = 2000  # see _app.py: a dead owner's persistence is retried after this
SUBSTRATE_TOKENS = 20
SUBSTRATE_DELAY_MS = 20


def substrate_argv() -> list[str]:
    return [
        sys.executable,
        *"-m turnstream.adapters.orchestrator --host 127.0.0.1 --port {port}".split(),
        *f"--tokens {SUBSTRATE_TOKENS} --token-delay-ms {SUBSTRATE_DELAY_MS}".split(),
        *"--log-level warning".split(),
    ]


class Worker:
    """One app worker; ``start(faults=…)`` starts a new process (on a new port)."""

    def __init__(self, name: str, cluster: Cluster, index: int) -> None:
        self.name = name
        self.cluster = cluster
        self.index = index
        self.server: ServerProcess | None = None
        self.lease_ms = 0
        self.faults = ""
        self.redis_url = ""
        self.stopped = False
        self.starts = 0
        self.pids: list[int] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.process is not None
        return self.server.process.pid

    @property
    def alive(self) -> bool:
        return (
            self.server is not None
            and self.server.process is not None
            and self.server.process.poll() is None
        )

    @property
    def returncode(self) -> int | None:
        if self.server is None or self.server.process is None:
            return None
        return self.server.process.poll()

    @property
    def proxy(self) -> FaultProxy:
        """The fault proxy between this worker and Redis."""
        return self.cluster.proxies[self.index]

    def _argv(self, env: dict[str, str]) -> list[str]:
        # `env` execs the server, so the PID the harness holds is the server's own.
        return [
            "env",
            *(f"{name}={value}" for name, value in env.items()),
            sys.executable,
            *"-m uvicorn tests.chaos._app:create_app --factory".split(),
            *"--host 127.0.0.1 --port {port} --log-level warning --no-access-log".split(),
            *"--timeout-graceful-shutdown 3".split(),
        ]

    def start(self, *, lease_ms: int, faults: str = "", direct: bool = False) -> None:
        self.stop()
        cluster = self.cluster
        self.redis_url = cluster.redis.url if direct else self.proxy.url
        env = {
            "CHAOS_REDIS_URL": self.redis_url,
            "CHAOS_PREFIX": PREFIX,
            "CHAOS_LEASE_MS": str(lease_ms),
            "CHAOS_CALLS_FILE": str(cluster.calls_file),
            "CHAOS_PERSIST_FILE": str(cluster.persist_file),
            "CHAOS_SUBSTRATE_URL": cluster.substrate.base_url,
            "CHAOS_SHUTDOWN_GRACE_S": "1",
            "CHAOS_PERSIST_AFTER_MS": str(PERSIST_AFTER_MS),
            "TURNSTREAM_FAULTS": faults,
            "CHAOS_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", ""),
        }
        if self.server is None:
            self.server = ServerProcess(f"chaos-{self.name}", self._argv(env))
        else:
            self.server.argv = self._argv(env)
        self.lease_ms, self.faults = lease_ms, faults
        self.server.start()
        self.stopped = False
        self.starts += 1
        self.pids.append(self.pid)

    def kill(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            assert self.server is not None and self.server.process is not None
            self.server.process.wait(timeout=STEP_S)
        self.stopped = False

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def stop(self) -> None:
        """SIGTERM (a stopped process is continued first), then SIGKILL after a bound."""
        if self.server is None:
            return
        if self.stopped and self.alive:
            self.resume()
        self.server.stop()

    def wait_dead(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                return True
            time.sleep(0.01)
        return False

    def log(self) -> str:
        return self.server.log_tail(lines=100_000) if self.server is not None else ""

    def close(self) -> None:
        self.stop()
        if self.server is not None:
            self.server.close()


class Cluster:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="turnstream-chaos-"))
        self.calls_file = self.workdir / "model-calls.txt"
        self.persist_file = self.workdir / "persisted.txt"
        self.redis = RedisProcess()
        self.proxies: list[FaultProxy] = []
        self.substrate = ServerProcess(
            "chaos-substrate", substrate_argv(), health_path="/agents/runs"
        )
        self.workers = [Worker("a", self, 0), Worker("b", self, 1)]
        self._client: redis.Redis | None = None
        self._http = httpx.Client(timeout=STEP_S)

    def start(self) -> Cluster:
        self.redis.start()
        self.proxies = [FaultProxy(self.redis.port).start() for _ in self.workers]
        self.substrate.start()
        return self

    def close(self) -> None:
        errors: list[BaseException] = []
        for close in (
            *(w.close for w in self.workers),
            self.substrate.close,
            *(p.close for p in self.proxies),
            self.redis.close,
            self._http.close,
        ):
            try:
                close()
            except Exception as exc:  # stop everything else regardless
                errors.append(exc)
        if self._client is not None:
            self._client.close()
        if not os.environ.get("TURNSTREAM_E2E_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- workers ---------------------------------------------------------------------------

    def start_workers(
        self, workers: list[Worker], *, lease_ms: int, faults: list[str] | None = None,
        direct: bool = False,
    ) -> None:
        """Start several workers at once (a start is mostly waiting for imports)."""
        faults = faults or [""] * len(workers)
        errors: list[BaseException] = []

        def start(worker: Worker, spec: str) -> None:
            try:
                worker.start(lease_ms=lease_ms, faults=spec, direct=direct)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=start, args=pair)
            for pair in zip(workers, faults, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def ensure_pair(self, *, lease_ms: int) -> tuple[Worker, Worker]:
        """Both workers up, unarmed, on the proxy, with this lease (restarted if not)."""
        stale = [
            w
            for w in self.workers
            if not w.alive or w.stopped or w.lease_ms != lease_ms or w.faults
            or w.redis_url != w.proxy.url
        ]
        if stale:
            self.start_workers(stale, lease_ms=lease_ms)
        a, b = self.workers
        return a, b

    @property
    def proxy(self) -> FaultProxy:
        """Worker a's proxy (the scenarios that fault one worker fault this one)."""
        return self.proxies[0]

    def proxy_stats(self) -> str:
        return "; ".join(f"{w.name}: {w.proxy.stats()}" for w in self.workers)

    # -- looking at things -----------------------------------------------------------------

    def redis_client(self) -> redis.Redis:
        """Direct to the redis-server (never through the proxy); reconnects after a restart."""
        if self._client is None:
            self._client = self.redis.client()
        return self._client

    def reset_redis_client(self) -> None:
        """After a Redis restart: the next look opens a fresh connection."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def redis_time_ms(self) -> int:
        seconds, micros = self.redis_client().time()
        return int(seconds) * 1000 + int(micros) // 1000

    def substrate_starts(self, execution_id: str) -> int:
        response = self._http.get(
            self.substrate.base_url + "/agents/runs", params={"executionId": execution_id}
        )
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return int(document["started"])

    def pid_of_holder(self, holder: str | None) -> int | None:
        """The PID inside a worker id (``host:pid:nonce``, the supervisor's default)."""
        if not holder:
            return None
        parts = holder.split(":")
        host = socket.gethostname()
        if len(parts) >= 3 and parts[-2].isdigit() and ":".join(parts[:-2]) == host:
            return int(parts[-2])
        return None
