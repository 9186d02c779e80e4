"""A loopback TCP proxy that can cut every connection through it at once.

Chromium's DevTools "offline" emulation (``Network.emulateNetworkConditions``) only fails new
requests: a response already streaming keeps streaming through it, so it cannot break an
``EventSource`` mid-turn. A proxy between the browser and the demo can: ``cut()`` resets the
browser's side of every open connection (and closes the server's side), exactly what a dropped
network looks like to both ends. New connections are served as before, so the browser's own
reconnect goes through. It also keeps what the browser sent (``request_heads()``): the
witness of what reached the server, headers included.
"""

from __future__ import annotations

import re
import selectors
import socket
import struct
import threading
from contextlib import suppress

_CHUNK = 65536
_POLL_S = 0.1  # how soon the threads notice close()
_KEEP_SENT = 1 << 20  # bytes of browser → server traffic kept, in all


_REQUEST_LINE = re.compile(r"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH) /\S* HTTP/1\.[01]\r\n")


class _Pair:
    """One browser connection and the upstream connection it is relayed to."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream

    def cut(self) -> None:
        # Linger 0: closing sends an RST, as a dropped network does, rather than a clean FIN.
        # shutdown() first wakes the relay thread, which then closes both sockets.
        with suppress(OSError):
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for sock in (self.client, self.upstream):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class CuttingProxy:
    """``127.0.0.1:<port>`` → ``127.0.0.1:<upstream_port>``; ``cut()`` drops all connections."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._sent = bytearray()  # browser → server bytes, all connections, in arrival order
        self.connections = 0  # accepted in total
        self.cuts = 0  # connections cut in total
        self._accept_thread = threading.Thread(target=self._accept, name="proxy-accept")
        self._accept_thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> int:
        """Drop every connection open right now; returns how many."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.cut()
        self.cuts += len(pairs)
        return len(pairs)

    def request_heads(self) -> list[list[str]]:
        """The request heads the browser sent, each a list of lines (request line first).

        Found by their request lines anywhere in the traffic: a POST body has no line break
        of its own, so the next request's line may follow it directly.
        """
        with self._lock:
            text = self._sent.decode("latin-1")
        heads = []
        for match in _REQUEST_LINE.finditer(text):
            end = text.find("\r\n\r\n", match.start())
            head = text[match.start() : end if end >= 0 else len(text)]
            heads.append(head.split("\r\n"))
        return heads

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._accept_thread.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
            thread = threading.Thread(target=self._relay, args=(pair,), name="proxy-relay")
            self._threads.append(thread)
            thread.start()

    def _relay(self, pair: _Pair) -> None:
        peers = {pair.client: pair.upstream, pair.upstream: pair.client}
        try:
            with selectors.DefaultSelector() as selector:
                for sock in peers:
                    sock.setblocking(True)
                    selector.register(sock, selectors.EVENT_READ)
                while not self._closed.is_set():
                    for key, _ in selector.select(timeout=_POLL_S):
                        source: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = source.recv(_CHUNK)
                        if not data:
                            return  # either side closed (or was cut): drop the pair
                        if source is pair.client:
                            with self._lock:
                                if len(self._sent) < _KEEP_SENT:
                                    self._sent += data
                        peers[source].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._pairs.discard(pair)
            for sock in peers:
                sock.close()
