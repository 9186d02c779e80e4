"""A redis-server a test stops and starts again on the same loopback port: a store outage.

The session's shared server (``conftest.redis_server``) must stay up for everyone, so outage
tests run their own. Always 127.0.0.1, never 6379, always stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REQUIRE_REDIS = os.environ.get("TURNSTREAM_REQUIRE_REDIS") == "1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """The redis-server binary, or a skip (a failure under TURNSTREAM_REQUIRE_REDIS=1)."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "no redis-server binary: the store outage tests cannot run"
        if REQUIRE_REDIS:
            pytest.fail(message + " (TURNSTREAM_REQUIRE_REDIS=1 turns this skip into a failure)")
        pytest.skip(message)
    return binary


class RedisProcess:
    """One redis-server on ``port`` (a free one by default), started and stopped at will."""

    def __init__(self, binary: str, port: int | None = None, *, aof: bool = False) -> None:
        self.binary = binary
        # With aof, every write is fsynced before Redis answers it, so a SIGKILL loses
        # nothing that was acknowledged and a restart brings it all back.
        self.aof = aof
        self.port = port if port is not None else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="turnstream-outage-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.port != 6379, "never the shared server's port"
        assert self.process is None, "already running"
        process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", self.workdir, "--protected-mode", "yes",
                *(["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                  else ["--appendonly", "no"]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.process = process
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.process = None
                raise RuntimeError(f"redis-server exited at once (port {self.port} taken?)")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a SIGSTOPped server (a black hole) too
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-command, as in a crash or an OOM kill."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=5)
