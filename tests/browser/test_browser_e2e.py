"""The demo page in a real browser: headless Debian Chromium, driven by ``drive.mjs``
(playwright-core over CDP), against a real demo process.

* **cut**: every connection is dropped mid-turn (at a loopback proxy in front of the demo);
  the page resumes with ``Last-Event-ID``, shows the resume (``fresh`` → ``joined``, the
  cursor it sent, one reconnect) and the reply ends up exactly the model's, no word twice.
* **reload**: the page is reloaded mid-turn; it resumes the unfinished turn (``joined``) and
  shows the whole reply exactly once, without prompting the model again.
* **replay**: the page is left mid-turn and opened again after the turn ended: ``replayed``.
* **speed**: the page's speed control sets the reply's length and pace.
* **switch**: another user (and another tenant) cannot see the turn: a 404 problem.
* **kill**: with two workers over a throwaway Redis, "Kill this worker" SIGKILLs the worker
  that owns the turn and the page shows another worker restarting it.

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
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

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
    assert final["state"] == ""
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


def test_connection_cut_mid_turn_resumes_with_last_event_id_and_shows_it(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a browser loses its connection in the middle of a reply"
    started = time.monotonic()
    result = drive(node, chromium, proxy, "cut", message)
    elapsed = time.monotonic() - started

    assert json.loads(result["cutAnswer"])["cut"] >= 1, "nothing was open to cut"
    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message)
    check_reply_on_page(result, message, reply, disturbed=True)

    held_at_cut = int(result["before"]["seq"])
    assert held_at_cut < TOKENS + 2, "the cut came after the turn had ended"
    # Before the cut: one connection (the POST), fresh. After it: one resume, joined, from
    # the cursor the page held, and the page says so.
    assert (result["before"]["mode"], result["before"]["reconnects"]) == ("fresh", "0")
    assert connections(result["before"]) == [("send", "fresh")]
    assert connections(result["final"]) == [("send", "fresh"), ("cut", "joined")]
    resumed_after = result["final"]["connections"][1]["after"]
    assert held_at_cut <= resumed_after < TOKENS + 2
    assert (result["final"]["mode"], result["final"]["reconnects"]) == ("joined", "1")
    assert result["final"]["resumedFrom"] == str(resumed_after)
    # What the browser sent: one stream request, its Last-Event-ID the cursor shown.
    (stream,) = stream_requests(result)
    assert stream["lastEventId"] == str(resumed_after) == str(after_param(stream))
    # And on the wire, as the demo received it.
    resumed_heads = [
        head
        for head in proxy.request_heads()
        if "/stream" in head[0]
        and f"last-event-id: {resumed_after}" in (line.lower() for line in head)
    ]
    assert resumed_heads, proxy.request_heads()
    assert result["final"]["seq"] == str(TOKENS + 2)
    assert elapsed < DRIVE_TIMEOUT_S


def test_drop_connection_resumes_after_the_last_event_held(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a person drops the connection by hand"
    result = drive(node, chromium, proxy, "drop", message)

    reply = expected_reply(demo, result["final"]["execution"], message)
    check_reply_on_page(result, message, reply)
    held = int(result["before"]["seq"])
    assert held < TOKENS + 2, "the drop came after the turn had ended"
    assert connections(result["final"]) == [("send", "fresh"), ("drop", "joined")]
    (stream,) = stream_requests(result)
    assert int(stream["lastEventId"]) >= held
    assert result["final"]["reconnects"] == "1"


def test_reload_mid_turn_resumes_joined_and_shows_the_reply_once(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a person reloads the page while the reply is still streaming"
    mid = Path(tempfile.gettempdir()) / "turnstream-browser-mid-turn.png"
    result = drive(node, chromium, proxy, "reload", message, midScreenshot=str(mid))

    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message)
    check_reply_on_page(result, message, reply)

    # After the reload the page resumed from what it had kept, not from the start, did not
    # POST the turn again (check_reply_on_page: one POST), and counted the resume.
    held_at_reload = int(result["before"]["seq"])
    assert held_at_reload < TOKENS + 2, "the reload came after the turn had ended"
    assert connections(result["resumed"]) == [("send", "fresh"), ("reload", "joined")]
    assert result["resumed"]["live"], "the turn had ended before the page resumed it"
    assert (result["final"]["mode"], result["final"]["reconnects"]) == ("joined", "1")
    resumed = [r for r in stream_requests(result) if r["t"] >= result["reloadAt"]]
    assert len(resumed) == 1
    assert int(resumed[0]["lastEventId"]) == after_param(resumed[0]) >= held_at_reload
    assert result["final"]["resumedFrom"] == resumed[0]["lastEventId"]
    assert result["final"]["seq"] == str(TOKENS + 2)
    assert mid.stat().st_size > 0


def test_a_page_back_after_the_turn_ended_replays_it(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a person leaves mid-reply and comes back once it has ended"
    result = drive(node, chromium, proxy, "replay", message)

    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message)
    check_reply_on_page(result, message, reply)
    held = int(result["before"]["seq"])
    assert held < TOKENS + 2
    assert connections(result["final"]) == [("send", "fresh"), ("reload", "replayed")]
    assert result["final"]["connections"][1]["after"] >= held
    assert (result["final"]["mode"], result["final"]["reconnects"]) == ("replayed", "1")


def test_the_speed_control_sets_the_length_and_pace_of_the_reply(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a slower, shorter reply please"
    tokens, delay_ms = 9, 150
    result = drive(
        node, chromium, proxy, "speed", message, speed={"tokens": tokens, "delay": delay_ms}
    )

    # The fields start at the demo's own speed (its --tokens / --token-delay-ms).
    initial = result["initial"]
    assert (initial["tokens"], initial["delay"]) == (str(TOKENS), str(TOKEN_DELAY_MS))
    assert result["before"]["duration"] == f"{tokens * delay_ms / 1000:.1f} s"
    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message, tokens=tokens)
    check_reply_on_page(result, message, reply)
    (post,) = [r for r in result["requests"] if r["method"] == "POST"]
    query = parse_qs(urlsplit(post["url"]).query)
    assert (query["tokens"], query["tokenDelayMs"]) == ([str(tokens)], [str(delay_ms)])
    # The pace: the reply cannot have come faster than a word per delay.
    took_ms = result["finishedAt"] - result["marks"]["sent"]
    assert took_ms >= tokens * delay_ms, took_ms


def test_another_user_or_tenant_cannot_see_the_turn(
    node: str, demo: ServerProcess, proxy: CuttingProxy, chromium: str
) -> None:
    message = "a turn only its own user may read"
    result = drive(node, chromium, proxy, "switch", message)

    execution_id = result["final"]["execution"]
    reply = expected_reply(demo, execution_id, message)
    check_reply_on_page(
        result, message, reply, expected_errors=("the server responded with a status of 404",)
    )
    # 3 probes, 3 logged 404s, nothing else.
    assert len(result["consoleErrors"]) == 3, result["consoleErrors"]
    # As bob: his own (empty) chat, and guest's turn is a 404 problem.
    as_bob = result["asBob"]
    assert (as_bob["user"], as_bob["tenant"]) == ("bob", "demo")
    assert as_bob["users"] == [] and as_bob["live"] == []
    assert as_bob["isolation"].startswith(f"as bob@demo, guest@demo's turn {execution_id} → 404")
    other_tenant = result["asOtherTenant"]["isolation"]
    assert other_tenant.startswith(f"as guest@acme, guest@demo's turn {execution_id} → 404")
    # The probes went out as those users, and the server agrees with the page.
    probes = [
        (r["tenant"], r["user"])
        for r in result["requests"]
        if urlsplit(r["url"]).path == f"/turns/{quote(execution_id, safe='')}"
    ]
    assert probes == [("demo", "bob"), ("acme", "bob"), ("acme", "guest")]
    assert turn_record(demo, execution_id, **{"X-Demo-User": "bob"}).status_code == 404
    assert turn_record(demo, execution_id, **{"X-Demo-Tenant": "acme"}).status_code == 404
    stream = httpx.get(
        f"{demo.base_url}/turns/{execution_id}/stream",
        headers={"X-Demo-User": "bob"},
        timeout=5,
    )
    assert stream.status_code == 204 and stream.content == b""
    # Back as guest@demo, the page resumed the turn it had left running.
    reasons = connections(result["final"])
    assert reasons[0] == ("send", "fresh")
    assert reasons[1][0] == "switch" and reasons[1][1] in ("joined", "replayed")
    assert len(reasons) == 2 and result["final"]["reconnects"] == "1"


KILL_LEASE_MS = 1500
KILL_TOKENS = 40
KILL_TOKEN_DELAY_MS = 60


@pytest.fixture
def two_workers(node: str, redis_server: Any) -> Iterator[ServerProcess]:
    argv = demo_argv(
        "--workers", "2", "--redis", redis_server.url, "--lease-ms", str(KILL_LEASE_MS),
        tokens=KILL_TOKENS, token_delay_ms=KILL_TOKEN_DELAY_MS,
    )
    with running("demo-two-workers", argv) as server:
        yield server


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
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


def test_kill_this_worker_another_worker_takes_the_turn_over(
    node: str, two_workers: ServerProcess, chromium: str
) -> None:
    message = "the worker running this turn is killed mid-reply"
    proxy = CuttingProxy(two_workers.port)
    try:
        mid = Path(tempfile.gettempdir()) / "turnstream-browser-takeover.png"
        result = drive(node, chromium, proxy, "kill", message, midScreenshot=str(mid))
    finally:
        proxy.close()

    assert result["initial"]["workersShown"] and result["initial"]["killShown"]
    before = result["before"]
    (send,) = before["connections"]
    owner = send["worker"]  # the worker that took the POST runs the turn
    assert before["owner"] == f"worker {owner} · attempt 1"
    kills = [c for c in result["final"]["connections"] if c["reason"] == "kill"]
    assert [k["worker"] for k in kills] == [owner]
    assert _gone(int(owner)), f"worker {owner} is still alive"
    # After the kill: the page resumed on another worker, then (the lease lapsed, nothing can
    # re-attach to a local turn) POSTed the turn again and a live worker restarted it.
    after = result["final"]["connections"][2:]
    assert after, result["final"]["connections"]
    assert all(c["worker"] and c["worker"] != owner for c in after), after
    assert after[-1]["reason"] == "takeover" and after[-1]["mode"] == "restarted", after
    assert result["final"]["mode"] == "restarted"
    assert int(result["final"]["reconnects"]) == len(after)
    execution_id = result["final"]["execution"]
    run = turn_record(two_workers, execution_id).json()
    assert run["attempt"] == 2
    reply = expected_reply(two_workers, execution_id, message, tokens=KILL_TOKENS, calls=0)
    check_reply_on_page(
        result,
        message,
        reply,
        disturbed=True,
        posts=("/chat", f"/demo/turns/{quote(execution_id, safe='')}/kill", "/chat"),
        samples_are_prefixes=False,  # the restart voids the dead attempt's text
    )
    assert result["final"]["notes"] == ["restarted (attempt 2)"]


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


def test_kill_this_worker_on_a_substrate_another_worker_reattaches_the_same_run(
    node: str, two_workers_on_a_substrate: ServerProcess, chromium: str
) -> None:
    """With ``--substrate`` the run outlives its worker: another worker re-attaches to it
    after the last logged event, so the reply goes on where it was, with no second attempt
    and no second start on the substrate."""
    demo = two_workers_on_a_substrate
    message = "the worker following a substrate run is killed mid-reply"
    proxy = CuttingProxy(demo.port)
    try:
        result = drive(node, chromium, proxy, "kill", message)
    finally:
        proxy.close()

    assert result["initial"]["killShown"]
    (send,) = result["before"]["connections"]
    owner = send["worker"]
    final = result["final"]["connections"]
    assert [c["worker"] for c in final if c["reason"] == "kill"] == [owner]
    assert _gone(int(owner)), f"worker {owner} is still alive"
    after = final[2:]
    assert after and all(c["worker"] != owner for c in after), final
    # A resume, never a takeover POST: nothing restarted.
    assert all(c["reason"] == "cut" and c["mode"] in ("joined", "resumed") for c in after), after
    execution_id = result["final"]["execution"]
    run = turn_record(demo, execution_id).json()
    assert (run["status"], run["attempt"]) == ("completed", 1)
    # The substrate's words, and the worker's lifecycle events around them (a re-attach adds
    # one of its own), each logged once.
    assert run["lastSeq"] >= KILL_TOKENS + 2
    substrate = demo.substrate  # type: ignore[attr-defined]
    runs = httpx.get(f"{substrate.base_url}/agents/runs", timeout=5).json()
    assert runs["runs"][execution_id]["started"] == 1
    check_reply_on_page(
        result,
        message,
        str(run["finalText"]),
        disturbed=True,
        posts=("/chat", f"/demo/turns/{quote(execution_id, safe='')}/kill"),
    )
