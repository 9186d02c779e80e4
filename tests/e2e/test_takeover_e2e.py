"""Owner death under real processes: one reference substrate, demo workers on one throwaway
Redis, and the owner SIGKILLed (or SIGSTOPped) in the middle of its turns.

Nothing here is simulated: every server is a real process bound to 127.0.0.1 and stopped by
PID, every kill is ``os.kill(pid, SIGKILL)``. What the tests hold the core to (DESIGN §3):
every event exactly once across the dead owner's connection and the survivor's, exactly one
terminal event, the substrate prompted once per turn, a fenced stale owner, and a retry that
replays byte for byte without starting anything.

The kill points are random (a seeded ``random.Random``; the seed is printed, so a failure
shows it under "Captured stdout", and ``TURNSTREAM_TAKEOVER_SEED`` replays it): where each
turn stands when its owner dies, and where its client's cursor stands, differ per turn.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import orjson
import pytest

from turnstream._demo import fake_reply

from ._server import ServerProcess, demo_argv

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

LEASE_MS = 500
SUBSTRATE_TOKENS = 50
SUBSTRATE_DELAY_MS = 15  # a turn takes about 0.75 s: a kill after a few events lands mid-turn
DEMO_TOKENS = 40
DEMO_DELAY_MS = 15
ROUNDS = 4
TURNS_PER_ROUND = 5
MIN_KILL_POINTS = 20
MAX_ROUNDS = 7  # extra rounds only when some kills of the first four landed after a turn ended
STEP_S = 15.0  # a generous bound on any one wait; never a timing assertion
TERMINALS = {"session.run.completed", "session.run.failed", "session.run.cancelled"}


def substrate_argv() -> list[str]:
    return [
        sys.executable,
        *"-m turnstream.adapters.orchestrator --host 127.0.0.1 --port {port}".split(),
        *f"--tokens {SUBSTRATE_TOKENS} --token-delay-ms {SUBSTRATE_DELAY_MS}".split(),
        *"--log-level warning".split(),
    ]


def worker_argv(redis_url: str, substrate_url: str | None) -> list[str]:
    extra = ["--redis", redis_url, "--lease-ms", str(LEASE_MS)]
    if substrate_url is not None:
        extra += ["--substrate", substrate_url]
    return demo_argv(*extra, tokens=DEMO_TOKENS, token_delay_ms=DEMO_DELAY_MS)


def seeded_rng() -> random.Random:
    seed = int(os.environ.get("TURNSTREAM_TAKEOVER_SEED") or random.SystemRandom().getrandbits(32))
    print(f"kill points seeded with TURNSTREAM_TAKEOVER_SEED={seed}")
    return random.Random(seed)


# -- processes --------------------------------------------------------------------------------


class Worker:
    """A demo worker that a test may SIGKILL, SIGSTOP, SIGCONT and start again."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.server = ServerProcess(name, argv)
        self.stopped = False

    @property
    def url(self) -> str:
        return self.server.base_url

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    @property
    def alive(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def start(self) -> None:
        self.server.start()

    def kill(self) -> None:
        process = self.server.process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STEP_S)
        self.stopped = False

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def log(self) -> str:
        return self.server.log_tail(lines=100_000)

    def close(self) -> None:
        # A stopped process cannot act on SIGTERM: continue it first.
        if self.stopped and self.alive:
            self.resume()
        self.server.close()


@contextmanager
def workers(*specs: tuple[str, list[str]]) -> Iterator[list[Worker]]:
    with ExitStack() as stack:
        started: list[Worker] = []
        for name, argv in specs:
            worker = Worker(name, argv)
            stack.callback(worker.close)
            worker.start()
            started.append(worker)
        yield started


@pytest.fixture(scope="module")
def substrate() -> Iterator[ServerProcess]:
    server = ServerProcess("substrate", substrate_argv(), health_path="/agents/runs")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def pair(substrate: ServerProcess, redis_server: Any) -> Iterator[tuple[Worker, Worker]]:
    """Workers A (the owner the tests kill) and B (the survivor), on the substrate."""
    argv = worker_argv(redis_server.url, substrate.base_url)
    with workers(("takeover-a", argv), ("takeover-b", argv)) as (a, b):
        yield a, b


@pytest.fixture
def owner(pair: tuple[Worker, Worker]) -> Worker:
    a, _ = pair
    if not a.alive:
        a.start()  # an earlier test killed it
    return a


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # No keep-alive: a pooled connection to a killed worker would fail the next request.
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(STEP_S), limits=limits) as c:
        yield c


