"""The real AI SDK client against a real demo: ``node --test tests/js/ai_sdk.test.mjs``.

The `ai` package is pinned in ``tests/js/package.json`` (with its lock file); ``npm ci``
installs it when ``node_modules`` is missing or was installed from another lock file. Without
``node``/``npm`` the test is skipped, loudly; with ``TURNSTREAM_REQUIRE_NODE=1`` (CI) that is a
failure instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import orjson
import pytest

from turnstream._demo import fake_reply

from ._server import REPO, demo_argv, running

pytestmark = pytest.mark.e2e

JS = REPO / "tests" / "js"
STAMP = JS / "node_modules" / ".turnstream-lock-sha256"
TOKENS = 20
# Slow enough (20 words, 20 ms apart) for the client to abort mid-turn.
TOKEN_DELAY_MS = 20
MESSAGES = (
    "what survives a dropped connection",
    "and what does a retry cost",
)
NPM_TIMEOUT_S = 240
NODE_TIMEOUT_S = 120


def _missing(reason: str) -> None:
    if os.environ.get("TURNSTREAM_REQUIRE_NODE") == "1":
        pytest.fail(f"{reason} (TURNSTREAM_REQUIRE_NODE=1 makes this a failure)")
    pytest.skip(f"!! SKIPPED the AI SDK client test: {reason}")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"no `{name}` on PATH: install Node.js >= 18 to run it")
    assert path is not None
    return path


def _install(npm: str) -> None:
    """``npm ci`` unless node_modules was installed from this very lock file."""
    lock = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == lock:
        return
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    if done.returncode != 0:
        _missing(f"`npm ci` failed in tests/js (is the npm registry reachable?):\n{done.stderr}")
    STAMP.write_text(lock + "\n")


@pytest.mark.timeout(NPM_TIMEOUT_S + NODE_TIMEOUT_S + 60)
def test_ai_sdk_client_against_the_demo() -> None:
    node = _tool("node")
    npm = _tool("npm")
    _install(npm)
    replies = {message: "".join(fake_reply(message, TOKENS)) for message in MESSAGES}
    with running("demo", demo_argv(tokens=TOKENS, token_delay_ms=TOKEN_DELAY_MS)) as demo:
        env = {
            **os.environ,
            "TURNSTREAM_DEMO_URL": demo.base_url,
            "TURNSTREAM_REPLIES": orjson.dumps(replies).decode(),
        }
        done = subprocess.run(
            [node, "--test", "ai_sdk.test.mjs"],
            cwd=JS,
            env=env,
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT_S,
        )
        assert done.returncode == 0, f"node --test failed:\n{done.stdout}\n{done.stderr}"
        # Not vacuous: every test ran and passed.
        assert "# fail 0" in done.stdout, done.stdout
        assert "# pass 7" in done.stdout, done.stdout
