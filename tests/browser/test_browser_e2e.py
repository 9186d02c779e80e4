"""The demo page in a real browser: headless Debian Chromium, driven by ``drive.mjs``
(playwright-core over CDP), against a real demo process. Each disturbance of a turn must end
with the model's reply shown exactly once, and the page must show the resume it made:

* **cut**: every connection is dropped mid-turn (at a loopback proxy in front of the demo);
  the page resumes with ``Last-Event-ID``: ``fresh`` → ``joined``, the cursor, one reconnect.
* **drop**: the page's "Drop connection" button, the same by hand.
* **reload**: the page is reloaded mid-turn; it resumes the unfinished turn (``joined``)
  without prompting the model again.
* **replay**: the page is left mid-turn and opened again after the turn ended: ``replayed``.

The page's other controls (speed, user switch, kill this worker) are
``test_browser_controls.py``'s. Needs ``/usr/bin/chromium`` and ``node``: without them the
tests are skipped with a loud reason, or fail when ``TURNSTREAM_REQUIRE_BROWSER=1`` (CI).
``npm ci`` runs here when ``node_modules`` is missing or does not match ``package-lock.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from e2e._server import ServerProcess

from ._harness import (
    DRIVE_TIMEOUT_S,
    TOKENS,
    after_param,
    check_reply_on_page,
    connections,
    drive,
    expected_reply,
    stream_requests,
)
from ._proxy import CuttingProxy

pytestmark = pytest.mark.e2e


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
