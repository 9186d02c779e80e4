"""turnstream on Django (ASGI): turn a Django request into ``handle_chat_turn``'s arguments
and its result into a Django response.

    from turnstream.django import chat_turn_request, django_problem, django_response, stream_options

    async def chat(request):
        try:
            who = await authorize_request(authorize, request)  # 401 / 403 / 500
            body = chat_turn_request(request)           # strict: 400 / 413 problem documents
        except TurnstreamError as exc:
            return django_problem(exc)
        identity = TurnIdentity(who.tenant_id, "chat", body.session_id, who.user_id,
                                body.turn_index)
        result = await handle_chat_turn(identity, {"message": body.message},
                                        supervisor=supervisor, hooks=hooks,
                                        **stream_options(request))
        return django_response(result)

The turn routes and the lifespan come from :class:`turnstream.TurnstreamMiddleware` wrapped
around Django's ASGI application (Django does not speak lifespan; the middleware answers it).

Django itself is imported only when these functions run: importing this module needs nothing
but turnstream. Django streams an async iterator under ASGI chunk by chunk and cancels it when
the client disconnects (Django ≥ 5.0), which stops the turn's reader (never the turn). What
``TurnStreamResponse`` adds on Starlette (keep-alives, a bound on a client that stops reading),
:func:`django_response` adds around the body, since Django sends it with its own machinery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, TypedDict

from ._exceptions import PayloadTooLarge
from ._handler import ChatTurnResult, _problem_result
from ._hooks import Limits
from ._requests import ChatTurnRequest, decode_json_body

logger = logging.getLogger("turnstream.django")

__all__ = [
    "StreamOptions",
    "chat_turn_request",
    "django_problem",
    "django_response",
    "stream_options",
]


class StreamOptions(TypedDict):
    """``handle_chat_turn``'s framing and cursor arguments, as a Django request gives them."""

    format: str | None
    accept: str | None
    cursor: str | None
    last_event_id: str | None


def stream_options(request: Any) -> StreamOptions:
    """``?format=``, ``Accept``, ``?after=`` and ``Last-Event-ID`` of a Django ``HttpRequest``
    (what ``request=`` reads from a Starlette request): ``handle_chat_turn(...,
    **stream_options(request))``."""
    return StreamOptions(
        format=request.GET.get("format"),
        accept=request.headers.get("accept"),
        cursor=request.GET.get("after"),
        last_event_id=request.headers.get("last-event-id"),
    )


def chat_turn_request(request: Any, *, limits: Limits | None = None) -> ChatTurnRequest:
    """The common chat body of a Django ``HttpRequest``, checked like ``ChatTurnRequest.read``.

    Raises :class:`~turnstream.InvalidTurnInput` (400) or :class:`~turnstream.PayloadTooLarge`
    (413); answer them with :func:`django_problem`.

    ``limits.body_timeout_s`` does not apply here, and cannot: Django's ``ASGIHandler`` reads
    the whole body (with no deadline of its own) before it calls the view, so by the time
    this runs the body has arrived, however slowly. Bound it in front of Django (a proxy's
    body timeout, e.g. nginx's ``client_body_timeout``). The turn routes of
    :class:`~turnstream.TurnstreamMiddleware` (cancel's body) are read by turnstream before
    Django sees the request, and are bounded.
    """
    from django.core.exceptions import RequestDataTooBig

    limits = limits or Limits()
    try:
        raw = request.body
    except RequestDataTooBig:
        # Django's own DATA_UPLOAD_MAX_MEMORY_SIZE, when it is below max_body_bytes.
        raise PayloadTooLarge("the body is over Django's upload limit", field="body") from None
    body = decode_json_body(
        raw, content_type=request.headers.get("content-type"), max_bytes=limits.max_body_bytes
    )
    return ChatTurnRequest.from_json(body, limits=limits)


def django_response(result: ChatTurnResult) -> Any:
    """A Django response for ``result``: a ``StreamingHttpResponse`` over its body (the stream
    of frames), or an ``HttpResponse`` for a problem document. Status, media type and headers
    (``X-Execution-Id``, ``X-Turn-Mode``, ``Cache-Control``…) are the result's."""
    from django.http import HttpResponse, StreamingHttpResponse

    headers = {k: v for k, v in result.headers.items() if k.lower() != "content-type"}
    if isinstance(result.body, bytes):
        return HttpResponse(
            result.body, status=result.status, content_type=result.media_type, headers=headers
        )
    headers.setdefault("Cache-Control", "no-store")
    headers.setdefault("X-Accel-Buffering", "no")
    return StreamingHttpResponse(
        _paced(result.body, result.keepalive, result.keepalive_s, result.send_timeout_s),
        status=result.status,
        content_type=result.media_type,
        headers=headers,
    )


def django_problem(exc: BaseException) -> Any:
    """The RFC 9457 problem document for ``exc`` as a Django ``HttpResponse``."""
    return django_response(_problem_result(exc))


async def _paced(
    body: AsyncIterable[bytes], keepalive: bytes | None, keepalive_s: float, send_timeout_s: float
) -> AsyncIterator[bytes]:
    """``body`` with keep-alives when idle, dropped when the client stops reading.

    The body is iterated by one feeder task of its own, through a one-slot queue: waiting for
    the next chunk under a keep-alive timeout must never cancel the body mid-``__anext__`` (an
    async generator does not survive that), and the reader's cancel scopes must stay in one
    task. A client that stops reading stops Django pulling from here, so the feeder's put
    times out after ``send_timeout_s`` and closes the reader; Django's blocked send is
    Django's. Django cancels this generator when the client disconnects: the feeder goes too.
    Django runs on asyncio only, hence asyncio here.
    """
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)

    async def feed() -> None:
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                try:
                    await asyncio.wait_for(queue.put(chunk), send_timeout_s)
                except TimeoutError:
                    logger.debug("turn stream ended early: client read nothing for %s s",
                                 send_timeout_s)
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    feeder = asyncio.create_task(feed())
    getter: asyncio.Task[bytes] | None = None
    try:
        while True:
            getter = getter or asyncio.create_task(queue.get())
            done, _ = await asyncio.wait(
                {getter, feeder},
                timeout=keepalive_s if keepalive is not None else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if getter in done:
                chunk, getter = getter.result(), None
                yield chunk
            elif feeder in done:
                while not queue.empty():
                    yield queue.get_nowait()
                feeder.result()  # the body's exception, if any, as on Starlette
                return
            elif keepalive is not None:
                yield keepalive  # idle for keepalive_s; the getter waits on, unharmed
    finally:
        for task in (getter, feeder):
            if task is not None:
                task.cancel()
        # asyncio delivers a cancellation once, so this wait runs even when Django cancelled
        # us (the client left), and the reader's cleanup completes before Django goes on.
        await asyncio.gather(*(t for t in (getter, feeder) if t is not None),
                             return_exceptions=True)
