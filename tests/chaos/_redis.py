"""A redis-server the suite may kill: AOF with ``fsync always``, restarted on the same port and
directory so the AOF brings every acknowledged write back. Always stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from e2e._server import free_port

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """``start()`` picks a free loopback port once; ``restart()`` reuses it and the directory."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server binary on PATH")
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix="turnstream-chaos-redis-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _argv(self) -> list[str]:
        return [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
            *("--dir", str(self.workdir), "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always"),
            *("--logfile", str(self.workdir / "redis.log")),
        ]

    def start(self) -> None:
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            self.process = subprocess.Popen(
                self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.process.poll() is None:
                if _ping(self.port):
                    return
                time.sleep(0.01)
            self._reap()
        raise RuntimeError(f"redis-server did not start on {self.port}:\n{self.log_tail()}")

    def kill9(self) -> None:
        """``SIGKILL``: no shutdown, no last write; only what the AOF fsynced survives."""
        process = self.process
        assert process is not None and process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
        self.process = None
        self.kills += 1

    def restart(self, down_s: float) -> None:
        """Kill -9, stay down ``down_s``, start again on the same port with the same AOF."""
        self.kill9()
        time.sleep(down_s)
        self.start()
        self.restarts += 1

    def client(self) -> redis.Redis:
        """A direct client (never through the proxy), bytes in and out."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)

    def client_pause(self, ms: int) -> None:
        """``CLIENT PAUSE ms ALL``: the server answers nobody (this connection aside) for ms."""
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", str(int(ms)), "ALL")

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _reap(self) -> None:
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

    def stop(self) -> None:
        self._reap()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
