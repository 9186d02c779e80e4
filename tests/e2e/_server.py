"""Real uvicorn processes for the end-to-end tests: start on a free loopback port, wait until
they answer HTTP, and always stop them by PID (terminate, then kill)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One server process. ``argv`` gets ``{port}`` substituted; it must bind 127.0.0.1."""

    def __init__(self, name: str, argv: Sequence[str], *, health_path: str = "/healthz") -> None:
        self.name = name
        self.argv = list(argv)
        self.health_path = health_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # closed in close()
            prefix=f"turnstream-e2e-{name}-", suffix=".log", delete=False
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        # A port found free may be taken before uvicorn binds it: then try another, a few times.
        for _ in range(3):
            self.port = free_port()
            argv = [part.format(port=self.port) for part in self.argv]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.process = subprocess.Popen(
                argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env
            )
            if self._wait_until_up():
                return
            self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def _wait_until_up(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                # Any HTTP answer means uvicorn is serving: it binds after the lifespan startup.
                httpx.get(self.base_url + self.health_path, timeout=1.0)
                return True
            except httpx.TransportError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        self.stop()
        self._log.close()
        if not os.environ.get("TURNSTREAM_E2E_KEEP_LOGS"):
            Path(self._log.name).unlink(missing_ok=True)


@contextmanager
def running(
    name: str, argv: Sequence[str], *, health_path: str = "/healthz"
) -> Iterator[ServerProcess]:
    server = ServerProcess(name, argv, health_path=health_path)
    try:
        server.start()
        yield server
        server.stop()
        # A server-side exception (logged, never sent to the client) still fails the run.
        log = server.log_tail(lines=10_000)
        assert "Traceback" not in log, f"{name} logged an exception:\n{log}"
    finally:
        server.close()


def uvicorn_argv(target: str) -> list[str]:
    options = "--host 127.0.0.1 --port {port} --log-level warning".split()
    return [sys.executable, "-m", "uvicorn", target, *options]


def demo_argv(*extra: str, tokens: int = 20, token_delay_ms: int = 20) -> list[str]:
    options = (
        f"--host 127.0.0.1 --port {{port}} --tokens {tokens} --token-delay-ms {token_delay_ms}"
    )
    return [sys.executable, "-m", "turnstream", "demo", *options.split(), *extra]