# -- the wire ---------------------------------------------------------------------------------


def chat_body(session: str, message: str) -> dict[str, Any]:
    return {"sessionId": session, "turnIndex": 0, "message": message}


def execution_id_of(session: str) -> str:
    return f"demo:{session}:0"


def turn_url(base: str, execution_id: str, tail: str = "") -> str:
    return f"{base}/turns/{quote(execution_id, safe='')}{tail}"


def new_session() -> str:
    return "takeover-" + uuid.uuid4().hex[:12]


async def status_of(client: httpx.AsyncClient, base: str, execution_id: str) -> dict[str, Any]:
    response = await client.get(turn_url(base, execution_id))
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


async def substrate_runs(
    client: httpx.AsyncClient, substrate: ServerProcess, execution_id: str | None = None
) -> dict[str, Any]:
    params = {} if execution_id is None else {"executionId": execution_id}
    response = await client.get(substrate.base_url + "/agents/runs", params=params)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


async def producer_total(client: httpx.AsyncClient, workers: list[Worker]) -> int:
    total = 0
    for worker in workers:
        response = await client.get(worker.url + "/debug/producer-calls")
        total += response.json()["total"]
    return total


class LineReader:
    """Whole NDJSON lines of one streaming response, read a few at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def read(self, lines: list[bytes], limit: int | None) -> None:
        """Append lines to ``lines`` until it holds ``limit`` (or the body ends)."""
        while limit is None or len(lines) < limit:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                return
            if line:
                lines.append(line.encode())


async def drain_dead(reader: LineReader, lines: list[bytes]) -> None:
    """Read what a killed worker managed to send; the connection then breaks."""
    try:
        with anyio.fail_after(STEP_S):
            await reader.read(lines, None)
    except httpx.HTTPError:
        pass  # the owner died mid-body: only whole lines were taken


async def resume(
    client: httpx.AsyncClient, base: str, execution_id: str, after: int
) -> tuple[str, list[bytes]]:
    """``GET …/stream`` with ``Last-Event-ID: after``, read to the end."""
    lines: list[bytes] = []
    headers = {"Last-Event-ID": str(after)}
    with anyio.fail_after(STEP_S):
        async with client.stream(
            "GET", turn_url(base, execution_id, "/stream"), headers=headers
        ) as response:
            assert response.status_code == 200, await response.aread()
            await LineReader(response).read(lines, None)
    return response.headers["x-turn-mode"], lines


def events_of(lines: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines]


def assert_exactly_once(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), f"gap or duplicate: {seqs}"
    event_ids = [e["eventId"] for e in events]
    assert len(set(event_ids)) == len(event_ids), f"duplicate event ids: {event_ids}"
    terminals = [e for e in events if e["type"] in TERMINALS]
    assert terminals == [events[-1]], "not exactly one terminal event, last"


def assert_substrate_log(events: list[dict[str, Any]], message: str) -> None:
    """A whole substrate turn: started, the substrate's started, its deltas, completed."""
    assert_exactly_once(events)
    reply = fake_reply(message, SUBSTRATE_TOKENS)
    assert events[0]["type"] == "session.run.started"
    assert events[1]["type"] == "data-substrate"
    assert events[1]["data"]["type"] == "execution.started"
    deltas = events[2:-1]
    assert [e["type"] for e in deltas] == ["text-delta"] * len(reply)
    assert [e["delta"] for e in deltas] == reply
    # The substrate's event ids, scoped by the attempt: the seam of the takeover dedups on them.
    assert [e["eventId"] for e in events[1:-1]] == [f"1/{n}" for n in range(1, len(reply) + 2)]
    assert events[-1]["type"] == "session.run.completed"
    assert events[-1]["finalText"] == "".join(reply)
    assert "session.run.restarted" not in {e["type"] for e in events}


# -- SIGKILL the owner mid-turn ---------------------------------------------------------------


