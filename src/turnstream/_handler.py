"""``handle_chat_turn``: the framework-neutral entry point of a chat turn.

It classifies the request (fresh, replayed, joined, restarted — docs/lifecycle.md), starts the pump
when this request owns the turn, and returns a streaming result whose body is a reader from
the client's cursor. It never raises into the HTTP layer: errors before the stream are
problem documents, errors after it are in-band events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._adapter import ReconnectAdapter
from ._events import ERROR, LoggedEvent
from ._exceptions import (
    InvalidTurnInput,
    OwnerLost,
    PayloadTooLarge,
    StoreError,
    TurnInputMismatch,
    TurnstreamError,
)
from ._framing import (
    AI_SDK_HEADERS,
    AiSdkFramer,
    StreamFormat,
    frame_ai_sdk_chunk,
    frame_ndjson,
    frame_sse,
    negotiate_format,
    parse_cursor,
)
from ._hooks import Producer, TurnHooks
from ._identity import TurnIdentity, canonical_input_hash
from ._problems import problem_for_exception
from ._reader import read_batches
from ._response import TurnStreamResponse
from ._retry import should_reopen
from ._store import BeginOutcome, RunKey, TurnStore
from ._supervisor import Supervisor

__all__ = ["ChatTurnResult", "handle_chat_turn", "stream_run"]

logger = logging.getLogger("turnstream.handler")

_MODES = {
    BeginOutcome.FRESH: "fresh",
    BeginOutcome.COMPLETED: "replayed",
    BeginOutcome.LIVE: "joined",
    BeginOutcome.TAKEOVER: "restarted",
}


@dataclass
class ChatTurnResult:
    """What a turn request answers. An ASGI app itself (return it from a Starlette endpoint);
    ``.response`` is the same as a Starlette ``Response`` (return that from FastAPI)."""

    status: int
    media_type: str
    headers: dict[str, str]
    body: AsyncIterable[bytes] | bytes
    execution_id: str | None = None
    mode: str | None = None
    keepalive: bytes | None = None
    keepalive_s: float = 15.0
    send_timeout_s: float = 30.0
    _response: Response | None = field(default=None, repr=False)

    @property
    def response(self) -> Response:
        if self._response is None:
            if isinstance(self.body, bytes):
                self._response = Response(
                    self.body,
                    status_code=self.status,
                    headers=self.headers,
                    media_type=self.media_type,
                )
            else:
                self._response = TurnStreamResponse(
                    self.body,
                    status_code=self.status,
                    headers=self.headers,
                    media_type=self.media_type,
                    keepalive=self.keepalive,
                    keepalive_interval=self.keepalive_s,
                    send_timeout=self.send_timeout_s,
                )
        return self._response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.response(scope, receive, send)


def _problem_result(exc: BaseException, execution_id: str | None = None) -> ChatTurnResult:
    problem = problem_for_exception(exc)
    headers = {k: v for k, v in problem.headers.items() if k.lower() not in _SKIP_HEADERS}
    if execution_id is not None:
        headers["X-Execution-Id"] = execution_id
    return ChatTurnResult(
        status=problem.status_code,
        media_type="application/problem+json",
        headers=headers,
        body=bytes(problem.body),
        execution_id=execution_id,
    )


_SKIP_HEADERS = {"content-length", "content-type"}


def _stream_error_frame(fmt: StreamFormat, code: str, message: str) -> bytes:
    # Not logged (the store is what failed): no seq, so a resuming client keeps its cursor.
    if fmt is StreamFormat.AI_SDK:
        # No `[DONE]` after it: the message is not whole, the client should resume.
        return frame_ai_sdk_chunk({"type": "error", "errorText": message})
    payload = orjson.dumps({"type": ERROR, "code": code, "message": message, "retryable": True})
    if fmt is StreamFormat.SSE:
        return b"event: error\ndata: " + payload + b"\n\n"
    return payload + b"\n"


# A batch is framed into chunks of about this size: big enough that one send carries
# hundreds of events, small enough that a late joiner's catch-up is not one huge message.
_CHUNK_BYTES = 64 * 1024


async def _frames(
    batches: AsyncIterator[list[LoggedEvent]],
    fmt: StreamFormat,
    key: RunKey,
    store: TurnStore,
    min_attempt: int,
) -> AsyncIterator[bytes]:
    execution_id = key.execution_id
    try:
        if fmt is StreamFormat.AI_SDK:
            # The AI SDK cannot take text back, so the attempts a restart superseded before
            # this stream began are left out: the run's attempt says which they are.
            run = await store.get_run(key)
            attempt = max(min_attempt, run.attempt if run is not None else 1)
            framer = AiSdkFramer(hidden_below=attempt)
            frame = framer.frame  # stateful: one per response
        else:
            frame = frame_sse if fmt is StreamFormat.SSE else frame_ndjson
        async for batch in batches:
            pieces: list[bytes] = []
            size = 0
            for event in batch:
                wire = frame(event)  # empty for an event the format leaves out
                pieces.append(wire)
                size += len(wire)
                if size >= _CHUNK_BYTES:
                    yield b"".join(pieces)
                    pieces, size = [], 0
            if size:
                yield b"".join(pieces)
    except StoreError as exc:
        logger.warning("store failed while streaming %s: %s", execution_id, exc)
        yield _stream_error_frame(
            fmt, "store_unavailable", "the turn's log cannot be read right now; resume later"
        )
    except OwnerLost:
        yield _stream_error_frame(
            fmt, "owner_lost", "the worker running this turn stopped; retry the turn to restart it"
        )
    finally:
        await batches.aclose()  # type: ignore[attr-defined]


def _stream_headers(execution_id: str, mode: str, fmt: StreamFormat) -> dict[str, str]:
    headers = {
        "X-Execution-Id": execution_id,
        "X-Turn-Mode": mode,
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    }
    if fmt is StreamFormat.AI_SDK:
        headers.update(AI_SDK_HEADERS)
    return headers


def stream_run(
    supervisor: Supervisor,
    key: RunKey,
    *,
    fmt: StreamFormat,
    after: int,
    mode: str,
    min_attempt: int = 1,
) -> ChatTurnResult:
    """A streaming result reading ``key``'s log from ``after`` (also used by the resume route).

    A format that replays whole turns (the AI SDK's) ignores ``after`` and reads from the start;
    it leaves out the attempts below the run's current one, or below ``min_attempt`` when the
    caller knows a newer attempt is starting.
    """
    limits = supervisor.limits
    if fmt.replays_whole_turn:
        after = 0
    return ChatTurnResult(
        status=200,
        media_type=fmt.media_type,
        headers=_stream_headers(key.execution_id, mode, fmt),
        body=_frames(
            read_batches(supervisor, key, after=after), fmt, key, supervisor.store, min_attempt
        ),
        execution_id=key.execution_id,
        mode=mode,
        keepalive=fmt.keepalive,
        keepalive_s=limits.keepalive_s,
        send_timeout_s=limits.send_timeout_s,
    )


async def handle_chat_turn(
    identity: TurnIdentity,
    input: Mapping[str, Any],
    *,
    supervisor: Supervisor,
    produce: Producer | None = None,
    adapter: ReconnectAdapter | None = None,
    hooks: TurnHooks | None = None,
    format: str | None = None,
    accept: str | None = None,
    cursor: str | int | None = None,
    last_event_id: str | None = None,
    request: Request | None = None,
    retry: bool | None = None,
) -> ChatTurnResult:
    """Answer one chat-turn request.

    ``input`` is the turn's input as the app understands it (hashed to tell a retry from a
    conflicting request, and handed to the producer). The turn's events come from
    ``produce`` (a local producer: restarted if its worker dies) or from ``adapter`` (a
    reconnect adapter: any worker re-attaches to the substrate run). ``format`` /
    ``accept`` choose the framing; ``cursor`` (``?after=``) or ``last_event_id`` resume a
    stream after a seq (``format="ai-sdk"``, the AI SDK's UI message stream, checks them but
    always replays the turn from its start). Given a Starlette/FastAPI ``request``, those four
    default to its ``?format=``, ``Accept``, ``?after=`` and ``Last-Event-ID``.

    A turn that ended failed starts a new attempt when its error was ``retryable`` (or with
    ``retry=True``; ``retry=False`` always replays it): ``X-Turn-Mode: restarted``.
    """
    if request is not None:
        format = format if format is not None else request.query_params.get("format")
        accept = accept if accept is not None else request.headers.get("accept")
        cursor = cursor if cursor is not None else request.query_params.get("after")
        if last_event_id is None:
            last_event_id = request.headers.get("last-event-id")
    execution_id: str | None = None
    try:
        execution_id = identity.execution_id
        fmt = negotiate_format(format, accept)
        after = parse_cursor(None if cursor is None else str(cursor), last_event_id)
        if hooks is None:
            # The supervisor's hooks are every turn's defaults (persistence, tracing…), so
            # that a turn recovered by another worker is treated like this one.
            hooks = supervisor.hooks
        if produce is not None:
            hooks = replace(hooks, produce=produce)
        elif adapter is not None and hooks.produce is not None:
            hooks = replace(hooks, produce=None)
        if (hooks.produce is None) == (adapter is None):
            raise TypeError(
                "handle_chat_turn needs one source of events: produce= (or hooks.produce) "
                "or adapter="
            )
        if adapter is not None:
            supervisor.register_adapter(adapter)
        _check_input_size(input, supervisor)
        input_hash = canonical_input_hash(input)
        key = supervisor.run_key(identity.tenant_id, identity.user_id, execution_id)
        await supervisor.ensure_started()
        result = await supervisor.begin(key, input_hash=input_hash, user_id=identity.user_id)
        reopened = False
        if result.outcome is BeginOutcome.COMPLETED and await should_reopen(
            supervisor.store, key, result.run, retry
        ):
            result = await supervisor.begin(
                key, input_hash=input_hash, user_id=identity.user_id, reopen_failed=True
            )
            reopened = result.outcome is BeginOutcome.TAKEOVER
        if result.outcome is BeginOutcome.MISMATCH:
            raise TurnInputMismatch(
                "this turn was already started with a different input; "
                "use a new turn index for a new message"
            )
        mode = _MODES[result.outcome]
        min_attempt = 1
        if result.outcome is BeginOutcome.FRESH:
            supervisor.start_pump(
                result, identity=identity, input=input, hooks=hooks, mode="fresh", adapter=adapter
            )
        elif reopened:
            # A retry of a failed turn: a new attempt after the failed one, in the same log
            # (an adapter starts a new substrate run for it: StartRequest.attempt says which).
            min_attempt = result.run.attempt + 1
            supervisor.start_pump(
                result, identity=identity, input=input, hooks=hooks, mode="retry", adapter=adapter
            )
        elif result.outcome is BeginOutcome.TAKEOVER:
            found = supervisor.adapter_for(result.run.handle) if adapter is not None else None
            if adapter is not None and found is not None and found[1].kind == adapter.kind:
                # The substrate run goes on without us: re-attach after the last logged event.
                mode = "resumed"
                supervisor.start_pump(
                    result,
                    identity=identity,
                    input=input,
                    hooks=hooks,
                    mode="resume",
                    adapter=adapter,  # this request's instance: it may be built per request
                    handle=found[1],
                )
            elif result.run.cancel_requested:
                # Cancelled while nobody owned it: the pump only ends it, cancelled, with
                # the text of the attempt that was cancelled (nothing is produced again).
                mode = "joined"
                supervisor.start_pump(
                    result,
                    identity=identity,
                    input=input,
                    hooks=hooks,
                    mode="restart",
                    adapter=adapter,
                )
            else:
                # Nothing to re-attach to (a local producer, or no handle was logged yet):
                # a new attempt; the log says `session.run.restarted`. The pump counts the
                # attempt up after this returns, so the reader is told which one is coming.
                min_attempt = result.run.attempt + 1
                supervisor.start_pump(
                    result,
                    identity=identity,
                    input=input,
                    hooks=hooks,
                    mode="restart",
                    adapter=adapter,
                )
    except TurnstreamError as exc:
        return _problem_result(exc, execution_id)
    return stream_run(supervisor, key, fmt=fmt, after=after, mode=mode, min_attempt=min_attempt)


def _check_input_size(input: Mapping[str, Any], supervisor: Supervisor) -> None:
    if not isinstance(input, Mapping):
        raise InvalidTurnInput("the turn input must be a JSON object", field="input")
    limit = supervisor.limits.max_body_bytes
    try:
        size = len(orjson.dumps(input))
    except TypeError as exc:
        raise InvalidTurnInput(f"the turn input is not JSON: {exc}", field="input") from exc
    if size > limit:
        raise PayloadTooLarge(f"the turn input is over {limit} bytes", field="input")
