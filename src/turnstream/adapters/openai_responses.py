"""The reconnect adapter for OpenAI Responses in background mode.

A background response (``background=True``) runs on OpenAI's side whether or not anyone is
connected, so a turn survives the worker that started it. ``start`` creates the response with
``background=True, stream=True``; ``attach`` resumes its event stream with
``GET /v1/responses/{id}?stream=true&starting_after=N``; ``cancel`` is
``POST /v1/responses/{id}/cancel``. Needs ``openai>=1.82`` (the ``turnstream[openai]`` extra):
the first SDK whose ``responses.retrieve`` takes ``stream`` and ``starting_after``.

Every stream event carries ``sequence_number`` (0, 1, 2… within the response, ``response.created``
is 0). It becomes the ``eventId`` verbatim, so the seam of a re-attach dedups by itself and the
pump's cursor is always a sequence number. Events map to turnstream payloads as follows:

* ``response.created``, ``response.queued``, ``response.in_progress`` →
  ``{"type": "data-openai", "data": {"event", "responseId", "status"}}``; ``start`` puts the
  :class:`RunHandle` on the first of them (``response.created``, sequence number 0);
* ``response.output_text.delta`` → ``{"type": "text-delta", "delta": …}``;
* event types named in ``forward_events`` → ``{"type": "data-openai", "data": {"event",
  "payload": <the event as JSON>}}``;
* ``response.completed`` → iteration ends (nothing logged: the pump writes the terminal
  event); the streamed text is checked against the response's output text;
* ``response.failed`` and ``error`` → :class:`SubstrateFailed` with OpenAI's error code
  (``substrate_failed`` / ``substrate_error`` when it gives none; ``server_error`` and
  ``rate_limit_exceeded`` are ``retryable``);
* ``response.incomplete`` → ``SubstrateFailed(code="incomplete")``: the turn did not say all
  it meant to (``max_output_tokens``, a content filter); the text so far stays logged;
* ``response.cancelled``, or any ``response.*`` event whose response has status
  ``cancelled`` → :class:`SubstrateCancelled`;
* keep-alives (no ``sequence_number``) and every other event → skipped.

Skipping is deterministic, so it never breaks the cursor: a resume after the last *logged*
sequence number receives the skipped events again and skips them again. ``attach`` also drops
any event at or before its cursor, whatever the server sends.

A stream that ends without a terminal event (a dropped connection, a proxy timeout, or a
cancel that closes the stream without an event) is settled by reading the response: cancelled
or failed end the turn that way; queued, in progress or completed raise a plain
:class:`AdapterError`, on which the pump re-attaches after the last event it has and so
receives the rest (the server replays a finished response's remaining events too).

Errors: an unreachable API, a timeout, 408, 429 and 5xx are :class:`AdapterError` (transient:
the pump re-attaches); 404 is ``SubstrateFailed(code="substrate_not_found")`` (unknown or
expired response); any other 4xx is ``SubstrateFailed(code="substrate_rejected")``.

``create`` is sent with ``max_retries=0``: a retry after a lost reply could start a second,
billed response for the same turn. Reads and cancels keep the client's retry policy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import anyio
import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.responses import ResponseStreamEvent

from .._adapter import RunHandle, StartRequest, SubstrateCancelled, SubstrateFailed, SupervisedEvent
from .._exceptions import AdapterError

__all__ = ["OpenAIResponsesAdapter"]

logger = logging.getLogger("turnstream.adapters.openai_responses")

EVENT_TYPE: Final = "data-openai"
METADATA_KEY: Final = "turnstream_execution_id"

_LIFECYCLE: Final = frozenset({"response.created", "response.queued", "response.in_progress"})
_CANCELLED_EVENTS: Final = frozenset({"response.cancelled", "response.canceled"})
_RESERVED_KWARGS: Final = frozenset({"model", "input", "instructions", "background", "stream"})
_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})
_RETRYABLE_CODES: Final = frozenset({"server_error", "rate_limit_exceeded"})
_CLOSE_TIMEOUT_S: Final = 5.0


class OpenAIResponsesAdapter:
    """Runs a turn as an OpenAI background response and re-attaches to it by its id.

    ``client`` is the app's :class:`openai.AsyncOpenAI` (the adapter never closes it).
    ``create_kwargs`` go to ``responses.create`` as they are (``temperature``, ``tools``,
    ``max_output_tokens``…); ``metadata`` is merged with ``turnstream_execution_id``.
    ``forward_events`` names extra stream event types to log as ``data-openai`` events.

    The turn's input is ``input["messages"]`` (a list of ``{"role", "content"}``) when given,
    else ``input["message"]`` (a string).
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        instructions: str | None = None,
        kind: str = "openai-responses",
        forward_events: Iterable[str] = (),
        **create_kwargs: Any,
    ) -> None:
        reserved = sorted(_RESERVED_KWARGS & create_kwargs.keys())
        if reserved:
            raise TypeError(f"the adapter sets {', '.join(reserved)} itself")
        metadata = create_kwargs.pop("metadata", None) or {}
        if not isinstance(metadata, Mapping):
            raise TypeError("metadata must be a mapping of strings")
        self.kind = kind
        self.client = client
        # Shares the client's connection pool; see the module docstring for why no retries.
        self._create_client = client.with_options(max_retries=0)
        self.model = model
        self.instructions = instructions
        self.forward_events = frozenset(forward_events)
        self._metadata: dict[str, str] = dict(metadata)
        self._create_kwargs = create_kwargs

    # -- the ReconnectAdapter protocol -----------------------------------------------------

    async def start(self, request: StartRequest) -> AsyncIterator[SupervisedEvent]:
        params: dict[str, Any] = {
            **self._create_kwargs,
            "model": self.model,
            "input": _input_of(request.input),
            "background": True,
            "stream": True,
            "metadata": {
                **self._metadata,
                METADATA_KEY: request.execution_id,
                "turnstream_attempt": str(request.attempt),
            },
        }
        if self.instructions is not None:
            params["instructions"] = self.instructions

        async def create() -> object:
            return await self._create_client.responses.create(**params)

        handle_data = {"model": self.model}
        async for event in self._follow(create, after=None, handle_data=handle_data):
            yield event

    async def attach(
        self, handle: RunHandle, after_event_id: str | None
    ) -> AsyncIterator[SupervisedEvent]:
        after = _cursor(after_event_id)
        responses = self.client.responses

        async def retrieve() -> object:
            if after is None:
                # No cursor: the stream replays the response from its first event.
                return await responses.retrieve(handle.run_id, stream=True)
            return await responses.retrieve(handle.run_id, stream=True, starting_after=after)

        async for event in self._follow(
            retrieve, after=after, handle_data=None, response_id=handle.run_id
        ):
            yield event

    async def cancel(self, handle: RunHandle) -> None:
        try:
            await self.client.responses.cancel(handle.run_id)
        except openai.APIStatusError as exc:
            # OpenAI answers 400 ("Cannot cancel a completed response") for a finished one and
            # 404 for an unknown or expired one: nothing is left to stop either way.
            if exc.status_code in (400, 404, 409):
                logger.debug("cancel of %s: %s", handle.run_id, exc)
                return
            raise _translate(exc, handle.run_id) from exc
        except openai.APIError as exc:
            raise _translate(exc, handle.run_id) from exc

    # -- the stream ------------------------------------------------------------------------

    async def _follow(
        self,
        open_stream: Callable[[], Awaitable[object]],
        *,
        after: int | None,
        handle_data: Mapping[str, Any] | None,
        response_id: str | None = None,
    ) -> AsyncIterator[SupervisedEvent]:
        try:
            stream = await open_stream()
        except openai.APIError as exc:
            raise _translate(exc, response_id) from exc
        if not isinstance(stream, AsyncStream):
            raise AdapterError(f"expected an event stream from OpenAI, got {type(stream)!r}")

        pending_handle: RunHandle | None = None
        text: list[str] = []
        try:
            try:
                async for event in stream:
                    name, seq = _field(event, "type"), _field(event, "sequence_number")
                    if not isinstance(name, str) or not isinstance(seq, int):
                        continue  # a keep-alive: nothing to log, nothing to resume after
                    if after is not None and seq <= after:
                        continue
                    response = _field(event, "response")
                    if response_id is None:
                        found = _field(response, "id")
                        if isinstance(found, str) and found:
                            response_id = found
                            if handle_data is not None:
                                pending_handle = RunHandle(self.kind, found, dict(handle_data))
                    if name in _CANCELLED_EVENTS or (
                        name.startswith("response.") and _field(response, "status") == "cancelled"
                    ):
                        raise SubstrateCancelled(f"OpenAI response {response_id} was cancelled")
                    if name == "response.completed":
                        self._verify_text(response, "".join(text), whole=after is None)
                        return
                    if name == "response.failed":
                        raise _failed(response, response_id)
                    if name == "response.incomplete":
                        raise _incomplete(response, response_id)
                    if name == "error":
                        raise _error_event(event)
                    payload = self._payload(name, event, response)
                    if payload is None:
                        continue
                    if payload["type"] == "text-delta":
                        text.append(payload["delta"])
                    yield SupervisedEvent(str(seq), payload, pending_handle)
                    pending_handle = None
            except openai.APIError as exc:
                raise _translate(exc, response_id) from exc
        finally:
            # Shielded: the pump closes this generator from a cancelled scope, and an unclosed
            # stream would keep its connection (and the response's event feed) open.
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT_S):
                await stream.close()
        await self._settle(response_id)

    def _payload(
        self, name: str, event: ResponseStreamEvent, response: object
    ) -> dict[str, Any] | None:
        if name == "response.output_text.delta":
            delta = _field(event, "delta")
            return {"type": "text-delta", "delta": delta} if isinstance(delta, str) else None
        if name in _LIFECYCLE:
            data = {"event": name, "responseId": _field(response, "id")}
            status = _field(response, "status")
            if isinstance(status, str):
                data["status"] = status
            return {"type": EVENT_TYPE, "data": data}
        if name in self.forward_events:
            dump = getattr(event, "to_dict", None)
            body = dump(mode="json", warnings=False) if callable(dump) else {}
            return {"type": EVENT_TYPE, "data": {"event": name, "payload": body}}
        return None

    async def _settle(self, response_id: str | None) -> None:
        """The stream ended without a terminal event: read the response to learn why."""
        if response_id is None:
            raise AdapterError("the OpenAI stream ended before the response was created")
        try:
            response = await self.client.responses.retrieve(response_id)
        except openai.APIError as exc:
            raise _translate(exc, response_id) from exc
        status = _field(response, "status")
        if status == "cancelled":
            raise SubstrateCancelled(f"OpenAI response {response_id} was cancelled")
        if status == "failed":
            raise _failed(response, response_id)
        if status == "incomplete":
            raise _incomplete(response, response_id)
        # queued / in_progress / completed: the connection dropped. The pump re-attaches after
        # the last event it has; the server replays the rest, terminal event included.
        raise AdapterError(f"the stream of OpenAI response {response_id} ended early ({status})")

    def _verify_text(self, response: object, streamed: str, *, whole: bool) -> None:
        # The final text is what the deltas assembled to, as logged and delivered;
        # a difference from OpenAI's own output means deltas were lost or doubled. Failing the
        # turn now would not take back what clients already saw, so it is reported, not raised.
        final = _output_text(response)
        if final is None:
            return
        if final == streamed if whole else final.endswith(streamed):
            return
        logger.warning(
            "OpenAI response %s: the streamed text (%d chars) does not match its output (%d chars)",
            _field(response, "id"),
            len(streamed),
            len(final),
        )


