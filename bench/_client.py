"""The load client: raw sockets, one event loop, its own process.

``python -m bench._client`` reads a JSON list of jobs on stdin and writes one JSON result per
job (a JSON list) on stdout. The harness runs it in a process of its own so that the client
and the server under test never share an event loop; it uses uvloop when importable (it is
not under test — the cheaper the client, the less it gets in the way) and reports its own
CPU time, so a reader can tell when the client, not the server, was the limit.

Each stream is an ``asyncio.Protocol`` that writes one HTTP/1.1 ``GET`` and decodes the
chunked response itself. The decoded body is processed up to its last ``\\n`` (every field
counted here lives on one line, so nothing is split): events are counted by line (NDJSON)
or by ``data:`` line (SSE and the AI SDK stream), text deltas by their ``"type":"text-delta"``,
and with ``stamp`` the producer's ``"t"`` (``time.monotonic_ns()`` in the server — the same
clock on one host) gives each event's latency. Arrival times are taken once per read: every
event of one read arrived at that moment.

A job::

    {"name": …, "port": …, "timeout_s": …, "record": "total" | "gaps" | "stamps",
     "groups": [{"path": "/turn?session=x-{i}&…", "count": N, "at_s": 0, "ramp_s": 0,
                 "events": "line" | "data", "label": …, "port": … (default: the job's),
                 "retry_204": 0}, …],
     "live_only": false,  # latency only for events produced after the stream's request
     "cpu_pids": [server pids], "rss_pid": pid | null, "redis_port": port | null,
     "monitor": false, "settle_s": 0.1}

Stream ``i`` of a group starts at ``at_s + ramp_s * i / count``.
"""

from __future__ import annotations

import array
import asyncio
import json
import re
import sys
import time
from collections import Counter
from typing import Any

from bench._procs import cpu_s, redis_delta, redis_info, rss_kb

DELTA = b'"type":"text-delta"'
STAMP = re.compile(rb'"t":(\d+)')
CRLF = b"\r\n"
MAX_ERRORS = 5


