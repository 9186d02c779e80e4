"""The reference substrate: a sandbox orchestrator in miniature, over HTTP.

    POST /agents/run/stream           header X-Execution-ID, body {"prompt", "session", "options"}
                                      → the run as SSE, from its start or after Last-Event-ID
    POST /agents/run/{id}/cancel      stop the run (execution.cancelled); idempotent, 202
    GET  /agents/runs[?executionId=]  how many runs were started, per execution id (for tests)

**One run per execution id.** The first POST for an execution id starts its run; every later
POST for it (a re-attach, a retry, another worker) never starts a second one: it replays the
run's events after ``Last-Event-ID`` and then follows it live. A POST without ``prompt`` only
attaches, so a re-attach to a run the substrate no longer knows is a 404, not a new run.

**Runs outlive connections.** A run is a task in the app's own task group (opened by the
lifespan), not in the request that started it: a client that leaves does not stop it. When
the server stops, streams end at once (to a client, a cut connection) and the runs with the
lifespan; runs live in memory only, so a restarted substrate knows none of them.

**Event ids** are the event's position in its run, in decimal: ``"1"`` is always
``execution.started``, then one id per ``text-delta``, and the terminal event last
(``execution.completed`` with ``finalText``, ``execution.failed`` or ``execution.cancelled``).
The substrate compares them as integers (``Last-Event-ID: 9`` resumes at ``"10"``); a client
never needs to, it only hands back the last id it saw.

**Replies are deterministic**: ``reply(prompt, tokens)`` gives the text deltas (by default the
demo's fake model), so a test computes the expected ``finalText`` from the prompt alone. The
body's ``options`` may set ``tokens`` and ``tokenDelayMs`` for one run. The prompt
``"please fail"`` makes the run fail (``execution.failed``) after two deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.lowlevel
import orjson
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..._demo._app import fake_reply
from ..._exceptions import InvalidTurnInput, RunNotFound, TurnstreamError
from ..._problems import PROBLEM_TYPE_BASE, ProblemResponse, problem_for_exception
from ..._requests import read_json_body
from ..._response import TurnStreamResponse
from ._protocol import (
    CANCELLED,
    COMPLETED,
    FAIL_PROMPT,
    FAILED,
    STARTED,
    TERMINAL_TYPES,
    TEXT_DELTA,
)

__all__ = [
    "FAIL_AFTER",
    "ReferenceSubstrate",
    "Reply",
    "create_substrate_app",
]

logger = logging.getLogger("turnstream.substrate")

#: How many deltas a run prompted with FAIL_PROMPT sends before it fails.
FAIL_AFTER: Final = 2

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_PROMPT_CHARS: Final = 100_000
MAX_EXECUTION_ID_LENGTH: Final = 1024
MAX_TOKENS: Final = 10_000
MAX_TOKEN_DELAY_MS: Final = 60_000
_KEEPALIVE: Final = b": keep-alive\n\n"

#: ``reply(prompt, tokens)`` → the run's text deltas, in order.
Reply = Callable[[str, int], Sequence[str]]


class _Unavailable(Exception):
    """The substrate cannot start a run right now (not started, or too many runs)."""


class _Run:
    """One run: its events, already framed as SSE, and whoever waits for the next one."""

    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        self.frames: list[bytes] = []
        self.status = "running"
        self.scope = anyio.CancelScope()
        self.followers_closed = False  # the server is stopping: end every stream now
        self._changed = anyio.Event()

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def append(self, payload: Mapping[str, Any]) -> None:
        if self.finished:
            raise RuntimeError(f"run {self.execution_id!r} already ended")
        event_id = len(self.frames) + 1
        self.frames.append(b"id: %d\ndata: %s\n\n" % (event_id, orjson.dumps(payload)))
        kind = payload["type"]
        if kind in TERMINAL_TYPES:
            self.status = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}[kind]
        self._wake()

    def close_followers(self) -> None:
        self.followers_closed = True
        self._wake()

    def _wake(self) -> None:
        # Wake every follower; they wait on a fresh event from now on.
        self._changed.set()
        self._changed = anyio.Event()

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """The run's frames after position ``after``, then live ones until the terminal one."""
        position = after
        while True:
            if position < len(self.frames):
                # Whole frames only (the response may slip a keep-alive between two chunks).
                chunk = b"".join(self.frames[position:])
                position = len(self.frames)
                yield chunk
                continue
            if self.finished or self.followers_closed:
                # Closed early, the stream ends without a terminal event: to the client
                # that is a cut connection, which is what it is.
                return
            # No await between the length check and this wait: no append can slip between.
            await self._changed.wait()