# -- helpers -------------------------------------------------------------------------------


def _field(value: object, name: str) -> object:
    """A field of an SDK model or of a plain dict (unknown event types keep raw dicts)."""
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _cursor(after_event_id: str | None) -> int | None:
    if after_event_id is None:
        return None
    try:
        after = int(after_event_id)
    except ValueError:
        after = -1
    if after < 0 or str(after) != after_event_id:
        raise SubstrateFailed(
            f"{after_event_id!r} is not an OpenAI sequence number", code="invalid_cursor"
        )
    return after


def _input_of(turn_input: Mapping[str, Any]) -> str | list[dict[str, str]]:
    messages = turn_input.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise SubstrateFailed("input 'messages' must be a non-empty list", code="invalid_input")
        result: list[dict[str, str]] = []
        for message in messages:
            role = _field(message, "role")
            content = _field(message, "content")
            if role not in _ROLES or not isinstance(content, str) or not isinstance(role, str):
                raise SubstrateFailed(
                    "each message needs a role (user, assistant, system, developer) and a "
                    "string content",
                    code="invalid_input",
                )
            result.append({"role": role, "content": content})
        return result
    message = turn_input.get("message")
    if not isinstance(message, str):
        raise SubstrateFailed("the turn input has no 'message' string", code="invalid_input")
    return message


