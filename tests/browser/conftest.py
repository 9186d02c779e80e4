"""The browser tests' processes: node with playwright-core, a headless Chromium, the demo
(one worker on memory; two over a throwaway Redis, alone or on a reference substrate) and a
proxy that can cut connections. Every server binds 127.0.0.1 and is stopped by its PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e._server import ServerProcess, demo_argv, running

from ._harness import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    HERE,
    KILL_LEASE_MS,
    KILL_TOKEN_DELAY_MS,
    KILL_TOKENS,
    NODE_MIN_MAJOR,
    NPM_TIMEOUT_S,
    START_TIMEOUT_S,
    TOKEN_DELAY_MS,
    TOKENS,
    require,
    stop_group,
)
from ._proxy import CuttingProxy


def _locked_version() -> str:
    lock = json.loads((HERE / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/playwright-core"]["version"])


def _installed_version() -> str | None:
    manifest = HERE / "node_modules" / "playwright-core" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with ``tests/browser/node_modules`` as ``package-lock.json`` says."""
    require(
        os.access(CHROMIUM, os.X_OK),
        f"{CHROMIUM} is missing (Debian: apt-get install chromium)",
    )
    node = shutil.which("node")
    npm = shutil.which("npm")
    require(node is not None and npm is not None, "node/npm are not on PATH")
    assert node is not None and npm is not None
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version.startswith("v") else 0
    require(major >= NODE_MIN_MAJOR, f"node {version or '?'} is older than {NODE_MIN_MAJOR}")
    if _installed_version() != _locked_version():
        completed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
        assert completed.returncode == 0, f"npm ci failed:\n{completed.stdout}{completed.stderr}"
        assert _installed_version() == _locked_version()
    return node


@pytest.fixture(scope="module")
def demo(node: str) -> Iterator[ServerProcess]:
    argv = demo_argv(tokens=TOKENS, token_delay_ms=TOKEN_DELAY_MS)
    with running("demo", argv) as server:
        yield server


@pytest.fixture
def proxy(demo: ServerProcess) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(demo.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def chromium(node: str) -> Iterator[str]:
    """A headless Chromium with a fresh profile; yields its CDP websocket URL."""
    profile = tempfile.mkdtemp(prefix="turnstream-chromium-")
    log = tempfile.TemporaryFile()
    # Its own process group: the browser's helpers (zygote, renderers) go with it on stop.
    process = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        active_port = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        lines: list[str] = []
        while len(lines) < 2:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                output = log.read().decode(errors="replace")[-4000:]
                pytest.fail(f"chromium did not start (exit {process.poll()}):\n{output}")
            time.sleep(0.05)
            # "<port>\n/devtools/browser/<uuid>", written once the browser listens.
            lines = active_port.read_text().split() if active_port.exists() else []
            if len(lines) == 2 and len(lines[1]) < len("/devtools/browser/") + 36:
                lines = []  # read while being written
        yield f"ws://127.0.0.1:{lines[0]}{lines[1]}"
    finally:
        stop_group(process)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def two_workers(node: str, redis_server: Any) -> Iterator[ServerProcess]:
    argv = demo_argv(
        "--workers", "2", "--redis", redis_server.url, "--lease-ms", str(KILL_LEASE_MS),
        tokens=KILL_TOKENS, token_delay_ms=KILL_TOKEN_DELAY_MS,
    )
    with running("demo-two-workers", argv) as server:
        yield server


@pytest.fixture
def two_workers_on_a_substrate(node: str, redis_server: Any) -> Iterator[ServerProcess]:
    substrate_argv = [
        sys.executable,
        *"-m turnstream.adapters.orchestrator --host 127.0.0.1 --port {port}".split(),
        *f"--tokens {KILL_TOKENS} --token-delay-ms {KILL_TOKEN_DELAY_MS}".split(),
        *"--log-level warning".split(),
    ]
    with running("substrate", substrate_argv, health_path="/agents/runs") as substrate:
        argv = demo_argv(
            "--workers", "2", "--redis", redis_server.url, "--lease-ms", str(KILL_LEASE_MS),
            "--substrate", substrate.base_url,
        )
        with running("demo-on-substrate", argv) as server:
            server.substrate = substrate  # type: ignore[attr-defined]
            yield server