class ReferenceSubstrate:
    """The runs of one reference substrate app (``app.state.substrate``).

    Runs execute in a task group opened by ``async with substrate:`` (the app's lifespan does
    it); leaving cancels the runs still going. Finished runs are kept for replay, at most
    ``max_runs`` of them (the oldest are forgotten first); at most ``max_active_runs`` run at
    once (more is a 503).
    """

    def __init__(
        self,
        *,
        tokens: int = 40,
        token_delay_ms: int = 25,
        reply: Reply | None = None,
        keepalive_s: float = 15.0,
        max_runs: int = 10_000,
        max_active_runs: int = 1_000,
    ) -> None:
        _check_range("tokens", tokens, 0, MAX_TOKENS)
        _check_range("token_delay_ms", token_delay_ms, 0, MAX_TOKEN_DELAY_MS)
        if max_runs < 1 or max_active_runs < 1:
            raise ValueError("max_runs and max_active_runs must be positive")
        self.tokens = tokens
        self.token_delay_ms = token_delay_ms
        self.reply: Reply = reply if reply is not None else fake_reply
        self.keepalive_s = keepalive_s
        self.max_runs = max_runs
        self.max_active_runs = max_active_runs
        #: Runs started since the app started, in total.
        self.total_started = 0
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        # Kept apart from the runs so that the witness outlives a forgotten run (bounded too).
        self._starts: OrderedDict[str, int] = OrderedDict()
        self._active = 0
        self._tg: TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> ReferenceSubstrate:
        if self._tg is not None:
            raise RuntimeError("the substrate is already started")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._closing = False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: close_streams_threadsafe is then unavailable
            self._loop = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        self.close_streams()
        tg.cancel_scope.cancel()  # runs still going stop with the app
        await tg.__aexit__(exc_type, exc, tb)

    def close_streams(self) -> None:
        """End every stream now and refuse new runs: the server is stopping.

        A server waits for open responses before it runs the lifespan's shutdown, and a
        stream of a long run would hold it for the whole run. Runs go on until the lifespan
        ends; their streams end at once (to a client, a cut connection: it re-attaches
        elsewhere or later).
        """
        self._closing = True
        for run in self._runs.values():
            run.close_followers()

    def close_streams_threadsafe(self) -> None:
        """:meth:`close_streams` from a signal handler or another thread (asyncio only)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.close_streams)

    # -- runs ------------------------------------------------------------------------------

    def starts(self, execution_id: str) -> int:
        """How many runs were started for ``execution_id`` (1 at most, unless forgotten)."""
        return self._starts.get(execution_id, 0)

    def status(self, execution_id: str) -> str | None:
        run = self._runs.get(execution_id)
        return None if run is None else run.status

    def open(self, execution_id: str, body: Mapping[str, Any]) -> tuple[_Run, bool]:
        """The run of ``execution_id`` and whether this call started it."""
        if self._closing:
            raise _Unavailable("the substrate is shutting down")
        run = self._runs.get(execution_id)
        if run is not None:
            return run, False
        prompt = body.get("prompt")
        if prompt is None:
            raise RunNotFound("no run with this execution id (a POST without prompt attaches)")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidTurnInput("prompt must be a non-empty string", field="prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidTurnInput(
                f"prompt is longer than {MAX_PROMPT_CHARS} characters", field="prompt"
            )
        session = body.get("session")
        if session is not None and not isinstance(session, str):
            raise InvalidTurnInput("session must be a string", field="session")
        tokens, delay_ms = self._options(body.get("options"))
        if self._tg is None:
            raise _Unavailable("the substrate is not started (run the app with its lifespan)")
        if self._active >= self.max_active_runs:
            raise _Unavailable(f"{self.max_active_runs} runs are going on already")

        run = _Run(execution_id)
        # Logged before the task starts, so a client gets the first event (and its handle)
        # without waiting for the first token.
        run.append({"type": STARTED, "executionId": execution_id, "session": session})
        self._runs[execution_id] = run
        self._starts[execution_id] = self._starts.pop(execution_id, 0) + 1
        self.total_started += 1
        self._active += 1
        self._forget_old_runs()
        self._tg.start_soon(self._execute, run, prompt, tokens, delay_ms / 1000)
        return run, True

    def cancel(self, execution_id: str) -> _Run:
        run = self._runs.get(execution_id)
        if run is None:
            raise RunNotFound("no run with this execution id")
        if not run.finished:
            # The terminal event is appended here, at once: a re-attach right after the
            # cancel already ends cancelled, and nothing the task does after it can land.
            run.append({"type": CANCELLED, "executionId": execution_id})
            run.scope.cancel()
        return run

    def describe(self, execution_id: str) -> dict[str, Any]:
        run = self._runs.get(execution_id)
        return {
            "executionId": execution_id,
            "started": self.starts(execution_id),
            "status": None if run is None else run.status,
            "events": 0 if run is None else len(run.frames),
        }

    def summary(self) -> dict[str, Any]:
        runs = {execution_id: self.describe(execution_id) for execution_id in self._starts}
        for entry in runs.values():
            del entry["executionId"]
        return {"total": self.total_started, "active": self._active, "runs": runs}

    def _options(self, options: object) -> tuple[int, int]:
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise InvalidTurnInput("options must be an object", field="options")
        tokens = options.get("tokens", self.tokens)
        delay_ms = options.get("tokenDelayMs", self.token_delay_ms)
        for name, value, maximum in (
            ("tokens", tokens, MAX_TOKENS),
            ("tokenDelayMs", delay_ms, MAX_TOKEN_DELAY_MS),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
                raise InvalidTurnInput(
                    f"options.{name} must be an integer from 0 to {maximum}", field=name
                )
        return tokens, delay_ms

    def _forget_old_runs(self) -> None:
        excess = len(self._runs) - self.max_runs
        if excess > 0:
            for execution_id in [k for k, run in self._runs.items() if run.finished][:excess]:
                del self._runs[execution_id]
        while len(self._starts) > self.max_runs + self.max_active_runs:
            self._starts.popitem(last=False)

    async def _execute(self, run: _Run, prompt: str, tokens: int, delay_s: float) -> None:
        try:
            with run.scope:
                # A cancel that came before this task started is delivered here. Every later
                # append directly follows a checkpoint, and `cancel` is synchronous, so no
                # event can land after a cancel's terminal one.
                await anyio.lowlevel.checkpoint()
                deltas = list(self.reply(prompt, tokens))
                fail_after = FAIL_AFTER if prompt == FAIL_PROMPT else None
                text: list[str] = []
                for index, delta in enumerate(deltas):
                    if index == fail_after:
                        break
                    await anyio.sleep(delay_s)  # also a cancellation point when the delay is 0
                    run.append({"type": TEXT_DELTA, "delta": delta})
                    text.append(delta)
                if fail_after is not None:
                    run.append(
                        {
                            "type": FAILED,
                            "executionId": run.execution_id,
                            "code": "requested_failure",
                            "message": "the prompt asked the run to fail",
                            "retryable": False,
                        }
                    )
                else:
                    run.append(
                        {
                            "type": COMPLETED,
                            "executionId": run.execution_id,
                            "finalText": "".join(text),
                        }
                    )
        except Exception:
            # A broken reply function fails its run, never the substrate's task group.
            logger.exception("run %s failed", run.execution_id)
            if not run.finished:
                run.append(
                    {
                        "type": FAILED,
                        "executionId": run.execution_id,
                        "code": "substrate_error",
                        "message": "the run failed inside the substrate",
                        "retryable": False,
                    }
                )
        finally:
            self._active -= 1


def _check_range(name: str, value: int, minimum: int, maximum: int) -> None:
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be from {minimum} to {maximum}, got {value}")


def _execution_id(value: str | None) -> str:
    if value is None:
        raise InvalidTurnInput("the X-Execution-ID header is required", field="X-Execution-ID")
    # Printable ASCII without spaces: what turnstream's percent-encoded execution ids are, and
    # safe in a header, a log line and (percent-encoded) a URL path.
    if (
        not value
        or len(value) > MAX_EXECUTION_ID_LENGTH
        or not all("!" <= ch <= "~" for ch in value)
    ):
        raise InvalidTurnInput(
            f"X-Execution-ID must be 1 to {MAX_EXECUTION_ID_LENGTH} printable ASCII characters",
            field="X-Execution-ID",
        )
    return value


def _last_event_id(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise InvalidTurnInput(
            "Last-Event-ID must be an event id of this substrate (a decimal number)",
            field="Last-Event-ID",
        )
    return int(value)


def _json(value: object, *, status: int = 200) -> Response:
    return Response(
        orjson.dumps(value),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _unavailable(exc: _Unavailable) -> Response:
    return ProblemResponse(
        503,
        "Substrate unavailable",
        str(exc),
        type=PROBLEM_TYPE_BASE + "substrate-unavailable",
        retry_after=1,
    )


def create_substrate_app(
    *,
    tokens: int = 40,
    token_delay_ms: int = 25,
    reply: Reply | None = None,
    keepalive_s: float = 15.0,
    max_runs: int = 10_000,
) -> Starlette:
    """The reference substrate as a Starlette app (see the module docstring for the protocol).

    Each run yields ``tokens`` text deltas, one every ``token_delay_ms``, from
    ``reply(prompt, tokens)`` (default: :func:`turnstream._demo.fake_reply`). Runs need the
    app's lifespan (uvicorn runs it); under ``httpx.ASGITransport``, enter
    ``app.state.substrate`` yourself. ``app.state.substrate`` is the
    :class:`ReferenceSubstrate`.
    """
    substrate = ReferenceSubstrate(
        tokens=tokens,
        token_delay_ms=token_delay_ms,
        reply=reply,
        keepalive_s=keepalive_s,
        max_runs=max_runs,
    )

    async def run_stream(request: Request) -> Response:
        try:
            execution_id = _execution_id(request.headers.get("x-execution-id"))
            after = _last_event_id(request.headers.get("last-event-id"))
            body = await read_json_body(request, max_bytes=MAX_BODY_BYTES)
            if not isinstance(body, dict):
                raise InvalidTurnInput("the body must be a JSON object", field="body")
            run, started = substrate.open(execution_id, body)
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        except _Unavailable as exc:
            return _unavailable(exc)
        return TurnStreamResponse(
            run.follow(after),
            media_type="text/event-stream",
            headers={
                "X-Execution-ID": execution_id,
                "X-Substrate-Run": "started" if started else "attached",
            },
            keepalive=_KEEPALIVE,
            keepalive_interval=substrate.keepalive_s,
        )

    async def cancel(request: Request) -> Response:
        try:
            execution_id = _execution_id(request.path_params["execution_id"])
            run = substrate.cancel(execution_id)
        except TurnstreamError as exc:
            return problem_for_exception(exc)
        return _json({"executionId": execution_id, "status": run.status}, status=202)

    async def runs(request: Request) -> Response:
        execution_id = request.query_params.get("executionId")
        if execution_id is not None:
            return _json(substrate.describe(execution_id))
        return _json(substrate.summary())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with substrate:
            yield

    app = Starlette(
        routes=[
            Route("/agents/run/stream", run_stream, methods=["POST"]),
            Route("/agents/run/{execution_id}/cancel", cancel, methods=["POST"]),
            Route("/agents/runs", runs, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.substrate = substrate
    return app