@dataclass
class KilledTurn:
    """One turn of a round and what its client saw."""

    index: int
    message: str
    session: str = field(default_factory=new_session)
    start_delay_s: float = 0.0
    read_before_kill: int = 1
    # What the client does with A's stream at the kill: "drop" it just before (a tab reload),
    # "hold" it unread, or "drain" what A sent before it died.
    behaviour: str = "hold"
    # How long the client waits before it reconnects to B: at once (B's lease check says
    # "joined" and the reader or the sweeper re-attaches), or around the lease's lapse.
    reconnect_delay_s: float = 0.0
    lines_from_a: list[bytes] = field(default_factory=list)
    lines_from_b: list[bytes] = field(default_factory=list)
    logged_at_kill: int = 0
    running_at_kill: bool = False
    mode_on_b: str = ""

    @property
    def execution_id(self) -> str:
        return execution_id_of(self.session)

    @property
    def cursor(self) -> int:
        return orjson.loads(self.lines_from_a[-1])["seq"] if self.lines_from_a else 0


async def run_on_owner(
    client: httpx.AsyncClient,
    a: Worker,
    turn: KilledTurn,
    reached: anyio.Event,
    killed: anyio.Event,
) -> None:
    await anyio.sleep(turn.start_delay_s)
    body = chat_body(turn.session, turn.message)
    async with client.stream("POST", a.url + "/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["x-turn-mode"] == "fresh"
        reader = LineReader(response)
        with anyio.fail_after(STEP_S):
            await reader.read(turn.lines_from_a, turn.read_before_kill)
        reached.set()
        if turn.behaviour == "drop":
            return
        await killed.wait()
        if turn.behaviour == "drain":
            await drain_dead(reader, turn.lines_from_a)


async def kill_round(
    client: httpx.AsyncClient,
    rng: random.Random,
    round_index: int,
    a: Worker,
    b: Worker,
) -> list[KilledTurn]:
    turns = [
        KilledTurn(
            index=i,
            message=f"kill point {round_index}.{i}: {rng.random()}",
            start_delay_s=rng.uniform(0, 0.25),
            # 1 = session.run.started, 2 = the substrate's execution.started, then deltas.
            read_before_kill=rng.randint(1, 14),
            behaviour=rng.choice(["drop", "hold", "drain"]),
            reconnect_delay_s=rng.choice([0.0, rng.uniform(0, 1.5 * LEASE_MS / 1000)]),
        )
        for i in range(TURNS_PER_ROUND)
    ]
    extra_delay_s = rng.uniform(0, 0.15)
    reached = [anyio.Event() for _ in turns]
    killed = anyio.Event()
    async with anyio.create_task_group() as tg:
        for turn, event in zip(turns, reached, strict=True):
            tg.start_soon(run_on_owner, client, a, turn, event, killed)
        with anyio.fail_after(STEP_S):
            for event in reached:
                await event.wait()
        await anyio.sleep(extra_delay_s)
        a.kill()
        killed.set()
        # The dead owner's last word, as the store has it (its lease has not lapsed yet, and
        # a status read never takes a run over).
        for turn in turns:
            record = await status_of(client, b.url, turn.execution_id)
            turn.logged_at_kill = record["lastSeq"]
            turn.running_at_kill = record["status"] == "running"

    async def reconnect(turn: KilledTurn) -> None:
        await anyio.sleep(turn.reconnect_delay_s)
        turn.mode_on_b, turn.lines_from_b = await resume(
            client, b.url, turn.execution_id, turn.cursor
        )

    async with anyio.create_task_group() as tg:
        for turn in turns:
            tg.start_soon(reconnect, turn)
    # Back for the retries and the next round (a fresh process, on a fresh port).
    await anyio.to_thread.run_sync(a.start)
    return turns


async def check_killed_turn(
    client: httpx.AsyncClient,
    turn: KilledTurn,
    workers: list[Worker],
    substrate: ServerProcess,
    rng: random.Random,
) -> None:
    context = f"turn {turn.execution_id} ({turn.behaviour}, cursor {turn.cursor})"
    assert turn.lines_from_a, context
    if turn.running_at_kill and turn.reconnect_delay_s == 0:
        # The survivor re-attached (by this very request or by its sweeper) or followed.
        assert turn.mode_on_b in {"resumed", "joined"}, context
    else:
        # A late client may find the turn finished by B's sweeper already.
        assert turn.mode_on_b in {"resumed", "joined", "replayed"}, context
    lines = turn.lines_from_a + turn.lines_from_b
    events = events_of(lines)
    try:
        assert_substrate_log(events, turn.message)
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from exc
    runs = await substrate_runs(client, substrate, turn.execution_id)
    assert runs["started"] == 1, context
    assert (runs["status"], runs["events"]) == ("completed", SUBSTRATE_TOKENS + 2), context

    # A retry of the finished turn, to either worker: a replay, byte for byte, starting nothing.
    substrate_before = (await substrate_runs(client, substrate))["total"]
    producers_before = await producer_total(client, workers)
    retry_on = rng.choice(workers)
    replay = await client.post(retry_on.url + "/chat", json=chat_body(turn.session, turn.message))
    assert replay.status_code == 200, replay.text
    assert replay.headers["x-turn-mode"] == "replayed", context
    whole = await client.get(
        turn_url(rng.choice(workers).url, turn.execution_id, "/stream?after=0")
    )
    assert whole.headers["x-turn-mode"] == "replayed"
    assert replay.content == whole.content
    # What the two connections delivered is the log itself, byte for byte.
    assert replay.content == b"".join(line + b"\n" for line in lines), context
    assert (await substrate_runs(client, substrate))["total"] == substrate_before
    assert await producer_total(client, workers) == producers_before


async def test_sigkill_of_the_owner_mid_turn_loses_and_repeats_nothing(
    owner: Worker,
    pair: tuple[Worker, Worker],
    substrate: ServerProcess,
    client: httpx.AsyncClient,
) -> None:
    rng = seeded_rng()
    a, b = owner, pair[1]
    kill_points: list[tuple[int, int, int]] = []  # (events logged at the kill, cursor, total)
    modes: dict[str, int] = {}
    rounds = 0
    while rounds < ROUNDS or (len(kill_points) < MIN_KILL_POINTS and rounds < MAX_ROUNDS):
        turns = await kill_round(client, rng, rounds, a, b)
        rounds += 1
        for turn in turns:
            await check_killed_turn(client, turn, [a, b], substrate, rng)
            if turn.running_at_kill:
                kill_points.append((turn.logged_at_kill, turn.cursor, SUBSTRATE_TOKENS + 3))
                modes[turn.mode_on_b] = modes.get(turn.mode_on_b, 0) + 1
    print(f"{len(kill_points)} mid-turn kills in {rounds} rounds; modes on B: {modes}")
    print("(events logged at the kill, client cursor, events in the turn):", sorted(kill_points))
    assert len(kill_points) >= MIN_KILL_POINTS
    # The kill points are spread, not one spot hit twenty times.
    assert len({logged for logged, _, _ in kill_points}) >= 5
    assert "Traceback" not in b.log(), b.log()


# -- SIGSTOP: a stale owner is fenced ---------------------------------------------------------


async def test_a_sigstopped_owner_is_fenced_after_the_takeover(
    owner: Worker,
    pair: tuple[Worker, Worker],
    substrate: ServerProcess,
    client: httpx.AsyncClient,
) -> None:
    rng = seeded_rng()
    a, b = owner, pair[1]
    session, message = new_session(), f"fenced {rng.random()}"
    execution_id = execution_id_of(session)
    seen: list[bytes] = []
    async with client.stream("POST", a.url + "/chat", json=chat_body(session, message)) as first:
        assert first.headers["x-turn-mode"] == "fresh"
        with anyio.fail_after(STEP_S):
            await LineReader(first).read(seen, rng.randint(3, 12))
        a.pause()
    # Leaving the block dropped the connection to the frozen owner.
    try:
        # Wait for the lease to lapse, then resume on B. B's sweeper may claim the run first
        # ("joined"), even finish it when the substrate run ended during the stop ("replayed").
        with anyio.fail_after(STEP_S):
            while (await status_of(client, b.url, execution_id))["owned"]:
                await anyio.sleep(0.02)
        mode, rest = await resume(client, b.url, execution_id, orjson.loads(seen[-1])["seq"])
        assert mode in {"resumed", "joined", "replayed"}
        print(f"the resume request on B was {mode!r}")
        assert_substrate_log(events_of(seen + rest), message)
        finished = await client.get(turn_url(b.url, execution_id, "/stream?after=0"))
        record = await status_of(client, b.url, execution_id)
        assert record["status"] == "completed"
        log_before = len(a.log())
    finally:
        a.resume()

    # The frozen owner wakes up holding a stale lease and a substrate stream full of events.
    # Wait until it has noticed (its heartbeat's renew is refused), then a few heartbeats more.
    with anyio.fail_after(STEP_S):
        while f"lease on {execution_id}" not in a.log()[log_before:]:
            await anyio.sleep(0.05)
    await anyio.sleep(4 * LEASE_MS / 3 / 1000)
    after = await client.get(turn_url(b.url, execution_id, "/stream?after=0"))
    assert after.content == finished.content  # not a byte more, not a byte changed
    assert_substrate_log(events_of(after.content.splitlines()), message)
    assert (await status_of(client, b.url, execution_id)) == record
    assert (await substrate_runs(client, substrate, execution_id))["started"] == 1
    assert a.alive  # fenced, not crashed: it serves on
    assert (await client.get(a.url + "/healthz")).status_code == 200
    assert "Traceback" not in a.log(), a.log()


# -- a reader on the survivor finishes a dead owner's turn ------------------------------------


async def test_a_reader_on_the_survivor_finishes_a_dead_owners_turn(
    owner: Worker,
    pair: tuple[Worker, Worker],
    substrate: ServerProcess,
    client: httpx.AsyncClient,
) -> None:
    rng = seeded_rng()
    a, b = owner, pair[1]
    session, message = new_session(), f"reader on b {rng.random()}"
    execution_id = execution_id_of(session)
    head: list[bytes] = []
    async with client.stream("POST", a.url + "/chat", json=chat_body(session, message)) as first:
        assert first.headers["x-turn-mode"] == "fresh"
        with anyio.fail_after(STEP_S):
            await LineReader(first).read(head, 2)
    lines: list[bytes] = []
    with anyio.fail_after(STEP_S):
        async with client.stream("GET", turn_url(b.url, execution_id, "/stream")) as reader:
            assert reader.headers["x-turn-mode"] == "joined"  # A is alive and owns the turn
            lines_on_b = LineReader(reader)
            await lines_on_b.read(lines, rng.randint(3, 10))
            a.kill()  # the reader is waiting on A's turn now
            assert (await status_of(client, b.url, execution_id))["status"] == "running"
            await lines_on_b.read(lines, None)
    assert_substrate_log(events_of(lines), message)
    assert (await substrate_runs(client, substrate, execution_id))["started"] == 1


# -- a producer that cannot be re-attached restarts -------------------------------------------


async def test_a_dead_owners_local_producer_restarts_on_the_next_post(
    redis_server: Any, client: httpx.AsyncClient
) -> None:
    rng = seeded_rng()
    argv = worker_argv(redis_server.url, None)
    with workers(("restart-a", argv), ("restart-b", argv)) as (a, b):
        session, message = new_session(), f"restart {rng.random()}"
        execution_id = execution_id_of(session)
        body = chat_body(session, message)
        seen: list[bytes] = []
        async with client.stream("POST", a.url + "/chat", json=body) as first:
            assert first.headers["x-turn-mode"] == "fresh"
            with anyio.fail_after(STEP_S):
                await LineReader(first).read(seen, rng.randint(2, 10))
            a.kill()
        # No adapter, no sweeper: the run waits for its next request once the lease lapsed.
        with anyio.fail_after(STEP_S):
            while (record := await status_of(client, b.url, execution_id))["owned"]:
                await anyio.sleep(0.02)
        assert record["status"] == "running"
        restarted = await client.post(b.url + "/chat", json=body)
        assert restarted.status_code == 200, restarted.text
        assert restarted.headers["x-turn-mode"] == "restarted"
        lines = restarted.content.splitlines()
        events = events_of(lines)
        assert lines[: len(seen)] == seen  # A delivered only what the log holds
        assert_exactly_once(events)
        restarts = [i for i, e in enumerate(events) if e["type"] == "session.run.restarted"]
        assert restarts, "no session.run.restarted"
        assert events[restarts[-1]]["attempt"] == 2
        terminal = events[-1]
        assert terminal["type"] == "session.run.completed"
        assert terminal["attempt"] == 2
        after_restart = "".join(
            e["delta"] for e in events[restarts[-1] :] if e["type"] == "text-delta"
        )
        assert after_restart == terminal["finalText"] == "".join(fake_reply(message, DEMO_TOKENS))
        calls = await client.get(
            b.url + "/debug/producer-calls", params={"executionId": execution_id}
        )
        assert calls.json()["calls"] == 1

        replay = await client.post(b.url + "/chat", json=body)
        assert replay.headers["x-turn-mode"] == "replayed"
        assert replay.content == restarted.content
        assert "Traceback" not in b.log(), b.log()