def percentiles(values: Any, points: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles (and count, max) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    figures: dict[str, float] = {"count": len(ordered), "max": ordered[-1]}
    for p in points:
        rank = max(int(-(-p * len(ordered) // 100)) - 1, 0)
        figures[f"p{p:g}"] = ordered[rank]
    return figures


class Stream(asyncio.Protocol):
    """One HTTP response, decoded and counted as it arrives."""

    def __init__(self, request: bytes, data_lines: bool, record: str, done: asyncio.Event):
        self.reset(request, data_lines, record, done)

    def reset(self, request: bytes, data_lines: bool, record: str, done: asyncio.Event) -> None:
        self.request = request
        self.data_lines = data_lines
        self.record = record
        self.done_event = done
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunked = True
        self.length_left = -1
        self.pending = b""  # undecoded bytes of a chunk-size line
        self.remaining = 0  # bytes left in the current chunk
        self.skip = 0  # bytes of CRLF left after a chunk
        self.tail = b""  # decoded bytes after the last newline
        self.frames = 0
        self.deltas = 0
        self.t_start = 0
        self.t_first_byte = 0
        self.t_first_delta = 0
        self.t_end = 0
        self.finished = False
        self.error: str | None = None
        self.read_times = array.array("q")
        self.read_deltas = array.array("l")
        self.stamps: list[tuple[int, list[bytes]]] = []

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.t_first_byte:
            self.t_first_byte = now
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self.head[:end])
            data = self.head[end + 4 :]
            self.head = b""
            if self.finished:
                self._close()
                return
        body = self._dechunk(data) if self.chunked else self._plain(data)
        if body:
            self._consume(body, now)
        if self.finished:
            self.t_end = now
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished and self.error is None:
            self.error = f"connection lost ({exc or 'closed by the server'}) after {self.deltas}"
        self.done_event.set()

    # -- decoding -----------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if not self.chunked:
            self.length_left = int(self.headers.get("content-length", "0"))
            if self.length_left == 0:
                self.finished = True
        if self.status != 200:
            self.error = f"HTTP {self.status}"

    def _plain(self, data: bytes) -> bytes:
        self.length_left -= len(data)
        if self.length_left <= 0:
            self.finished = True
        return data

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.pending + data if self.pending else data
        out = []
        pos, size = 0, len(buf)
        while pos < size:
            if self.remaining:
                end = pos + self.remaining
                if end <= size:
                    out.append(buf[pos:end])
                    pos, self.remaining, self.skip = end, 0, 2
                else:
                    out.append(buf[pos:])
                    self.remaining, pos = end - size, size
            elif self.skip:
                take = min(self.skip, size - pos)
                pos += take
                self.skip -= take
            else:
                eol = buf.find(CRLF, pos)
                if eol < 0:
                    break
                length = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if length == 0:  # the last chunk (trailers, if any, are not read)
                    self.finished = True
                    pos = size
                    break
                self.remaining = length
        self.pending = buf[pos:] if pos < size else b""
        return b"".join(out)

    def _consume(self, body: bytes, now: int) -> None:
        if self.tail:
            body = self.tail + body
        cut = body.rfind(b"\n") + 1
        if cut == 0:
            self.tail = body
            return
        lines, self.tail = (body, b"") if cut == len(body) else (body[:cut], body[cut:])
        self.frames += lines.count(b"data:") if self.data_lines else lines.count(b"\n")
        deltas = lines.count(DELTA)
        if not deltas:
            return
        if not self.deltas:
            self.t_first_delta = now
        self.deltas += deltas
        if self.record != "total":
            self.read_times.append(now)
            self.read_deltas.append(deltas)
            if self.record == "stamps":
                self.stamps.append((now, STAMP.findall(lines)))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- figures ------------------------------------------------------------------------------

    def gaps_ms(self) -> list[float]:
        """Time between consecutive text deltas (0 within one read); the first one excluded."""
        gaps: list[float] = []
        previous = 0
        for t, k in zip(self.read_times, self.read_deltas, strict=True):
            if previous:
                gaps.append((t - previous) / 1e6)
            gaps.extend([0.0] * (k - 1))
            previous = t
        return gaps

    def latencies_ms(self, live_only: bool) -> list[float]:
        """Producer yield → client read, per event; ``live_only``: produced after we asked."""
        values = []
        for t, stamps in self.stamps:
            for raw in stamps:
                stamp = int(raw)
                if live_only and stamp < self.t_start:
                    continue
                values.append((t - stamp) / 1e6)
        return values


async def run_stream(
    loop: asyncio.AbstractEventLoop, port: int, stream: Stream, delay_s: float, retry_204: int
) -> None:
    """One request; with ``retry_204``, asked again (20 ms apart) while the answer is 204
    (a reader that came before the turn it joins exists)."""
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    for attempt in range(retry_204 + 1):
        stream.t_start = time.monotonic_ns()
        try:
            await loop.create_connection(lambda: stream, "127.0.0.1", port)
        except OSError as exc:
            stream.error = f"connect: {exc}"
            return
        await stream.done_event.wait()
        if stream.status != 204 or attempt == retry_204:
            return
        stream.reset(stream.request, stream.data_lines, stream.record, asyncio.Event())
        await asyncio.sleep(0.02)


class Monitor(asyncio.Protocol):
    """Counts the commands Redis runs, split by who sent them (``MONITOR``)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.by_source: Counter[str] = Counter()
        self.by_command: Counter[str] = Counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"*1\r\n$7\r\nMONITOR\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\r\n")
        self.buffer = lines.pop()
        for line in lines:
            # `+1700000000.123456 [0 127.0.0.1:5555] "evalsha" …` or `… [0 lua] "xadd" …`
            if not line.startswith(b"+") or b"[" not in line:
                continue
            source = b"lua" if b" lua]" in line[:80] else b"client"
            command = line.split(b'"', 2)[1].lower().decode() if b'"' in line else "?"
            if command in ("info", "monitor"):
                continue
            self.by_source[source.decode()] += 1
            self.by_command[f"{source.decode()}:{command}"] += 1


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    port = int(job["port"])
    record = job.get("record", "total")
    streams: list[tuple[Stream, float, str]] = []
    ports: list[int] = []
    retries: list[int] = []
    for g, group in enumerate(job["groups"]):
        count = int(group.get("count", 1))
        group_port = int(group.get("port", port))
        for i in range(count):
            ports.append(group_port)
            retries.append(int(group.get("retry_204", 0)))
            path = group["path"].format(i=i)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{group_port}\r\nAccept: */*\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            stream = Stream(request, group.get("events") == "data", record, asyncio.Event())
            at = float(group.get("at_s", 0)) + float(group.get("ramp_s", 0)) * i / count
            streams.append((stream, at, group.get("label", str(g))))

    monitor: Monitor | None = None
    monitor_transport: asyncio.BaseTransport | None = None
    redis_port = job.get("redis_port")
    if job.get("monitor") and redis_port:
        monitor = Monitor()
        monitor_transport, _ = await loop.create_connection(
            lambda: monitor, "127.0.0.1", int(redis_port)
        )
        await asyncio.sleep(0.05)
    rss_pid = job.get("rss_pid")
    rss_before = rss_kb(rss_pid) if rss_pid else 0
    rss_peak = rss_before
    redis_before = redis_info(int(redis_port)) if redis_port else None
    pids = [int(p) for p in job.get("cpu_pids", [])]
    cpu_before = [cpu_s(p) for p in pids]
    client_before = time.process_time()
    t0 = time.monotonic_ns()

    tasks = [
        asyncio.ensure_future(run_stream(loop, stream_port, stream, at, retry))
        for (stream, at, _), stream_port, retry in zip(streams, ports, retries, strict=True)
    ]
    everything = asyncio.gather(*tasks)
    timeout_s = float(job.get("timeout_s", 120))
    deadline = loop.time() + timeout_s
    timed_out = False
    while not everything.done():
        if loop.time() > deadline:
            timed_out = True
            break
        if rss_pid:
            rss_peak = max(rss_peak, rss_kb(rss_pid))
        await asyncio.wait([everything], timeout=0.05 if rss_pid else 0.5)
    if timed_out:
        for task in tasks:
            task.cancel()
        for stream, _, _ in streams:
            if not stream.finished:
                stream.error = stream.error or f"timed out after {timeout_s} s"
                stream._close()
        await asyncio.gather(*tasks, return_exceptions=True)
        everything.cancel()
        await asyncio.gather(everything, return_exceptions=True)
    t1 = time.monotonic_ns()
    client_cpu = time.process_time() - client_before
    await asyncio.sleep(float(job.get("settle_s", 0.1)))  # what the server does after the end
    cpu_after = [cpu_s(p) for p in pids]
    redis_after = redis_info(int(redis_port)) if redis_port else None
    rss_after = rss_kb(rss_pid) if rss_pid else 0
    if monitor_transport is not None:
        await asyncio.sleep(0.05)
        monitor_transport.close()

    result: dict[str, Any] = {
        "name": job.get("name"),
        "streams": len(streams),
        "ok": sum(1 for s, _, _ in streams if s.finished and s.error is None),
        "errors": [s.error for s, _, _ in streams if s.error][:MAX_ERRORS],
        "error_count": sum(1 for s, _, _ in streams if s.error),
        "wall_s": (t1 - t0) / 1e9,
        "client_cpu_s": client_cpu,
        "server_cpu_s": [a - b for a, b in zip(cpu_after, cpu_before, strict=True)],
        "loop": type(loop).__module__,
        "modes": dict(Counter(s.headers.get("x-turn-mode", "-") for s, _, _ in streams)),
        "groups": {},
    }
    if rss_pid:
        result["rss_kb"] = {"before": rss_before, "peak": rss_peak, "after": rss_after}
    if redis_before is not None and redis_after is not None:
        result["redis"] = redis_delta(redis_before, redis_after)
    if monitor is not None:
        result["monitor"] = {
            "by_source": dict(monitor.by_source),
            "by_command": dict(monitor.by_command.most_common(12)),
        }
    for label in dict.fromkeys(label for _, _, label in streams):
        mine = [s for s, _, lab in streams if lab == label]
        group: dict[str, Any] = {
            "streams": len(mine),
            "frames": [s.frames for s in mine] if len(mine) <= 4 else None,
            "frames_total": sum(s.frames for s in mine),
            "deltas_total": sum(s.deltas for s in mine),
            "deltas_min": min(s.deltas for s in mine),
            "deltas_max": max(s.deltas for s in mine),
        }
        ended = [s for s in mine if s.finished and s.t_end]
        if ended:
            first = min(s.t_start for s in ended)
            last = max(s.t_end for s in ended)
            group["span_s"] = (last - first) / 1e9
            group["elapsed_s"] = [(s.t_end - s.t_start) / 1e9 for s in ended][:4]
        ttfe = [(s.t_first_delta - s.t_start) / 1e6 for s in mine if s.t_first_delta]
        group["ttfe_ms"] = percentiles(ttfe)
        if record in ("gaps", "stamps"):
            gaps: list[float] = []
            for s in mine:
                gaps.extend(s.gaps_ms())
            group["gap_ms"] = percentiles(gaps)
        if record == "stamps":
            latencies: list[float] = []
            live_only = bool(job.get("live_only"))
            for s in mine:
                latencies.extend(s.latencies_ms(live_only))
            group["latency_ms"] = percentiles(latencies)
        result["groups"][label] = group
    return result


async def main() -> None:
    jobs = json.loads(sys.stdin.buffer.read())
    results = []
    for job in jobs:
        results.append(await run_job(job))
        pause = float(job.get("pause_s", 0))
        if pause:
            await asyncio.sleep(pause)
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
