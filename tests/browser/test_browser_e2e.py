"""The demo page in a real browser: headless Debian Chromium, driven by ``drive.mjs``
(playwright-core over CDP), against a real demo process.

* **cut**: every connection is dropped mid-turn (at a loopback proxy in front of the demo);
  the page's ``EventSource`` reconnects by itself with ``Last-Event-ID`` and the reply ends up
  exactly the model's, with no word twice.
* **reload**: the page is reloaded mid-turn; it resumes the unfinished turn and shows the
  whole reply exactly once, without prompting the model again.

Needs ``/usr/bin/chromium`` and ``node``: without them the tests are skipped with a loud
reason, or fail when ``TURNSTREAM_REQUIRE_BROWSER=1`` (CI). ``npm ci`` runs here when
``node_modules`` is missing or does not match ``package-lock.json``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from e2e._server import ServerProcess, demo_argv, running

from turnstream._demo import fake_reply

from ._proxy import CuttingProxy

pytestmark = pytest.mark.e2e

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


def _require(condition: bool, what: str) -> None:
    if condition:
        return
    message = f"BROWSER TESTS NOT RUN: {what}"
    if REQUIRE_BROWSER:
        pytest.fail(message + " (TURNSTREAM_REQUIRE_BROWSER=1 turns this skip into a failure)")
    pytest.skip(message + "; set TURNSTREAM_REQUIRE_BROWSER=1 to make this a failure")


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
    _require(
        os.access(CHROMIUM, os.X_OK),
        f"{CHROMIUM} is missing (Debian: apt-get install chromium)",
    )
    node = shutil.which("node")
    npm = shutil.which("npm")
    _require(node is not None and npm is not None, "node/npm are not on PATH")
    assert node is not None and npm is not None
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version.startswith("v") else 0
    _require(major >= NODE_MIN_MAJOR, f"node {version or '?'} is older than {NODE_MIN_MAJOR}")
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
        _stop_group(process)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def _stop_group(process: subprocess.Popen[Any]) -> None:
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
    node: str, cdp_url: str, proxy: CuttingProxy, scenario: str, message: str
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


def expected_reply(demo: ServerProcess, execution_id: str, message: str) -> str:
    """The model's reply: the run's final text, checked against the fake model itself."""
    run = httpx.get(f"{demo.base_url}/turns/{execution_id}", timeout=5).json()
    assert run["status"] == "completed", run
    assert run["finalText"] == "".join(fake_reply(message, TOKENS))
    assert run["lastSeq"] == TOKENS + 2  # started, the deltas, completed
    calls = httpx.get(
        f"{demo.base_url}/debug/producer-calls", params={"executionId": execution_id}, timeout=5
    ).json()
    assert calls["calls"] == 1, "the model was prompted more than once"
    return str(run["finalText"])


def stream_requests(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["requests"] if urlsplit(r["url"]).path.endswith("/stream")]


def after_param(request: dict[str, Any]) -> int:
    return int(parse_qs(urlsplit(request["url"]).query)["after"][0])


def check_reply_on_page(
    result: dict[str, Any], message: str, reply: str, *, cut: bool = False
) -> None:
    final = result["final"]
    assert final["users"] == [message]
    assert final["assistants"] == [reply]
    assert final["transcript"].count(reply) == 1
    assert final["notes"] == [], final["notes"]  # no error, no "final text differed"
    assert final["state"] == ""
    # While it streamed, the reply only ever grew: never a word twice, never a word lost.
    assert result["samples"], "the live reply was never seen"
    bad = [sample for sample in result["samples"] if not reply.startswith(sample)]
    assert not bad, f"the page showed text that is not a prefix of the reply: {bad[:3]}"
    errors = result["consoleErrors"]
    if cut:
        # Chromium logs the stream the cut broke; nothing else may go wrong.
        errors = [e for e in errors if "net::ERR_INCOMPLETE_CHUNKED_ENCODING" not in e]
    assert errors == []
    posts = [r for r in result["requests"] if r["method"] == "POST"]
    assert [urlsplit(r["url"]).path for r in posts] == ["/chat"]


def test_connection_cut_mid_turn_eventsource_reconnects_with_last_event_id(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a browser loses its connection in the middle of a reply"
    started = time.monotonic()
    result = drive(node, chromium, proxy, "cut", message)
    elapsed = time.monotonic() - started

    assert json.loads(result["cutAnswer"])["cut"] >= 1, "nothing was open to cut"
    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message)
    check_reply_on_page(result, message, reply, cut=True)

    # The first stream is the page's own (?after=0); every later one is the browser's
    # reconnect, carrying the id of the last event it received as Last-Event-ID.
    streams = stream_requests(result)
    assert len(streams) >= 2, streams
    assert streams[0]["lastEventId"] is None and after_param(streams[0]) == 0
    held_at_cut = int(result["before"]["seq"])
    assert held_at_cut < TOKENS + 2, "the cut came after the turn had ended"
    reconnects = [r for r in streams[1:] if r["lastEventId"] is not None]
    assert reconnects, f"no reconnect carried Last-Event-ID: {streams}"
    assert held_at_cut <= int(reconnects[0]["lastEventId"]) < TOKENS + 2
    assert int(result["final"]["reconnects"]) >= 1  # the page saw the browser reconnect
    # And on the wire, as the demo received it: a stream request carrying Last-Event-ID.
    resumed_heads = [
        head
        for head in proxy.request_heads()
        if "/stream" in head[0]
        and f"last-event-id: {reconnects[0]['lastEventId']}" in (line.lower() for line in head)
    ]
    assert resumed_heads, proxy.request_heads()
    assert result["final"]["seq"] == str(TOKENS + 2)
    assert elapsed < DRIVE_TIMEOUT_S


def test_reload_mid_turn_resumes_and_shows_the_reply_once(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a person reloads the page while the reply is still streaming"
    result = drive(node, chromium, proxy, "reload", message)

    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message)
    check_reply_on_page(result, message, reply)

    # After the reload the page resumed from what it had kept, not from the start, and did not
    # POST the turn again (check_reply_on_page: exactly one POST /chat).
    held_at_reload = int(result["before"]["seq"])
    assert held_at_reload < TOKENS + 2, "the reload came after the turn had ended"
    resumed = [r for r in stream_requests(result) if r["t"] >= result["reloadAt"]]
    assert resumed, "the reloaded page did not resume the turn"
    assert after_param(resumed[0]) >= held_at_reload
    assert result["final"]["seq"] == str(TOKENS + 2)
