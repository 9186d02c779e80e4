"""``OrchestratorAdapter``: the reconnect adapter for the reference substrate protocol (§8).

It speaks the protocol with httpx and httpx-sse. Substrate events become pump events:

==========================  ==============================================================
substrate event             what the adapter does
==========================  ==============================================================
``text-delta``              yielded as ``{"type": "text-delta", "delta": …}``
``execution.completed``     iteration ends normally (the pump writes the terminal event)
``execution.failed``        raises :class:`~turnstream.SubstrateFailed` with its ``code``
``execution.cancelled``     raises :class:`~turnstream.SubstrateCancelled`
anything else               yielded as ``{"type": "data-substrate", "data": <the event>}``
==========================  ==============================================================

Every yielded event keeps the substrate's event id. Only terminal events are not yielded, and
nothing follows them, so the last id the pump logged is always one the substrate can resume
after. A stream that ends without a terminal event (the connection was cut) raises
:class:`~turnstream.AdapterError`, and the pump re-attaches after the last logged id.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson
from httpx_sse import SSEError, aconnect_sse

from ..._adapter import (
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from ..._exceptions import AdapterError
from ._protocol import CANCELLED, COMPLETED, FAILED, TEXT_DELTA

__all__ = ["DEFAULT_TIMEOUT", "OrchestratorAdapter", "default_body"]

logger = logging.getLogger("turnstream.adapters.orchestrator")

#: The read timeout bounds the silence between two chunks of a stream. The reference
#: substrate sends a keep-alive comment every 15 s, and a token every few ms to seconds.
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=5.0, read=60.0, write=10.0, pool=10.0)

_MAX_PROBLEM_CHARS = 300
_MAX_PROBLEM_BYTES = 64 * 1024

#: Statuses after which trying again can help: they are a broken connection, not a refusal.
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def default_body(request: StartRequest) -> dict[str, Any]:
    """The start body: ``prompt`` from ``input["message"]``, ``session``, ``options``."""
    message = request.input.get("message")
    if not isinstance(message, str):
        raise SubstrateFailed("the turn input has no 'message' string", code="invalid_input")
    options = request.input.get("options")
    return {
        "prompt": message,
        "session": request.identity.session_id,
        "options": dict(options) if isinstance(options, Mapping) else {},
    }


class OrchestratorAdapter:
    """A :class:`~turnstream.ReconnectAdapter` for a substrate at ``base_url``.

    * ``client`` — an ``httpx.AsyncClient`` to share; without one the adapter makes its own
      and closes it in :meth:`aclose` (``async with OrchestratorAdapter(url) as adapter``).
    * ``kind`` — the handle kind the supervisor finds this adapter by; one per substrate.
    * ``headers`` — sent with every request (authentication, for instance).
    * ``timeout`` — per request; default :data:`DEFAULT_TIMEOUT` (the shared client's own
      timeout when a client is given).
    * ``build_body`` — the start body for a turn (default :func:`default_body`).

    The handle is ``RunHandle(kind, run_id=<execution id>, data={"baseUrl": …})``. The base
    URL in it is for operators only: a worker re-attaches through its own adapter's
    ``base_url``, so the substrate's address may differ between workers (and a handle read
    back from the store cannot point a worker at another host).
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        kind: str = "orchestrator",
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,
        build_body: Callable[[StartRequest], Mapping[str, Any]] = default_body,
    ) -> None:
        if not kind:
            raise ValueError("kind must not be empty")
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"base_url is not a URL: {base_url!r}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.kind = kind
        self.base_url = base_url.rstrip("/")
        self.build_body = build_body
        self._headers = dict(headers or {})
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._request_options: dict[str, Any] = {}
        if timeout is not None:
            self._request_options["timeout"] = httpx.Timeout(timeout)
        elif self._owns_client:
            self._request_options["timeout"] = DEFAULT_TIMEOUT

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the HTTP client if the adapter made it (a shared one is the caller's)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> OrchestratorAdapter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"OrchestratorAdapter({self.base_url!r}, kind={self.kind!r})"

    # -- the protocol ----------------------------------------------------------------------

    def handle_for(self, request: StartRequest) -> RunHandle:
        """The substrate names a run by its execution id, so the handle is known up front:
        a turn cancelled before ``start`` yielded it still cancels the substrate run."""
        return RunHandle(self.kind, request.execution_id, {"baseUrl": self.base_url})

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        """Start the turn's run (or, when the substrate has it already, attach from its start).

        The first event carries the handle: the substrate's first event is
        ``execution.started``, sent before any text.
        """
        body = dict(self.build_body(request))
        handle = self.handle_for(request)
        async for event in self._stream(request.execution_id, body, None, handle):
            yield event

    async def attach(
        self, handle: RunHandle, after_event_id: str | None
    ) -> AsyncIterator[SupervisedEvent]:
        """Follow the run from just after ``after_event_id`` (``None``: from its start)."""
        self._check_kind(handle)
        # No prompt: the substrate only attaches, and answers 404 for a run it does not know
        # rather than starting one.
        async for event in self._stream(handle.run_id, {}, after_event_id, None):
            yield event

    async def cancel(self, handle: RunHandle) -> None:
        """Ask the substrate to stop the run. A finished or unknown run is a no-op."""
        self._check_kind(handle)
        url = f"{self.base_url}/agents/run/{quote(handle.run_id, safe='')}/cancel"
        try:
            response = await self._client.post(url, headers=self._headers, **self._request_options)
        except httpx.HTTPError as exc:
            raise AdapterError(f"could not cancel {handle.run_id!r}: {exc!r}") from exc
        # 404: the substrate does not know the run (any more); nothing is left to stop.
        if response.status_code in (200, 202, 204, 404):
            return
        raise AdapterError(
            f"the substrate refused to cancel {handle.run_id!r}: HTTP {response.status_code}"
        )

    # -- the stream ------------------------------------------------------------------------

    def _check_kind(self, handle: RunHandle) -> None:
        if handle.kind != self.kind:
            raise AdapterError(f"a {handle.kind!r} handle given to the {self.kind!r} adapter")

    async def _stream(
        self,
        execution_id: str,
        body: Mapping[str, Any],
        after_event_id: str | None,
        handle: RunHandle | None,
    ) -> AsyncIterator[SupervisedEvent]:
        headers = {**self._headers, "X-Execution-ID": execution_id}
        if after_event_id is not None:
            headers["Last-Event-ID"] = after_event_id
        url = f"{self.base_url}/agents/run/stream"
        try:
            async with aconnect_sse(
                self._client, "POST", url, json=body, headers=headers, **self._request_options
            ) as source:
                response = source.response
                if response.status_code != 200:
                    problem = await _read_at_most(response, _MAX_PROBLEM_BYTES)
                    raise _status_error(
                        response.status_code, problem, execution_id, attaching="prompt" not in body
                    )
                async for sse in source.aiter_sse():
                    event_id, event = _decode(sse.id, sse.data)
                    if event_id == after_event_id:
                        continue  # never the cursor itself, whatever the substrate does
                    kind = event["type"]
                    if kind == COMPLETED:
                        return
                    if kind == FAILED:
                        raise _failed(event)
                    if kind == CANCELLED:
                        raise SubstrateCancelled(f"the substrate cancelled {execution_id!r}")
                    yield SupervisedEvent(event_id, _payload(event), handle)
                    handle = None  # only the first event carries it
        except (httpx.HTTPError, SSEError) as exc:
            raise AdapterError(f"the substrate stream of {execution_id!r} broke: {exc!r}") from exc
        raise AdapterError(f"the substrate stream of {execution_id!r} ended before its run did")


def _decode(event_id: str, data: str) -> tuple[str, dict[str, Any]]:
    if not event_id:
        raise AdapterError("the substrate sent an event without an id")
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise AdapterError(f"the substrate sent an event that is not JSON: {exc}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise AdapterError("the substrate sent an event that is not an object with a 'type'")
    return event_id, event


def _payload(event: dict[str, Any]) -> dict[str, Any]:
    delta = event.get("delta")
    if event["type"] == TEXT_DELTA and isinstance(delta, str):
        # Rebuilt rather than passed on: a substrate's extra keys could collide with the
        # log's own (`seq`, `eventId`).
        return {"type": "text-delta", "delta": delta}
    # An AI SDK data part: anything the client may want to show, and nothing it must parse.
    return {"type": "data-substrate", "data": event}


def _failed(event: Mapping[str, Any]) -> SubstrateFailed:
    code = event.get("code")
    message = event.get("message")
    return SubstrateFailed(
        message if isinstance(message, str) and message else "the substrate run failed",
        code=code if isinstance(code, str) and code else "substrate_failed",
        retryable=event.get("retryable") is True,
    )


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    # An error body is only read for its message: a misbehaving server cannot make it big.
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return body[:limit]


def _status_error(status: int, body: bytes, execution_id: str, *, attaching: bool) -> Exception:
    detail = ""
    try:
        problem = orjson.loads(body)
    except orjson.JSONDecodeError:
        problem = None
    if isinstance(problem, dict):
        detail = str(problem.get("detail") or problem.get("title") or "")[:_MAX_PROBLEM_CHARS]
    message = f"the substrate answered HTTP {status} for {execution_id!r}" + (
        f": {detail}" if detail else ""
    )
    if status in _TRANSIENT_STATUSES:
        return AdapterError(message)
    if status == 404 and attaching:
        # The run is gone from the substrate: no number of re-attaches will bring it back.
        return SubstrateFailed(message, code="substrate_run_not_found")
    return SubstrateFailed(message, code="substrate_rejected")
