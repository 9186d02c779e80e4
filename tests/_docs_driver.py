"""Drive a chat app written from the docs' blocks, as a newcomer would try it.

Run as a script in the directory the blocks were written to:
``python tests/_docs_driver.py MODULE:ATTR``. It imports the app (nothing else of the test
suite is on the path: the blocks must stand on their own), runs its lifespan and checks what
the README promises of every quick start. Exit status 0 means every check held; otherwise
the first failed check is printed.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any
from urllib.parse import quote

import orjson
from starlette.testclient import TestClient

USER = {"X-User-Id": "ada"}
OTHER_USER = {"X-User-Id": "grace"}
BODY = {"sessionId": "docs-1", "turnIndex": 0, "message": "hello there"}


def check(condition: bool, what: str, response: Any = None) -> None:
    if not condition:
        detail = ""
        if response is not None:
            detail = f"\n  status {response.status_code}, headers {dict(response.headers)}"
            detail += f"\n  body {response.text[:600]!r}"
        raise SystemExit(f"FAILED: {what}{detail}")


def events_of(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def is_problem(response: Any, status: int) -> bool:
    return (
        response.status_code == status
        and response.headers.get("content-type", "").startswith("application/problem+json")
        and response.json().get("status") == status
    )


def main(target: str) -> None:
    sys.path.insert(0, os.getcwd())
    module_name, _, attr = target.partition(":")
    app = getattr(importlib.import_module(module_name), attr)
    with TestClient(app, raise_server_exceptions=False) as client:
        first = client.post("/chat", json=BODY, headers=USER)
        check(first.status_code == 200, "POST /chat answers 200", first)
        check(first.headers.get("x-turn-mode") == "fresh", "the first POST is fresh", first)
        events = events_of(first.text)
        check(events[0]["type"] == "session.run.started", "the stream starts", first)
        check(events[-1]["type"] == "session.run.completed", "the turn completes", first)
        final_text = events[-1]["finalText"]
        check("hello there" in final_text, "the producer saw the message", first)
        execution_id = first.headers["x-execution-id"]

        again = client.post("/chat", json=BODY, headers=USER)
        check(again.headers.get("x-turn-mode") == "replayed", "a retry replays", again)
        check(events_of(again.text) == events, "the replay is the same log", again)

        anonymous = client.post("/chat", json=BODY)
        check(is_problem(anonymous, 401), "no credentials: a 401 problem document", anonymous)
        bad = client.post("/chat", content=b"{not json", headers=USER | {
            "content-type": "application/json"})  # fmt: skip
        check(is_problem(bad, 400), "a bad body: a 400 problem document", bad)
        unnamed = client.post("/chat", json=BODY | {"sessionId": ""}, headers=USER)
        check(is_problem(unnamed, 400), "an empty session id: a 400 problem document", unnamed)

        turn = f"/turns/{quote(execution_id, safe='')}"
        status = client.get(turn, headers=USER)
        check(status.status_code == 200, "GET /turns/{id} answers", status)
        check(status.json()["finalText"] == final_text, "the run record has the text", status)
        check(is_problem(client.get(turn), 401), "turn routes ask authorize too")
        unknown = client.get(turn, headers=OTHER_USER)
        check(is_problem(unknown, 404), "another user's turn is not found", unknown)
        resumed = client.get(turn + "/stream?after=1", headers=USER)
        check(events_of(resumed.text) == events[1:], "a cursor resumes after it", resumed)
        other = client.post("/chat", json=BODY, headers=OTHER_USER)
        check(other.headers.get("x-turn-mode") == "fresh", "another user's turn is theirs", other)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