def _output_text(response: object) -> str | None:
    """``Response.output_text``, tolerant of a response sent without its ``output``."""
    output = _field(response, "output")
    if not isinstance(output, list) or not output:
        return None
    parts: list[str] = []
    for item in output:
        if _field(item, "type") != "message":
            continue
        content = _field(item, "content")
        for part in content if isinstance(content, list) else ():
            text = _field(part, "text")
            if _field(part, "type") == "output_text" and isinstance(text, str):
                parts.append(text)
    return "".join(parts)


def _failed(response: object, response_id: str | None) -> SubstrateFailed:
    error = _field(response, "error")
    code, message = _field(error, "code"), _field(error, "message")
    code = code if isinstance(code, str) and code else "substrate_failed"
    if not isinstance(message, str) or not message:
        message = f"OpenAI response {response_id} failed"
    return SubstrateFailed(message, code=code, retryable=code in _RETRYABLE_CODES)


def _incomplete(response: object, response_id: str | None) -> SubstrateFailed:
    reason = _field(_field(response, "incomplete_details"), "reason")
    why = reason if isinstance(reason, str) else "unknown reason"
    return SubstrateFailed(f"OpenAI response {response_id} is incomplete: {why}", code="incomplete")


def _error_event(event: object) -> SubstrateFailed:
    code, message = _field(event, "code"), _field(event, "message")
    return SubstrateFailed(
        message if isinstance(message, str) and message else "OpenAI reported an error",
        code=code if isinstance(code, str) and code else "substrate_error",
        retryable=code in _RETRYABLE_CODES,
    )


def _translate(exc: openai.APIError, response_id: str | None) -> AdapterError:
    what = f"OpenAI response {response_id}" if response_id else "OpenAI"
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return AdapterError(f"cannot reach {what}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 404:
            return SubstrateFailed(f"{what} was not found", code="substrate_not_found")
        if status in (408, 429) or status >= 500:
            return AdapterError(f"{what} answered {status}: {exc.message}")
        return SubstrateFailed(
            f"{what} rejected the request ({status}): {exc.message}", code="substrate_rejected"
        )
    # An error the SDK read out of the event stream itself.
    return _error_event(exc.body if isinstance(exc.body, Mapping) else {"message": exc.message})
