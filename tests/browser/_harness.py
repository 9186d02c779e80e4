"""The browser tests' machinery: Chromium's flags, the driver (``drive.mjs``) and what the
tests check on its results. The fixtures are in ``conftest.py``."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from e2e._server import ServerProcess

from turnstream._demo import fake_reply

from ._proxy import CuttingProxy

HERE = Path(__file__).resolve().parent
CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("TURNSTREAM_REQUIRE_BROWSER") == "1"
# The machine's recipe for headless Debian Chromium; the profile is a fresh temporary one.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
TOKENS = 30
TOKEN_DELAY_MS = 40
START_TIMEOUT_S = 20.0
DRIVE_TIMEOUT_S = 40.0
NPM_TIMEOUT_S = 240.0
NODE_MIN_MAJOR = 20  # playwright-core's "engines"

KILL_LEASE_MS = 1500
KILL_TOKENS = 40
KILL_TOKEN_DELAY_MS = 60


def require(condition: bool, what: str) -> None:
    if condition:
        return
    message = f"BROWSER TESTS NOT RUN: {what}"
    if REQUIRE_BROWSER:
        pytest.fail(message + " (TURNSTREAM_REQUIRE_BROWSER=1 turns this skip into a failure)")
    pytest.skip(message + "; set TURNSTREAM_REQUIRE_BROWSER=1 to make this a failure")


def stop_group(process: subprocess.Popen[Any]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader by a moment (renderers exiting): make sure it is gone.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def drive(
    node: str,
    cdp_url: str,
    proxy: CuttingProxy,
    scenario: str,
    message: str,
    **extra: Any,
) -> dict[str, Any]:
    """Run ``drive.mjs`` for one scenario, doing the cuts it asks for; returns its result."""
    screenshot = Path(tempfile.gettempdir()) / f"turnstream-browser-{scenario}.png"
    screenshot.unlink(missing_ok=True)
    options = {
        "cdpUrl": cdp_url,
        "baseUrl": proxy.base_url,
        "scenario": scenario,
        "message": message,
        "screenshot": str(screenshot),
        **extra,
    }
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [node, str(HERE / "drive.mjs"), json.dumps(options)],
        cwd=HERE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read_stdout, name="drive-stdout")
    reader.start()
    result: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + DRIVE_TIMEOUT_S
        while result is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            message_from_driver = json.loads(line)
            if message_from_driver.get("ask") == "cut":
                cut = proxy.cut()
                process.stdin.write(json.dumps({"cut": cut}) + "\n")
                process.stdin.flush()
            elif "result" in message_from_driver:
                result = message_from_driver["result"]
        if result is None:
            stderr.seek(0)
            output = stderr.read().decode(errors="replace")[-4000:]
            pytest.fail(f"drive.mjs {scenario} gave no result (exit {process.poll()}):\n{output}")
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdin.close()
        reader.join(timeout=5)
        process.stdout.close()
        stderr.close()
    assert screenshot.stat().st_size > 0, "no screenshot"
    # Kept beside the screenshot: what the browser saw, for a look after a failure.
    screenshot.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def turn_record(demo: ServerProcess, execution_id: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{demo.base_url}/turns/{execution_id}", headers=headers, timeout=5)


def expected_reply(
    demo: ServerProcess, execution_id: str, message: str, *, tokens: int = TOKENS, calls: int = 1
) -> str:
    """The model's reply: the run's final text, checked against the fake model itself."""
    run = turn_record(demo, execution_id).json()
    assert run["status"] == "completed", run
    assert run["finalText"] == "".join(fake_reply(message, tokens))
    if calls:
        assert run["lastSeq"] == tokens + 2  # started, the deltas, completed
        count = httpx.get(
            f"{demo.base_url}/debug/producer-calls",
            params={"executionId": execution_id},
            timeout=5,
        ).json()
        assert count["calls"] == calls, "the model was prompted more than once"
    return str(run["finalText"])


def check_reply_on_page(
    result: dict[str, Any],
    message: str,
    reply: str,
    *,
    disturbed: bool = False,
    posts: tuple[str, ...] = ("/chat",),
    samples_are_prefixes: bool = True,
    expected_errors: tuple[str, ...] = (),
) -> None:
    final = result["final"]
    assert final["users"] == [message]
    assert final["assistants"] == [reply]
    assert final["transcript"].count(reply) == 1
    if samples_are_prefixes:
        assert final["notes"] == [], final["notes"]  # no error, no "final text differed"
    assert final["state"] == "", final["state"]
    assert result["samples"], "the live reply was never seen"
    if samples_are_prefixes:
        # While it streamed, the reply only ever grew: never a word twice, never a word lost.
        bad = [sample for sample in result["samples"] if not reply.startswith(sample)]
        assert not bad, f"the page showed text that is not a prefix of the reply: {bad[:3]}"
    errors = result["consoleErrors"]
    if disturbed:
        # Chromium logs the streams a cut or a dead worker broke; nothing else may go wrong.
        errors = [e for e in errors if "net::ERR_" not in e]
    # Chromium logs every non-2xx answer too: those a scenario provokes are no failure.
    errors = [e for e in errors if not any(expected in e for expected in expected_errors)]
    assert errors == []
    sent = [urlsplit(r["url"]).path for r in result["requests"] if r["method"] == "POST"]
    assert sent == list(posts)


def connections(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    """The page's connection log: (why, the X-Turn-Mode it got)."""
    return [(c["reason"], c["mode"]) for c in snapshot["connections"]]


def stream_requests(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["requests"] if urlsplit(r["url"]).path.endswith("/stream")]


def after_param(request: dict[str, Any]) -> int:
    return int(parse_qs(urlsplit(request["url"]).query)["after"][0])


def gone(pid: int, timeout_s: float = 5.0) -> bool:
    """Whether ``pid`` is dead (a zombie counts: SIGKILL cannot be caught)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False
