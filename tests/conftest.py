"""Shared fixtures: a throwaway redis-server per test session, never the shared one on 6379."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

REQUIRE_REDIS = os.environ.get("TURNSTREAM_REQUIRE_REDIS") == "1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.process = process
        self.url = f"redis://127.0.0.1:{port}/0"


def _start_redis(binary: str) -> RedisServer:
    workdir = tempfile.mkdtemp(prefix="turnstream-redis-")
    for _ in range(5):
        port = free_port()
        process = subprocess.Popen(
            [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", workdir, "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break  # most likely the port was taken in between: try another
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return RedisServer(port, process)
            except OSError:
                time.sleep(0.05)
        process.kill()
        process.wait()
    raise RuntimeError("could not start a throwaway redis-server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "no redis-server binary: the real-Redis tests cannot run"
        if REQUIRE_REDIS:
            pytest.fail(message + " (TURNSTREAM_REQUIRE_REDIS=1 turns this skip into a failure)")
        pytest.skip(message)
    server = _start_redis(binary)
    try:
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
