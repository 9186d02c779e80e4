"""The demo page's controls in a real browser (see ``test_browser_e2e.py`` for the setup):

* **speed**: the words and the delay per word set on the page are the reply's.
* **switch**: another user, or another tenant, cannot see the turn (a 404 problem, an empty
  stream); switching back resumes it.
* **kill**: with two workers over a throwaway Redis, "Kill this worker" SIGKILLs the worker
  that owns the turn and the page shows another worker restarting it (the fake model) or
  re-attaching to the same run (``--substrate``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from e2e._server import ServerProcess

from ._harness import (
    KILL_TOKENS,
    TOKEN_DELAY_MS,
    TOKENS,
    check_reply_on_page,
    connections,
    drive,
    expected_reply,
    gone,
    turn_record,
)
from ._proxy import CuttingProxy

pytestmark = pytest.mark.e2e


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
    assert gone(int(owner)), f"worker {owner} is still alive"
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
    assert gone(int(owner)), f"worker {owner} is still alive"
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
