"""TurnStreamResponse: the streaming response every turn route returns.

One anyio task group per stream, first to finish cancels the rest (as in sse-starlette):

* the **body pump** sends each chunk of the body (already-framed bytes) and then ends the body;
* the **watchdog** drops a client whose send has not returned for ``send_timeout``, and
  (with ``keepalive``) sends the keep-alive bytes whenever nothing was sent for
  ``keepalive_interval``;
* the **disconnect listener** waits for ``http.disconnect``.

Every ``send`` is bounded by ``send_timeout``: a client that does not read is dropped
(invariant 9), within a quarter of ``send_timeout`` more. The body's sends are watched by
the watchdog rather than each under a timer of its own: a stream sends one message per batch
of events, and a cancel scope, a lock and a checkpoint per message cost more than the rest of
its path (about 20 µs of it). Both disconnect paths end the stream: an ``OSError`` from
``send`` (ASGI spec 2.4) and the ``http.disconnect`` message. However the stream ends, the
body iterator is closed and ``on_close`` is awaited, once, shielded from cancellation and
bounded in time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

__all__ = ["TurnStreamResponse"]

logger = logging.getLogger("turnstream.response")


class _ClientGone(Exception):
    """The client left or stopped reading; never escapes ``TurnStreamResponse.__call__``."""


@dataclass(slots=True)
class _Stream:
    """What the tasks of one stream share."""

    lock: asyncio.Lock  # every send whole: a keep-alive never lands inside a chunk
    last_sent: float = 0.0
    sending_since: float | None = None  # loop time the body send in flight began
    iterator: AsyncIterator[bytes] | None = None
    gone: str | None = None  # why the client is gone; once set, nothing more is sent
    complete: bool = False  # the end of the body was sent; nothing may follow it


_END_OF_BODY: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class TurnStreamResponse(Response):
    """Stream ``body`` (an async iterable of whole frames) to one client.

    ``body`` must yield whole frames: a keep-alive is only ever sent between two chunks, so a
    chunk that ended mid-frame would let one land inside a frame. When the stream ends early
    (client gone, too slow, server shutting down) the body iterator is cancelled or closed, so
    cleanup in its ``finally`` runs under cancellation and must shield whatever it awaits.

    A client dropped for not reading gets no end of body: the response just returns and the
    server closes the connection (uvicorn logs "returned without completing response"), which
    is all a stuck transport allows.

    ``on_close`` is awaited exactly once at the end, whatever happened. An exception from the
    body propagates (the server then aborts the connection, so the client sees a broken body
    rather than a clean end) unless the client had already left; leaving is never an error.
    """

    # Bound on closing the body iterator and on `on_close` each: both run shielded, and a
    # shield without a deadline could keep a shutting-down worker alive for ever.
    close_timeout: float = 5.0

    def __init__(
        self,
        body: AsyncIterable[bytes],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str,
        keepalive: bytes | None = None,
        keepalive_interval: float = 15.0,
        send_timeout: float = 30.0,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if not keepalive_interval > 0:
            raise ValueError(f"keepalive_interval must be positive, got {keepalive_interval!r}")
        if not send_timeout > 0:
            raise ValueError(f"send_timeout must be positive, got {send_timeout!r}")
        if keepalive is not None and not keepalive:
            # An empty body message sends nothing, so it would keep no connection alive.
            raise ValueError("keepalive must not be empty; pass None to disable it")
        self.body_iterator = body
        self.status_code = status_code
        self.media_type = media_type
        # Starlette and FastAPI attach background tasks to any Response through this attribute.
        self.background: BackgroundTask | None = None
        self.keepalive = keepalive
        self.keepalive_interval = keepalive_interval
        self.send_timeout = send_timeout
        self.on_close = on_close
        self.init_headers(headers)
        self.headers.setdefault("Cache-Control", "no-store")
        # nginx buffers proxied responses by default, which would hold events back.
        self.headers.setdefault("X-Accel-Buffering", "no")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = _Stream(lock=asyncio.Lock())
        try:
            await self._transmit(
                send,
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                },
                stream,
            )
            if scope.get("method", "").upper() == "HEAD":
                # Starlette answers HEAD on every GET route. The server discards the body but
                # still waits for its end, which a live turn may not reach for minutes: answer
                # with the headers alone and never start the body.
                await self._transmit(send, _END_OF_BODY, stream)
            else:
                await self._race(receive, send, stream)
        except _ClientGone as exc:
            stream.gone = str(exc)
        finally:
            await self._close(stream)
        if stream.gone is not None:
            logger.debug("turn stream ended early: %s", stream.gone)
        if self.background is not None:
            await self.background()

    async def _race(self, receive: Receive, send: Send, stream: _Stream) -> None:
        failure: BaseException | None = None
        try:
            async with anyio.create_task_group() as task_group:

                async def run_until_first_done(task: Callable[[], Awaitable[None]]) -> None:
                    try:
                        await task()
                    except _ClientGone as exc:
                        stream.gone = str(exc)
                    task_group.cancel_scope.cancel()

                task_group.start_soon(run_until_first_done, partial(self._pump_body, send, stream))
                task_group.start_soon(run_until_first_done, partial(self._watch, send, stream))
                task_group.start_soon(
                    run_until_first_done, partial(self._listen_for_disconnect, receive)
                )
        except BaseExceptionGroup as group:
            failure = group
        if failure is None:
            return
        # Middleware and servers expect the bare exception, not anyio's one-element group.
        # Unwrapped here, outside the `except`, so the group is not chained onto it.
        while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
            failure = failure.exceptions[0]
        if (
            stream.gone is not None
            and isinstance(failure, Exception)
            and not isinstance(failure, anyio.get_cancelled_exc_class())
        ):
            # The connection is gone: raising would only make the server log a second,
            # misleading "Exception in ASGI application" for a response nobody reads.
            logger.error(
                "turn stream body failed after the client left (%s)",
                stream.gone,
                exc_info=failure,
            )
            return
        raise failure

    async def _transmit(self, send: Send, message: Message, stream: _Stream) -> None:
        """Send one message within ``send_timeout``; raise ``_ClientGone`` when that fails."""
        if stream.gone is not None:
            # Another task saw the client leave while this one was waiting for the lock.
            raise _ClientGone(stream.gone)
        with anyio.move_on_after(self.send_timeout) as deadline:
            try:
                await send(message)
            except OSError as exc:
                # ASGI 2.4: a send to a closed connection raises OSError (uvicorn's
                # ClientDisconnected) instead of returning silently.
                raise _ClientGone(f"send failed: {exc!r}") from exc
        # `cancel_called`, not `cancelled_caught`: a send that swallowed the cancellation still
        # ran out of time, and whether its bytes went out is unknown.
        if deadline.cancel_called:
            raise _ClientGone(f"client read nothing for {self.send_timeout} s")
        stream.last_sent = asyncio.get_running_loop().time()

    async def _send_chunk(self, send: Send, chunk: bytes, stream: _Stream) -> None:
        """A body chunk, watched by the watchdog instead of a timer of its own."""
        loop = asyncio.get_running_loop()
        async with stream.lock:
            if stream.gone is not None:
                raise _ClientGone(stream.gone)
            stream.sending_since = loop.time()
            try:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError as exc:
                raise _ClientGone(f"send failed: {exc!r}") from exc
            finally:
                stream.sending_since = None
            stream.last_sent = loop.time()

    async def _pump_body(self, send: Send, stream: _Stream) -> None:
        stream.iterator = iterator = aiter(self.body_iterator)
        # The body iterator only ever runs in this task, and is only cancelled when the stream
        # ends anyway. (Waiting for the next chunk under a keep-alive timeout would cancel the
        # iterator mid-`__anext__`: an async generator does not survive that, and the event it
        # was about to yield would be lost.)
        while True:
            # Give the disconnect listener its turn before pulling a chunk and again before
            # sending it. A replay yields chunks without ever blocking, and a server's `send`
            # need not block either, so without these a stream could read on (and hog the
            # loop) after its client left, or send a chunk pulled as the client left.
            await asyncio.sleep(0)
            if stream.gone is not None:
                return
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                break
            await asyncio.sleep(0)
            if stream.gone is not None:
                return
            if not chunk:
                # In chunked transfer coding a zero-length chunk is the end of the body. Servers
                # guard against it, but there is nothing to send anyway.
                continue
            await self._send_chunk(send, chunk, stream)
        async with stream.lock:
            await self._transmit(send, _END_OF_BODY, stream)
            stream.complete = True

    async def _watch(self, send: Send, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        keepalive = self.keepalive
        check = self.send_timeout / 4
        message: Message | None = None
        if keepalive is not None:
            message = {"type": "http.response.body", "body": keepalive, "more_body": True}
        while True:
            now = loop.time()
            since = stream.sending_since
            if since is not None and now - since >= self.send_timeout:
                raise _ClientGone(f"client read nothing for {self.send_timeout} s")
            wake = now + check if since is None else since + self.send_timeout
            if message is not None:
                idle = now - stream.last_sent
                if idle >= self.keepalive_interval and since is None and not stream.lock.locked():
                    async with stream.lock:
                        if stream.complete:
                            return
                        await self._transmit(send, message, stream)
                    continue
                wake = min(wake, stream.last_sent + self.keepalive_interval)
            await anyio.sleep(max(wake - now, 0.0))

    async def _listen_for_disconnect(self, receive: Receive) -> None:
        # Servers that return silently from `send` after a disconnect (ASGI < 2.4, and
        # uvicorn's h11 and httptools protocols today) only tell us here.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone("client disconnected")

    async def _close(self, stream: _Stream) -> None:
        # Shielded: this also runs when the server cancels the request (shutdown), and the
        # reader's cleanup and `on_close` must still happen then.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.close_timeout) as deadline:
                try:
                    await self._close_body(stream.iterator)
                except Exception:
                    logger.exception("closing a turn stream's body iterator failed")
            if deadline.cancel_called:
                logger.warning(
                    "closing a turn stream's body iterator took over %s s", self.close_timeout
                )
            if self.on_close is not None:
                with anyio.move_on_after(self.close_timeout) as deadline:
                    try:
                        await self.on_close()
                    except Exception:
                        logger.exception("a turn stream's on_close callback failed")
                if deadline.cancel_called:
                    logger.warning(
                        "a turn stream's on_close callback took over %s s", self.close_timeout
                    )

    async def _close_body(self, iterator: AsyncIterator[bytes] | None) -> None:
        # The iterator is what holds the generator frame; the iterable may own resources of its
        # own (a reader object whose __aiter__ returns a generator), so both are closed.
        targets: list[Any] = [self.body_iterator]
        if iterator is not None and iterator is not self.body_iterator:
            targets.insert(0, iterator)
        for target in targets:
            aclose = getattr(target, "aclose", None)
            if aclose is not None:
                await aclose()
