"""The checker: every turn's log, read straight from Redis (never through the fault proxy),
held to turnstream's invariants, and what each client received held to the log.

Layout (src/turnstream/stores/redis/_keys.py): ``{prefix}:{<tenant>/<execution id>}:log`` is a
stream with entry ids ``0-<seq>`` and fields ``i`` (eventId), ``t`` (type), ``d`` (the event's
JSON); ``…:run`` is the run hash (``status``, ``last_seq``, ``final_text``, ``finished_by``…).

Per turn, a :class:`Verdict` sorts what is wrong into categories:

* ``lost`` — no run, a gap in the seqs, missing text, a client that missed events or never
  got to the end;
* ``duplicated`` — a seq or eventId twice, two terminal events, text twice, a client that got
  an event twice;
* ``abandoned`` — no terminal event, or the run hash still ``running``;
* ``failed`` — the turn ended ``session.run.failed`` (``error_code`` says why);
* ``unlogged`` — a client got an event the log does not hold (log before deliver);
* ``zombie`` — a superseded attempt (or a fenced-off owner) wrote after the takeover;
* ``unpersisted`` — a finished turn whose ``persist_assistant_message`` never ran;
* ``corrupt`` — anything else that does not add up (first event, checkpoint, status).
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from turnstream import RunKey
from turnstream._demo import fake_reply

from ._client import TERMINALS, TurnClient, TurnSpec

STARTED = "session.run.started"
RESTARTED = "session.run.restarted"
COMPLETED = "session.run.completed"
FAILED = "session.run.failed"


@dataclass
class Entry:
    seq: int
    event_id: str
    type: str
    data: dict[str, Any]


@dataclass
class LoggedTurn:
    entries: list[Entry]
    run: dict[str, str]

    @property
    def status(self) -> str | None:
        return self.run.get("status")

    @property
    def terminal(self) -> Entry | None:
        ends = [e for e in self.entries if e.type in TERMINALS]
        return ends[-1] if ends else None

    @property
    def restarts(self) -> int:
        return sum(1 for e in self.entries if e.type == RESTARTED)


# The user of every chaos turn: the app's default (tests/chaos/_app.py), since the clients
# send no user header. A run's key names its user (Supervisor(access="user")).
USER = "user"


def run_tag(tenant: str, execution_id: str, user: str = USER) -> str:
    return RunKey(tenant, execution_id, user).tag


def read_turn(client: redis.Redis, prefix: str, tenant: str, execution_id: str) -> LoggedTurn:
    tag = run_tag(tenant, execution_id)
    pipe = client.pipeline(transaction=False)
    pipe.xrange(f"{prefix}:{{{tag}}}:log", "-", "+")
    pipe.hgetall(f"{prefix}:{{{tag}}}:run")
    raw_entries, raw_run = pipe.execute()
    entries = []
    for entry_id, fields in raw_entries:
        entries.append(
            Entry(
                seq=int(entry_id.partition(b"-")[2]),
                event_id=fields[b"i"].decode(),
                type=fields[b"t"].decode(),
                data=orjson.loads(fields[b"d"]),
            )
        )
    run = {k.decode(): v.decode(errors="replace") for k, v in raw_run.items()}
    return LoggedTurn(entries, run)


def tenant_runs(client: redis.Redis, prefix: str, tenant: str) -> list[str]:
    """The execution ids of every run of ``tenant`` in Redis (to find runs nobody expected)."""
    head = f"{prefix}:{{{run_tag(tenant, '')}"
    ids = []
    for key in client.scan_iter(match=head.replace("[", "\\[") + "*}:run", count=1000):
        text = key.decode()
        ids.append(text[len(head) : -len("}:run")])
    return ids


def witness_counts(path: Path) -> collections.Counter[str]:
    """Lines per execution id in a calls or persist file (``<execution id> <pid>``)."""
    counts: collections.Counter[str] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            execution_id, _, _ = line.rpartition(" ")
            if execution_id:
                counts[execution_id] += 1
    return counts


def witness_pids(path: Path, execution_id: str) -> list[int]:
    pids = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, pid = line.rpartition(" ")
            if name == execution_id:
                pids.append(int(pid))
    return pids


@dataclass
class Verdict:
    execution_id: str
    problems: dict[str, list[str]] = field(default_factory=dict)
    status: str | None = None
    error_code: str | None = None
    restarts: int = 0
    model_calls: int = 0
    extra_calls: int = 0
    context: str = ""  # who finished it, what the client did: for whoever debugs a failure

    def add(self, category: str, message: str) -> None:
        self.problems.setdefault(category, []).append(message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        parts = [f"{cat}: {'; '.join(msgs)}" for cat, msgs in sorted(self.problems.items())]
        head = f"{self.execution_id} [{self.status}] " + " | ".join(parts)
        return head + (f"  ({self.context})" if self.context else "")


def _deltas_after_last_restart(types_and_data: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    text = ""
    for kind, data in types_and_data:
        if kind == RESTARTED:
            text = ""
        elif kind == "text-delta" and isinstance(data.get("delta"), str):
            text += data["delta"]
    return text


def _compare_text(verdict: Verdict, what: str, got: str, want: str) -> None:
    if got == want:
        return
    if len(got) < len(want):
        verdict.add("lost", f"{what}: {len(got)} of {len(want)} chars")
    elif len(got) > len(want):
        verdict.add("duplicated", f"{what}: {len(got)} chars, want {len(want)}")
    else:
        verdict.add("corrupt", f"{what}: differs from the expected text")


def check_log(verdict: Verdict, spec: TurnSpec, turn: LoggedTurn, expected: str) -> None:
    entries = turn.entries
    verdict.status = turn.status
    if not entries and not turn.run:
        verdict.add("lost", "no run and no log in Redis")
        return
    if not entries:
        verdict.add("lost", "a run hash but an empty log")
    seqs = [e.seq for e in entries]
    if seqs != list(range(1, len(seqs) + 1)):
        if len(set(seqs)) != len(seqs) or seqs != sorted(seqs):
            verdict.add("duplicated", f"seqs out of order or twice: {seqs[:40]}")
        else:
            verdict.add("lost", f"gap in seqs: {seqs[:40]}")
    ids = [e.event_id for e in entries]
    repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
    if repeated:
        verdict.add("duplicated", f"eventIds twice: {repeated[:10]}")
    if entries and entries[0].type != STARTED:
        verdict.add("corrupt", f"first event is {entries[0].type}, not {STARTED}")
    terminals = [e for e in entries if e.type in TERMINALS]
    if not terminals:
        verdict.add("abandoned", f"no terminal event after {len(entries)} events")
    elif len(terminals) > 1:
        verdict.add("duplicated", f"{len(terminals)} terminal events")
    elif terminals[0] is not entries[-1]:
        verdict.add("duplicated", "events after the terminal event")
    if turn.status in (None, "running"):
        verdict.add("abandoned", f"run status {turn.status!r}")
    # Attempts: after `restarted` with attempt k, only attempt k writes.
    attempt = 1
    stale: list[str] = []
    for entry in entries:
        if entry.type == STARTED:
            # A log may start at a later attempt: its first attempt died before logging
            # anything (its model call may still have happened: one restart each).
            attempt = int(entry.data.get("attempt", 1))
            verdict.restarts += attempt - 1
            continue
        if entry.type == RESTARTED:
            attempt = int(entry.data.get("attempt", attempt + 1))
            verdict.restarts += 1
            continue
        if attempt > 1 and not entry.event_id.startswith("ts:"):
            # A new attempt's ids are scoped by it ("2.7", "2/7"…): another attempt's is stale.
            if not re.match(rf"{attempt}[^0-9]", entry.event_id):
                stale.append(f"{entry.seq}={entry.event_id}")
        if entry.type in TERMINALS and entry.data.get("attempt") not in (None, attempt):
            verdict.add("zombie", f"terminal of attempt {entry.data.get('attempt')} in {attempt}")
    if stale:
        verdict.add("zombie", f"events of an earlier attempt after attempt {attempt}: {stale[:8]}")
    if not terminals:
        return
    terminal = terminals[-1]
    status_of = {COMPLETED: "completed", FAILED: "failed", "session.run.cancelled": "cancelled"}
    if turn.status not in (None, "running") and turn.status != status_of[terminal.type]:
        verdict.add("corrupt", f"run status {turn.status} but terminal {terminal.type}")
    if turn.run.get("last_seq") not in (None, str(len(entries))) and seqs == sorted(set(seqs)):
        verdict.add("corrupt", f"run last_seq {turn.run.get('last_seq')} of {len(entries)}")
    folded = _deltas_after_last_restart((e.type, e.data) for e in entries)
    final_text = terminal.data.get("finalText")
    if final_text != folded:
        verdict.add("corrupt", "terminal finalText is not the fold of the log")
    if "final_text" in turn.run and turn.run["final_text"] != final_text:
        verdict.add("corrupt", "checkpointed final_text differs from the terminal's")
    if terminal.type == COMPLETED:
        _compare_text(verdict, "completed text", folded, expected)
    elif terminal.type == FAILED:
        errors = [e for e in entries if e.type == "error"]
        verdict.error_code = str(errors[-1].data.get("code")) if errors else None
        verdict.add("failed", f"failed with {verdict.error_code}")


def check_client(verdict: Verdict, client: TurnClient, turn: LoggedTurn) -> None:
    by_seq = {e.seq: e for e in turn.entries}
    terminal = turn.terminal
    if client.spec.fmt == "ai-sdk":
        finished = [s for s in client.ai_streams if s.done]
        if not finished:
            if client.done or terminal is not None:
                verdict.add("lost", f"no whole AI SDK stream ({client.outcome})")
            return
        stream = finished[-1]
        kinds = [c.get("type") for c in stream.chunks]
        if kinds[:1] != ["start"] or kinds.count("start") != 1:
            verdict.add("corrupt", f"AI SDK stream does not start once: {kinds[:5]}")
        elif stream.chunks[0].get("messageId") != client.execution_id:
            verdict.add("corrupt", "AI SDK messageId is not the execution id")
        if terminal is None:
            verdict.add("unlogged", "AI SDK stream finished but the log has no terminal")
            return
        want_end = {"session.run.cancelled": "abort"}.get(terminal.type, "finish")
        if not kinds or kinds[-1] != want_end:
            verdict.add("corrupt", f"AI SDK stream ends with {kinds[-1:]}")
        _compare_text(verdict, "AI SDK text", stream.text, terminal.data.get("finalText", ""))
        return
    seqs = [e.get("seq") for e in client.received]
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        verdict.add("duplicated", f"client got seqs out of order or twice: {seqs[:40]}")
    for event in client.received:
        entry = by_seq.get(event["seq"])
        if entry is None or entry.event_id != event.get("eventId") or entry.type != event["type"]:
            verdict.add("unlogged", f"client got seq {event['seq']} that the log does not hold")
            break
        if client.spec.fmt == "sse" and (
            event.get("_sseId") != str(event["seq"]) or event.get("_sseEvent") != event["type"]
        ):
            verdict.add("corrupt", f"SSE id/event do not match seq {event['seq']}")
            break
    got = sorted(set(seqs))
    if got and got != list(range(1, got[-1] + 1)):
        verdict.add("lost", f"client missed seqs: got {got[:40]}")
    if terminal is not None and not client.done and not client.stop_on_error:
        verdict.add("lost", f"client never got the end ({client.outcome})")
    if client.done and terminal is not None:
        text = _deltas_after_last_restart((e["type"], e) for e in client.received)
        _compare_text(verdict, "client text", text, terminal.data.get("finalText", ""))


def check_turn(
    client: TurnClient | TurnSpec,
    turn: LoggedTurn,
    *,
    calls: int,
    substrate_starts: int | None = None,
    persists: int | None = None,
    restarts_allowed: bool = False,
) -> Verdict:
    """One turn: its log, its client (when given one) and its model calls.

    ``calls`` counts the model calls (local) or the adapter's starts (substrate);
    ``substrate_starts`` what the substrate started. A local turn is allowed one model call
    per attempt in its log when ``restarts_allowed`` (an owner died mid-turn), else one.
    """
    spec = client.spec if isinstance(client, TurnClient) else client
    verdict = Verdict(spec.execution_id)
    expected = "".join(fake_reply(spec.message, spec.tokens))
    check_log(verdict, spec, turn, expected)
    if isinstance(client, TurnClient):
        check_client(verdict, client, turn)
    verdict.model_calls = calls
    trail = ""
    if isinstance(client, TurnClient):
        trail = ", ".join(
            f"{a.method} {a.mode or a.status or '-'} {a.end}"[:80] for a in client.attempts[-6:]
        )
    verdict.context = (
        f"{spec.mode}/{spec.fmt}; {len(turn.entries)} events; "
        f"finished by {turn.run.get('finished_by', '-')}; "
        f"persist {turn.run.get('persist', '-')} due {turn.run.get('persist_due_at', '-')} "
        f"by {turn.run.get('persist_by', '-')}; client: {trail}"
    )
    if spec.mode == "local":
        allowed = 1 + verdict.restarts if restarts_allowed else 1
        verdict.extra_calls = max(0, calls - allowed)
        if not restarts_allowed and verdict.restarts:
            verdict.add("restarted", f"{verdict.restarts} restart(s): the model ran again")
    else:
        started = substrate_starts if substrate_starts is not None else calls
        verdict.extra_calls = max(0, started - 1)
        verdict.model_calls = started
        if started > 1:
            verdict.add("duplicated", f"the substrate started {started} runs")
        if not restarts_allowed and verdict.restarts:
            # The substrate was not run again, but clients were told to drop their text.
            verdict.add("restarted", f"{verdict.restarts} restart(s) of a reconnectable turn")
    if verdict.extra_calls:
        expected_calls = verdict.model_calls - verdict.extra_calls
        verdict.add("extra_calls", f"{verdict.model_calls} model calls, {expected_calls} expected")
    finished = turn.status in ("completed", "failed", "cancelled")
    if persists is not None and finished and not persists:
        verdict.add("unpersisted", "finished, but persist_assistant_message never ran")
    return verdict
