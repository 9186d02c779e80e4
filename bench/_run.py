# The markdown this writes is for people: the multiplication, minus, dash and division signs
# in its strings are meant, not confusables.
# ruff: noqa: RUF001
"""The workloads: each one measures turnstream and its baseline in the same run.

Every figure is the median over ``runs`` runs; every ratio is the median of the per-run
ratios (a variant against the baseline measured in the same run, next to it in time), so a
machine that gets busier or quieter half-way shifts both sides alike. Within a run the
variants take turns in a rotating order.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench._app import execution_id
from bench._procs import (
    RedisServer,
    Server,
    loadavg,
    make_peer_venv,
    run_json,
    src_fingerprint,
)

APP = "bench._app:create_app"
PEER_APP = "bench._peer_app:create_app"
WORKLOADS = ("bulk", "paced", "capacity", "light", "replay", "join", "redis")


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    runs: int = 5
    bulk_sizes: tuple[int, ...] = (20_000, 100_000)
    bulk_retention_ms: int = 2_000
    paced_streams: tuple[int, ...] = (200, 1_000)
    paced_tokens: int = 100
    paced_delay_ms: int = 20
    paced_ramp_s: float = 0.5
    paced_fresh_server: bool = True  # RSS per stream is only meaningful on a fresh process
    capacity_tokens: int = 150
    capacity_delay_ms: int = 20
    capacity_ramp_s: float = 1.0
    capacity_start: int = 100
    capacity_max: int = 6_000
    capacity_runs: int = 3
    capacity_resolution: float = 0.1
    capacity_p99_ms: float = 50.0
    capacity_retry: bool = True  # a failed probe runs once more: one noisy second is no limit
    # ~4 turns at a time; 100 time-to-first-event samples a run, so p99 is not just the max.
    light_streams: int = 100
    light_tokens: int = 20
    light_delay_ms: int = 20
    light_ramp_s: float = 10.0
    replay_size: int = 100_000
    join_readers: int = 50
    join_tokens: int = 200
    join_delay_ms: int = 20
    monitor_bulk: int = 20_000
    monitor_paced_streams: int = 200
    peer: bool = True
    no_hiredis_row: bool = True
    only: tuple[str, ...] = WORKLOADS
    preset: str = "full"


QUICK = Config(
    runs=1,
    bulk_sizes=(2_000, 10_000),
    paced_streams=(50, 200),
    paced_tokens=50,
    paced_fresh_server=True,
    capacity_tokens=50,
    capacity_ramp_s=0.5,
    capacity_start=50,
    capacity_max=800,
    capacity_runs=1,
    capacity_resolution=0.25,
    light_streams=30,
    light_tokens=20,
    light_ramp_s=3.0,
    replay_size=10_000,
    join_readers=20,
    join_tokens=50,
    monitor_bulk=2_000,
    monitor_paced_streams=50,
    preset="quick",
)

# CI: the harness end to end in seconds; no figure of it means anything.
SMOKE = Config(
    runs=1,
    bulk_sizes=(300,),
    paced_streams=(5,),
    paced_tokens=5,
    paced_delay_ms=5,
    paced_ramp_s=0.05,
    paced_fresh_server=False,
    capacity_tokens=5,
    capacity_delay_ms=5,
    capacity_ramp_s=0.05,
    capacity_start=4,
    capacity_max=8,
    capacity_runs=1,
    capacity_resolution=1.0,
    capacity_retry=False,
    light_streams=3,
    light_tokens=3,
    light_delay_ms=5,
    light_ramp_s=0.05,
    replay_size=500,
    join_readers=3,
    join_tokens=40,
    join_delay_ms=10,
    monitor_bulk=200,
    monitor_paced_streams=3,
    peer=False,
    no_hiredis_row=False,
    preset="smoke",
)


# -- results ------------------------------------------------------------------------------------


@dataclass
class Check:
    """One target: the measured figure, the bound, met or not."""

    what: str
    measured: float
    target: str
    ok: bool
    fmt: str = "{:.2f}×"

    def row(self) -> list[str]:
        return [self.what, self.fmt.format(self.measured), self.target, "✓" if self.ok else "✗"]


@dataclass
class Section:
    key: str
    title: str
    about: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    count_errors: list[str] = field(default_factory=list)


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def fmt_num(value: float, digits: int = 0) -> str:
    if value != value:
        return "–"
    return f"{value:,.{digits}f}"


# -- servers and the client ---------------------------------------------------------------------


class Servers:
    """The processes of one bench run, started on demand and stopped by PID."""

    def __init__(self, redis: RedisServer | None, peer_python: str | None) -> None:
        self.redis = redis
        self.peer_python = peer_python
        self._running: dict[str, Server] = {}
        self._env: dict[str, dict[str, str]] = {}
        self.tracebacks: dict[str, int] = {}

    def _make(self, name: str, env: Mapping[str, str]) -> Server:
        base = name.split("#", 1)[0]
        redis_env = {"BENCH_REDIS_URL": self.redis.url} if self.redis else {}
        if base == "memory":
            return Server(name, APP, {"BENCH_STORE": "memory", **env})
        if base in ("redis", "redis-b"):
            return Server(name, APP, {"BENCH_STORE": "redis", **redis_env, **env})
        if base == "redis-python":
            env = {"BENCH_STORE": "redis", "BENCH_NO_HIREDIS": "1", **redis_env, **env}
            return Server(name, APP, env)
        if base == "peer":
            assert self.peer_python is not None
            return Server(name, PEER_APP, {**redis_env, **env}, python=self.peer_python)
        raise ValueError(name)

    def get(self, name: str, **env: str) -> Server:
        """The running server ``name`` whose extra environment is exactly ``env``."""
        server = self._running.get(name)
        if server is not None and self._env[name] == env:
            return server
        if server is not None:
            self.stop(name)
        server = self._make(name, env).start()
        self._running[name] = server
        self._env[name] = dict(env)
        return server

    def restart(self, name: str, **env: str) -> Server:
        self.stop(name)
        return self.get(name, **env)

    def stop(self, name: str) -> None:
        server = self._running.pop(name, None)
        if server is not None:
            server.stop()
            self.tracebacks[name] = self.tracebacks.get(name, 0) + server.tracebacks()
            if server.tracebacks():
                print(f"!! {name} logged a traceback:\n{server.log_tail()}", file=sys.stderr)
            server.close()

    def close(self) -> None:
        for name in list(self._running):
            self.stop(name)


def client(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``jobs`` in the load client's own process; their results."""
    timeout = sum(float(j.get("timeout_s", 120)) for j in jobs) + 60
    out = run_json([sys.executable, "-m", "bench._client"], json.dumps(jobs).encode(), timeout)
    results: list[dict[str, Any]] = json.loads(out)
    return results


def job(
    name: str,
    server: Server,
    path: str,
    *,
    events: str = "line",
    record: str = "total",
    count: int = 1,
    ramp_s: float = 0.0,
    redis: RedisServer | None = None,
    rss: bool = False,
    timeout_s: float = 300.0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "port": server.port,
        "record": record,
        "timeout_s": timeout_s,
        "groups": [{"path": path, "count": count, "ramp_s": ramp_s, "events": events}],
        "cpu_pids": [server.pid],
        "rss_pid": server.pid if rss else None,
        "redis_port": redis.port if redis else None,
        **extra,
    }


def session(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= max(len(items), 1)
    return [*items[k:], *items[:k]]


def group0(result: Mapping[str, Any]) -> dict[str, Any]:
    return dict(next(iter(result["groups"].values())))


@contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"== {label} (load {loadavg()})", file=sys.stderr, flush=True)
    yield
    print(f"   {label}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


# -- bulk ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    server: str  # Servers name
    route: str  # bare | turn | peer
    fmt: str  # ndjson | sse | ai-sdk
    redis: bool = False

    batch: int = 1  # bare only: events per body message

    def path(self, n: int, tag: str, *, delay_ms: int = 0, stamp: int = 0) -> str:
        fmt = "" if self.fmt == "ndjson" else f"&format={self.fmt}"
        tail = f"n={n}&delay_ms={delay_ms}&stamp={stamp}{fmt}"
        if self.batch > 1:
            tail += f"&batch={self.batch}"
        if self.route == "bare":
            return f"/bare?{tail}"
        # `{i}` stays for the client: one session per stream.
        return f"/{self.route}?session={tag}-{{i}}&{tail}"

    def expected_frames(self, n: int) -> int:
        if self.route in ("bare", "peer"):
            return n
        return n + 7 if self.fmt == "ai-sdk" else n + 2  # started … completed (+ AI SDK parts)

    @property
    def events(self) -> str:
        return "line" if self.fmt == "ndjson" else "data"


BARE_NDJSON = Variant("bare-ndjson", "bare NDJSON", "memory", "bare", "ndjson")
BARE_SSE = Variant("bare-sse", "bare SSE", "memory", "bare", "sse")
BARE_BATCHED = Variant(
    "bare-batched", "bare NDJSON, 100 events per message (client ceiling)", "memory", "bare",
    "ndjson", batch=100,
)
MEM_NDJSON = Variant("mem-ndjson", "memory NDJSON", "memory", "turn", "ndjson")
MEM_SSE = Variant("mem-sse", "memory SSE", "memory", "turn", "sse")
MEM_AI = Variant("mem-ai", "memory AI SDK", "memory", "turn", "ai-sdk")
REDIS_NDJSON = Variant("redis-ndjson", "Redis NDJSON", "redis", "turn", "ndjson", True)
REDIS_SSE = Variant("redis-sse", "Redis SSE", "redis", "turn", "sse", True)
REDIS_AI = Variant("redis-ai", "Redis AI SDK", "redis", "turn", "ai-sdk", True)
REDIS_PY = Variant(
    "redis-python-ndjson", "Redis NDJSON, no hiredis", "redis-python", "turn", "ndjson", True
)
PEER_NDJSON = Variant("peer-ndjson", "resumable-stream NDJSON", "peer", "peer", "ndjson", True)
PEER_SSE = Variant("peer-sse", "resumable-stream SSE", "peer", "peer", "sse", True)


def bulk_figures(result: Mapping[str, Any], variant: Variant, n: int) -> dict[str, Any]:
    g = group0(result)
    elapsed = g["elapsed_s"][0] if g.get("elapsed_s") else float("nan")
    deltas = g["deltas_total"] or 1
    figures: dict[str, Any] = {
        "rate": n / elapsed if elapsed == elapsed else float("nan"),
        "cpu_us": result["server_cpu_s"][0] / deltas * 1e6,
        "client_us": result["client_cpu_s"] / deltas * 1e6,
        "frames": g["frames_total"],
        "deltas": g["deltas_total"],
        "count_ok": (
            result["ok"] == 1
            and g["deltas_total"] == n
            and g["frames_total"] == variant.expected_frames(n)
        ),
        "errors": result["errors"],
    }
    if "redis" in result:
        redis = result["redis"]
        figures["redis_calls"] = redis["calls"] / deltas
        figures["redis_cpu_us"] = redis["cpu_s"] / deltas * 1e6
        figures["redis_commands"] = redis["commands"]
    return figures


def _count_error(section: Section, label: str, figures: Mapping[str, Any], n: int) -> None:
    if not figures["count_ok"]:
        section.count_errors.append(
            f"{label}: {figures['deltas']} deltas / {figures['frames']} frames for {n} events "
            f"({'; '.join(figures['errors']) or 'no error reported'})"
        )


def bulk(cfg: Config, servers: Servers, redis: RedisServer) -> Section:
    section = Section("bulk", "Bulk: one turn, no pacing")
    variants = [BARE_NDJSON, MEM_NDJSON, REDIS_NDJSON, BARE_SSE, MEM_SSE, REDIS_SSE]
    variants += [MEM_AI, REDIS_AI, BARE_BATCHED]
    if cfg.no_hiredis_row:
        variants.append(REDIS_PY)
    if servers.peer_python is not None:
        variants += [PEER_NDJSON, PEER_SSE]
    retention = {"BENCH_RETENTION_MS": str(cfg.bulk_retention_ms)}
    parsers: dict[str, str] = {}
    for name in sorted({v.server for v in variants} - {"peer"}):
        parsers[name] = client_info(servers.get(name, **retention)).get("parser", "?")
    section.raw["parsers"] = parsers
    # One small request per variant first: lazy imports and first-use allocations of each
    # route (and of the peer) are not what a bulk run measures.
    client([
        job(f"warm-up {v.key}", bulk_server(servers, v, retention), v.path(200, session("warm")),
            events=v.events, timeout_s=60)
        for v in variants
    ])  # fmt: skip
    per_size: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for n in cfg.bulk_sizes:
        figures: dict[str, list[dict[str, Any]]] = {v.key: [] for v in variants}
        for r in range(cfg.runs):
            with timed(f"bulk {n:,} events, run {r + 1}/{cfg.runs}"):
                order = rotate(variants, r)
                jobs = []
                for v in order:
                    jobs.append(job(
                        v.key, bulk_server(servers, v, retention), v.path(n, session(f"bulk{n}")),
                        events=v.events,
                        redis=redis if v.redis else None, pause_s=0.2,
                    ))  # fmt: skip
                for v, result in zip(order, client(jobs), strict=True):
                    f = bulk_figures(result, v, n)
                    figures[v.key].append(f)
                    _count_error(section, f"bulk {n} {v.label}", f, n)
        per_size[n] = figures
    section.raw["per_size"] = per_size

    def med(n: int, key: str, metric: str) -> float:
        return median([f.get(metric, float("nan")) for f in per_size[n][key]])

    def run_ratio(n: int, key: str, base: str) -> float:
        pairs = zip(per_size[n][key], per_size[n][base], strict=True)
        return median([ratio(a["rate"], b["rate"]) for a, b in pairs])

    header = [
        "variant", "events/s", "× bare NDJSON", "× same store NDJSON", "server CPU µs/event",
        "client CPU µs/event", "Redis calls/event", "Redis CPU µs/event",
    ]  # fmt: skip
    for n in cfg.bulk_sizes:
        rows = []
        for v in variants:
            same = {"memory": "mem-ndjson", "redis": "redis-ndjson",
                    "redis-python": "redis-ndjson"}.get(v.server)  # fmt: skip
            if v.route == "bare":
                same = "bare-ndjson"
            if v.route == "peer":
                same = "peer-ndjson"
            rows.append([
                v.label,
                fmt_num(med(n, v.key, "rate")),
                f"{run_ratio(n, v.key, 'bare-ndjson'):.2f}",
                f"{run_ratio(n, v.key, same):.2f}" if same and same != v.key else "–",
                fmt_num(med(n, v.key, "cpu_us"), 1),
                fmt_num(med(n, v.key, "client_us"), 1),
                fmt_num(med(n, v.key, "redis_calls"), 3) if v.redis else "–",
                fmt_num(med(n, v.key, "redis_cpu_us"), 2) if v.redis else "–",
            ])  # fmt: skip
        section.tables.append((f"{n:,} events", header, rows))
        label = size_label(n)
        pairs = [
            ("Redis NDJSON", "redis-ndjson", "bare-ndjson", 1.0, "bare NDJSON"),
            ("memory NDJSON", "mem-ndjson", "bare-ndjson", 1.5, "bare NDJSON"),
            ("memory SSE", "mem-sse", "mem-ndjson", 0.95, "memory NDJSON"),
            ("Redis SSE", "redis-sse", "redis-ndjson", 0.95, "Redis NDJSON"),
            ("memory AI SDK", "mem-ai", "mem-ndjson", 0.9, "memory NDJSON"),
            ("Redis AI SDK", "redis-ai", "redis-ndjson", 0.9, "Redis NDJSON"),
        ]
        if servers.peer_python is not None:
            pairs += [
                ("Redis NDJSON", "redis-ndjson", "peer-ndjson", 1.0, "resumable-stream NDJSON"),
                ("Redis SSE", "redis-sse", "peer-sse", 1.0, "resumable-stream SSE"),
            ]
        for what, key, base, bound, base_label in pairs:
            measured = run_ratio(n, key, base)
            section.checks.append(Check(
                f"bulk {label}: {what} events/s ÷ {base_label}", measured, f"≥ {bound}×",
                measured >= bound,
            ))  # fmt: skip
    section.about = [
        "One turn per request, the producer yields every event at once (no sleep on either "
        "side); events/s = events ÷ (request sent → last chunk received).",
        "bare = Starlette `StreamingResponse` over an async generator, one "
        "`http.response.body` per event, the same NDJSON line / SSE frame bytes turnstream "
        "sends (SSE frames hand-built, not sse-starlette). turnstream = `handle_chat_turn` + "
        "`TurnstreamMiddleware`, `Limits(max_events_per_turn=1,000,000)`; finished turns are "
        f"kept {cfg.bulk_retention_ms} ms here (the heap must not grow run after run).",
        f"Redis client parser: {', '.join(f'{k}: {v}' for k, v in parsers.items())}.",
    ]
    if servers.peer_python is not None:
        section.about.append(
            "resumable-stream: its `resumable_stream(id, make_stream)` over the same events "
            "(strings), on the same uvicorn, Starlette, redis-py and hiredis; it logs nothing "
            "per event to Redis (the creating request reads an in-process queue; Redis only "
            "carries INCR/SUBSCRIBE/SET and, for resumers, PUBLISH)."
        )
    return section


def bulk_server(servers: Servers, v: Variant, retention: Mapping[str, str]) -> Server:
    return servers.get("peer") if v.server == "peer" else servers.get(v.server, **retention)


def client_info(server: Server) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/bench/info", timeout=10) as r:
        info: dict[str, Any] = json.loads(r.read())
    return info


# -- paced --------------------------------------------------------------------------------------


PACED = (
    Variant("bare", "bare", "memory", "bare", "ndjson"),
    Variant("memory", "turnstream memory", "memory", "turn", "ndjson"),
    Variant("redis", "turnstream Redis", "redis", "turn", "ndjson", True),
)


def paced_job(
    v: Variant, server: Server, count: int, tokens: int, delay_ms: int, ramp_s: float,
    redis: RedisServer | None, *, rss: bool = True, monitor: bool = False,
) -> dict[str, Any]:  # fmt: skip
    timeout = ramp_s + tokens * delay_ms / 1000 * 5 + 120
    return job(
        f"paced {v.key} {count}", server, v.path(tokens, session(f"paced{count}"),
        delay_ms=delay_ms), record="gaps", count=count, ramp_s=ramp_s,
        redis=redis if v.redis else None, rss=rss, timeout_s=timeout, monitor=monitor,
    )  # fmt: skip


def paced_figures(result: Mapping[str, Any], count: int, tokens: int) -> dict[str, Any]:
    g = group0(result)
    deltas = g["deltas_total"] or 1
    rss = result.get("rss_kb", {})
    figures = {
        "gap_p50": g["gap_ms"].get("p50", float("nan")),
        "gap_p99": g["gap_ms"].get("p99", float("nan")),
        "gap_max": g["gap_ms"].get("max", float("nan")),
        "ttfe_p99": g["ttfe_ms"].get("p99", float("nan")),
        "cpu_us": result["server_cpu_s"][0] / deltas * 1e6,
        "client_util": result["client_cpu_s"] / result["wall_s"],
        "rss_kb_per_stream": (rss.get("peak", 0) - rss.get("before", 0)) / count,
        "rss_kb_retained": (rss.get("after", 0) - rss.get("before", 0)) / count,
        "count_ok": result["ok"] == count and g["deltas_min"] == tokens,
        "deltas": g["deltas_total"],
        "frames": g["frames_total"],
        "errors": result["errors"],
    }
    if "redis" in result:
        figures["redis_calls"] = result["redis"]["calls"] / deltas
        figures["redis_cpu_us"] = result["redis"]["cpu_s"] / deltas * 1e6
        figures["redis_kb_per_turn"] = result["redis"]["memory_delta"] / count / 1024
        figures["redis_commands"] = result["redis"]["commands"]
    return figures


def warm_up(server: Server, v: Variant) -> None:
    """One small turn, so that lazy imports and first-use allocations are not measured."""
    client([job("warm-up", server, v.path(20, session("warm")), timeout_s=60)])


def paced(cfg: Config, servers: Servers, redis: RedisServer) -> Section:
    section = Section("paced", "Paced: many concurrent turns")
    tokens, delay = cfg.paced_tokens, cfg.paced_delay_ms
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for count in cfg.paced_streams:
        results[count] = {v.key: [] for v in PACED}
        for r in range(cfg.runs):
            with timed(f"paced {count} × {tokens} @ {delay} ms, run {r + 1}/{cfg.runs}"):
                for v in rotate(PACED, r):
                    server = (
                        servers.restart(v.server) if cfg.paced_fresh_server
                        else servers.get(v.server)
                    )  # fmt: skip
                    warm_up(server, v)
                    [result] = client([
                        paced_job(v, server, count, tokens, delay, cfg.paced_ramp_s, redis)
                    ])  # fmt: skip
                    f = paced_figures(result, count, tokens)
                    results[count][v.key].append(f)
                    if not f["count_ok"]:
                        section.count_errors.append(
                            f"paced {count} {v.label}: {f['deltas']} deltas, {f['errors']}"
                        )
    section.raw["per_count"] = results

    def med(count: int, key: str, metric: str) -> float:
        return median([f.get(metric, float("nan")) for f in results[count][key]])

    def per_run(count: int, key: str, metric: str, op: Callable[[float, float], float]) -> float:
        pairs = zip(results[count][key], results[count]["bare"], strict=True)
        return median([op(a[metric], b[metric]) for a, b in pairs])

    header = [
        "variant", "gap p50 ms", "gap p99 ms", "gap max ms", "TTFE p99 ms",
        "server CPU µs/event", "× bare", "RSS KB/stream (peak / kept)", "client CPU %",
        "Redis calls/event", "Redis CPU µs/event", "Redis KB/turn",
    ]  # fmt: skip
    for count in cfg.paced_streams:
        rows = []
        for v in PACED:
            rows.append([
                v.label,
                fmt_num(med(count, v.key, "gap_p50"), 1),
                fmt_num(med(count, v.key, "gap_p99"), 1),
                fmt_num(med(count, v.key, "gap_max"), 1),
                fmt_num(med(count, v.key, "ttfe_p99"), 1),
                fmt_num(med(count, v.key, "cpu_us"), 1),
                f"{per_run(count, v.key, 'cpu_us', ratio):.2f}",
                f"{fmt_num(med(count, v.key, 'rss_kb_per_stream'), 1)} / "
                f"{fmt_num(med(count, v.key, 'rss_kb_retained'), 1)}",
                fmt_num(100 * med(count, v.key, "client_util"), 0),
                fmt_num(med(count, v.key, "redis_calls"), 3) if v.redis else "–",
                fmt_num(med(count, v.key, "redis_cpu_us"), 2) if v.redis else "–",
                fmt_num(med(count, v.key, "redis_kb_per_turn"), 1) if v.redis else "–",
            ])  # fmt: skip
        section.tables.append((f"{count} turns × {tokens} tokens @ {delay} ms", header, rows))
        for v in PACED[1:]:
            if count == cfg.paced_streams[0]:
                added = per_run(count, v.key, "gap_p99", lambda a, b: a - b)
                section.checks.append(Check(
                    f"paced {count}: {v.label} gap p99 − bare gap p99", added, "≤ +5 ms",
                    added <= 5.0, "{:+.1f} ms",
                ))  # fmt: skip
                cpu = per_run(count, v.key, "cpu_us", ratio)
                section.checks.append(Check(
                    f"paced {count}: {v.label} server CPU/event ÷ bare", cpu, "≤ 1.5×",
                    cpu <= 1.5,
                ))  # fmt: skip
            rss = med(count, v.key, "rss_kb_per_stream")
            section.checks.append(Check(
                f"paced {count}: {v.label} RSS per concurrent stream", rss, "≤ 40 KB",
                rss <= 40, "{:.1f} KB",
            ))  # fmt: skip
    section.about = [
        f"N turns at once, each {tokens} tokens, one every {delay} ms (`asyncio.sleep` before "
        f"each event but the first, on both sides), started evenly over {cfg.paced_ramp_s} s. "
        "gap = time between consecutive text deltas of one stream as the client reads them "
        "(the first delta of each stream excluded; deltas that arrive in one read count 0, "
        "so a p50 of 0 means a worker so far behind that it sends most deltas in batches).",
        "server CPU = the worker's CPU time (all threads, /proc schedstat) from the first request "
        "to the last byte, ÷ text deltas delivered. RSS/stream = (peak VmRSS during the run − "
        "VmRSS before it) ÷ N; *kept* = (VmRSS after the run − before) ÷ N"
        + (", on a fresh worker per run (after one 20-event warm-up turn)."
           if cfg.paced_fresh_server else ".")
        + " The memory store keeps every finished turn, so its figure includes the logs.",
        "Redis KB/turn = Redis `used_memory` growth ÷ N (the logs it keeps for retention).",
    ]  # fmt: skip
    return section


# -- capacity -----------------------------------------------------------------------------------


def capacity(cfg: Config, servers: Servers, redis: RedisServer) -> Section:
    section = Section("capacity", "Capacity: concurrent paced turns one worker holds")
    tokens, delay = cfg.capacity_tokens, cfg.capacity_delay_ms
    variants = (PACED[0], PACED[2])
    found: dict[str, list[int]] = {v.key: [] for v in variants}
    probes: dict[str, list[list[dict[str, Any]]]] = {v.key: [] for v in variants}
    for r in range(cfg.capacity_runs):
        for v in rotate(variants, r):
            with timed(f"capacity {v.label}, search {r + 1}/{cfg.capacity_runs}"):
                server = servers.restart(v.server)
                warm_up(server, v)
                log: list[dict[str, Any]] = []

                def holds(n: int, v: Variant = v, server: Server = server,
                          log: list[dict[str, Any]] = log) -> bool:  # fmt: skip
                    for attempt in range(2 if cfg.capacity_retry else 1):
                        [result] = client([paced_job(
                            v, server, n, tokens, delay, cfg.capacity_ramp_s,
                            redis if v.redis else None, rss=False,
                        )])  # fmt: skip
                        f = paced_figures(result, n, tokens)
                        ok = bool(f["count_ok"]) and f["gap_p99"] <= cfg.capacity_p99_ms
                        log.append({"streams": n, "holds": ok, "attempt": attempt + 1, **f})
                        print(
                            f"   {v.key} {n}: p99 gap {f['gap_p99']:.1f} ms, client "
                            f"{100 * f['client_util']:.0f} % → {'holds' if ok else 'fails'}",
                            file=sys.stderr, flush=True,
                        )  # fmt: skip
                        if ok:
                            return True
                    return False

                found[v.key].append(search(holds, cfg))
                probes[v.key].append(log)
    section.raw = {"found": found, "probes": probes}
    bare = found["bare"]
    turn = found["redis"]
    per_run = median([ratio(a, b) for a, b in zip(turn, bare, strict=True)])
    rows = []
    for v in variants:
        at_capacity = [
            next((p for p in log if p["streams"] == n and p["holds"]), None)
            for log, n in zip(probes[v.key], found[v.key], strict=True)
        ]
        util = median([100 * p["client_util"] for p in at_capacity if p])
        cpu = median([p["cpu_us"] for p in at_capacity if p])
        rows.append([
            v.label, fmt_num(median(found[v.key])), " / ".join(str(n) for n in found[v.key]),
            fmt_num(cpu, 1), fmt_num(util),
        ])  # fmt: skip
    section.tables.append((
        f"{tokens} tokens per turn at {1000 // delay} tokens/s, p99 gap ≤ "
        f"{cfg.capacity_p99_ms:g} ms",
        ["variant", "turns held (median)", "each search", "server CPU µs/event there",
         "client CPU % there"],
        rows,
    ))  # fmt: skip
    section.checks.append(Check(
        "capacity: turnstream Redis ÷ bare", per_run, "≥ 0.8×", per_run >= 0.8
    ))  # fmt: skip
    section.about = [
        f"The largest N for which N concurrent turns ({tokens} tokens, one every {delay} ms, "
        f"started over {cfg.capacity_ramp_s} s) all complete with p99 gap ≤ "
        f"{cfg.capacity_p99_ms:g} ms: doubling from {cfg.capacity_start} until a probe fails, "
        f"then bisection to {cfg.capacity_resolution:.0%} (cap {cfg.capacity_max}); "
        + ("a failed probe is run once more before it counts (others share this machine); "
           if cfg.capacity_retry else "")
        + f"{cfg.capacity_runs} searches per variant, a fresh worker for each.",
        "Client, server and Redis share the machine's cores; the client's CPU share at the "
        "capacity point says how close the client itself was to being the limit.",
    ]
    return section


def search(holds: Callable[[int], bool], cfg: Config) -> int:
    """The largest n ≤ cap that holds (0 if even the first probe fails)."""
    good, bad = 0, 0
    n = cfg.capacity_start
    while n <= cfg.capacity_max:
        if holds(n):
            good = n
            n *= 2
        else:
            bad = n
            break
    if not bad:
        if good < cfg.capacity_max and holds(cfg.capacity_max):
            return cfg.capacity_max
        return good
    while bad - good > max(cfg.capacity_resolution * max(good, 1), 1):
        mid = (good + bad) // 2
        mid = max(round(mid, -1), good + 1) if mid > 50 else mid
        if mid >= bad:
            break
        if holds(mid):
            good = mid
        else:
            bad = mid
    return good


# -- light load ---------------------------------------------------------------------------------


def light(cfg: Config, servers: Servers, redis: RedisServer) -> Section:
    section = Section("light", "Light load: added latency")
    n, delay = cfg.light_tokens, cfg.light_delay_ms
    figures: dict[str, list[dict[str, float]]] = {v.key: [] for v in PACED}
    for v in PACED:
        warm_up(servers.get(v.server), v)
    for r in range(cfg.runs):
        with timed(f"light load, run {r + 1}/{cfg.runs}"):
            order = rotate(PACED, r)
            jobs = [
                job(
                    f"light {v.key}", servers.get(v.server),
                    v.path(n, session("light"), delay_ms=delay, stamp=1), record="stamps",
                    count=cfg.light_streams, ramp_s=cfg.light_ramp_s, timeout_s=120,
                    pause_s=0.2,
                )
                for v in order
            ]  # fmt: skip
            for v, result in zip(order, client(jobs), strict=True):
                g = group0(result)
                figures[v.key].append({
                    "ttfe_p50": g["ttfe_ms"].get("p50", float("nan")),
                    "ttfe_p99": g["ttfe_ms"].get("p99", float("nan")),
                    "lat_p50": g["latency_ms"].get("p50", float("nan")),
                    "lat_p99": g["latency_ms"].get("p99", float("nan")),
                })  # fmt: skip
                if result["ok"] != cfg.light_streams or g["deltas_min"] != n:
                    section.count_errors.append(f"light {v.label}: {result['errors']}")
    section.raw = figures
    header = ["variant", "TTFE p50 ms", "TTFE p99 ms", "latency p50 ms", "latency p99 ms",
              "added TTFE p50 / p99", "added latency p50 / p99"]  # fmt: skip
    rows = []
    for v in PACED:
        def med(metric: str, key: str = v.key) -> float:
            return median([f[metric] for f in figures[key]])

        def added(metric: str, key: str = v.key) -> float:
            pairs = zip(figures[key], figures["bare"], strict=True)
            return median([a[metric] - b[metric] for a, b in pairs])

        rows.append([
            v.label, fmt_num(med("ttfe_p50"), 2), fmt_num(med("ttfe_p99"), 2),
            fmt_num(med("lat_p50"), 2), fmt_num(med("lat_p99"), 2),
            "–" if v.key == "bare" else f"{added('ttfe_p50'):+.2f} / {added('ttfe_p99'):+.2f}",
            "–" if v.key == "bare" else f"{added('lat_p50'):+.2f} / {added('lat_p99'):+.2f}",
        ])  # fmt: skip
        if v.key != "bare":
            for what, metric, bound in (
                ("TTFE p50", "ttfe_p50", 1.0), ("TTFE p99", "ttfe_p99", 2.0),
                ("per-event latency p50", "lat_p50", 1.0),
                ("per-event latency p99", "lat_p99", 2.0),
            ):  # fmt: skip
                value = added(metric)
                section.checks.append(Check(
                    f"light load: {v.label} added {what}", value, f"≤ {bound:g} ms",
                    value <= bound, "{:+.2f} ms",
                ))  # fmt: skip
    section.tables.append((
        f"{cfg.light_streams} turns started over {cfg.light_ramp_s} s, {n} tokens @ {delay} ms",
        header, rows,
    ))  # fmt: skip
    section.about = [
        "TTFE = request sent (before connect) → first text delta read. Per-event latency = "
        "the producer's `time.monotonic_ns()` (carried in the event as `t`; the same clock in "
        "every process of one host) → the client's read. The first token is yielded at once, "
        "so TTFE includes turnstream's begin (on Redis: its round trips). Added = variant − "
        "bare, per run, median over runs.",
    ]
    return section


# -- replay and join ----------------------------------------------------------------------------


def replay(cfg: Config, servers: Servers, redis: RedisServer) -> Section:
    section = Section("replay", "Replay of a finished turn")
    n = cfg.replay_size
    rows_raw: dict[str, list[dict[str, float]]] = {"redis": [], "memory": []}
    servers.get("redis-b")
    for r in range(cfg.runs):
        with timed(f"replay {n:,} events, run {r + 1}/{cfg.runs}"):
            mem = servers.restart("memory")  # a finished 100k turn stays: one per process
            a, b = servers.get("redis"), servers.get("redis-b")
            jobs = []
            sessions = {}
            for key, live, again in (("memory", mem, mem), ("redis", a, b)):
                tag = session(f"replay-{key}")
                sessions[key] = tag
                eid = quote(execution_id(f"{tag}-0"), safe="")
                jobs.append(job(f"live {key}", live, MEM_NDJSON.path(n, tag), pause_s=0.3,
                                redis=redis if key == "redis" else None))  # fmt: skip
                jobs.append(job(f"replay {key}", again, f"/turns/{eid}/stream",
                                redis=redis if key == "redis" else None))  # fmt: skip
            results = client(jobs)
            for i, key in enumerate(("memory", "redis")):
                live_r, again_r = results[2 * i], results[2 * i + 1]
                live_f = bulk_figures(live_r, MEM_NDJSON, n)
                again_f = bulk_figures(again_r, MEM_NDJSON, n)
                rows_raw[key].append({
                    "live": live_f["rate"], "replay": again_f["rate"],
                    "replay_cpu_us": again_f["cpu_us"],
                    "replay_redis_calls": again_f.get("redis_calls", float("nan")),
                    "mode": next(iter(again_r["modes"])),
                })  # fmt: skip
                for label, f in (("live", live_f), ("replay", again_f)):
                    _count_error(section, f"{label} {key}", f, n)
    section.raw = rows_raw
    rows = []
    for key, label in (("redis", "Redis, another worker"), ("memory", "memory, same worker")):
        runs = rows_raw[key]
        per_run = median([ratio(x["replay"], x["live"]) for x in runs])
        rows.append([
            label, fmt_num(median([x["live"] for x in runs])),
            fmt_num(median([x["replay"] for x in runs])), f"{per_run:.2f}",
            fmt_num(median([x["replay_cpu_us"] for x in runs]), 1),
            fmt_num(median([x["replay_redis_calls"] for x in runs]), 4),
            ", ".join(sorted({x["mode"] for x in runs})),
        ])  # fmt: skip
        section.checks.append(Check(
            f"replay {size_label(n)}: {label} ÷ live bulk", per_run, "≥ 2×", per_run >= 2.0
        ))  # fmt: skip
    section.tables.append((
        f"{n:,} events, NDJSON",
        ["store", "live events/s", "replay events/s", "replay ÷ live", "replay CPU µs/event",
         "replay Redis calls/event", "X-Turn-Mode"],
        rows,
    ))  # fmt: skip
    section.about = [
        f"A {n:,}-event turn is produced live (bulk, NDJSON), then read again whole through "
        "`GET /turns/{id}/stream`: on Redis by a *second* worker (same Redis, its own "
        "process: every event comes from the store), on memory by the same worker.",
    ]
    return section


def join(cfg: Config, servers: Servers, redis: RedisServer) -> Section:
    section = Section("join", "Readers joined to one live turn")
    tokens, delay, readers = cfg.join_tokens, cfg.join_delay_ms, cfg.join_readers
    at_s = min(0.5, tokens * delay / 1000 / 4)
    variants = (("memory", "memory", "memory"), ("redis", "redis", "redis"),
                ("redis-b", "redis", "redis-b"))  # fmt: skip
    labels = {"memory": "memory, same worker", "redis": "Redis, same worker",
              "redis-b": "Redis, readers on another worker"}  # fmt: skip
    figures: dict[str, list[dict[str, Any]]] = {k: [] for k, _, _ in variants}
    for r in range(cfg.runs):
        with timed(f"join {readers} readers, run {r + 1}/{cfg.runs}"):
            jobs = []
            for key, owner_name, reader_name in rotate(variants, r):
                owner, reader = servers.get(owner_name), servers.get(reader_name)
                tag = session(f"join-{key}")
                eid = quote(execution_id(f"{tag}-0"), safe="")
                path = MEM_NDJSON.path(tokens, tag, delay_ms=delay, stamp=1)
                jobs.append({
                    "name": f"join {key}", "port": owner.port, "record": "stamps",
                    "live_only": True, "timeout_s": tokens * delay / 1000 * 5 + 60,
                    "pause_s": 0.2,
                    "groups": [
                        {"label": "origin", "path": path, "count": 1},
                        {"label": "readers", "path": f"/turns/{eid}/stream", "count": readers,
                         "at_s": at_s, "ramp_s": 0.05, "port": reader.port,
                         "retry_204": 100},
                    ],
                    "cpu_pids": sorted({owner.pid, reader.pid}),
                    "redis_port": redis.port if owner_name != "memory" else None,
                })  # fmt: skip
            for spec, result in zip(rotate(variants, r), client(jobs), strict=True):
                key = spec[0]
                origin, joined = result["groups"]["origin"], result["groups"]["readers"]
                delivered = origin["deltas_total"] + joined["deltas_total"]
                figures[key].append({
                    "origin_p50": origin["latency_ms"].get("p50", float("nan")),
                    "origin_p99": origin["latency_ms"].get("p99", float("nan")),
                    "readers_p50": joined["latency_ms"].get("p50", float("nan")),
                    "readers_p99": joined["latency_ms"].get("p99", float("nan")),
                    "cpu_us": sum(result["server_cpu_s"]) / max(delivered, 1) * 1e6,
                    "redis_calls": result.get("redis", {}).get("calls", 0) / max(tokens, 1),
                    "modes": result["modes"],
                })  # fmt: skip
                if result["ok"] != readers + 1 or joined["deltas_min"] != tokens:
                    section.count_errors.append(
                        f"join {key}: {result['ok']}/{readers + 1} complete, readers got "
                        f"{joined['deltas_min']}..{joined['deltas_max']} of {tokens} deltas; "
                        f"{result['errors']}"
                    )
    section.raw = figures
    rows = []
    for key, _, _ in variants:
        runs = figures[key]
        rows.append([
            labels[key],
            f"{median([x['origin_p50'] for x in runs]):.2f} / "
            f"{median([x['origin_p99'] for x in runs]):.2f}",
            f"{median([x['readers_p50'] for x in runs]):.2f} / "
            f"{median([x['readers_p99'] for x in runs]):.2f}",
            fmt_num(median([x["cpu_us"] for x in runs]), 1),
            fmt_num(median([x["redis_calls"] for x in runs]), 2) if key != "memory" else "–",
            ", ".join(f"{m}: {c}" for m, c in sorted(runs[-1]["modes"].items())),
        ])  # fmt: skip
    section.tables.append((
        f"1 turn of {tokens} tokens @ {delay} ms, {readers} readers join at {at_s:g} s",
        ["readers", "origin latency p50 / p99 ms", "joined latency p50 / p99 ms",
         "server CPU µs per delivered event", "Redis calls per produced event",
         "X-Turn-Mode (last run)"],
        rows,
    ))  # fmt: skip
    section.about = [
        "The origin request starts the turn; the readers `GET /turns/{id}/stream` once it "
        "runs (each replays what is logged, then follows; one that comes before the turn "
        "exists gets 204 and asks again 20 ms later). Latency as in light load, for "
        "events produced after the reader asked; CPU over every worker involved.",
    ]
    return section


# -- Redis accounting ---------------------------------------------------------------------------


def redis_section(
    cfg: Config, servers: Servers, redis: RedisServer, done: Mapping[str, Section]
) -> Section:
    section = Section("redis", "Redis: commands and CPU per event")
    rows = []
    bulk_s = done.get("bulk")
    if bulk_s is not None:
        for n, variants in bulk_s.raw["per_size"].items():
            for key in ("redis-ndjson", "redis-sse", "redis-ai"):
                runs = variants[key]
                rows.append([
                    f"bulk {n:,}, {key.split('-', 1)[1]}",
                    fmt_num(median([f["redis_calls"] for f in runs]), 3),
                    fmt_num(median([f["redis_cpu_us"] for f in runs]), 2),
                    top_commands(runs[-1]["redis_commands"]),
                ])  # fmt: skip
    paced_s = done.get("paced")
    if paced_s is not None:
        for count, variants in paced_s.raw["per_count"].items():
            runs = variants["redis"]
            rows.append([
                f"paced {count} × {cfg.paced_tokens}",
                fmt_num(median([f["redis_calls"] for f in runs]), 3),
                fmt_num(median([f["redis_cpu_us"] for f in runs]), 2),
                top_commands(runs[-1].get("redis_commands", {})),
            ])  # fmt: skip
    # Untimed passes under MONITOR, which tells the commands clients send from those Lua runs.
    with timed("redis MONITOR passes"):
        server = servers.get("redis")
        n = cfg.monitor_bulk
        count = cfg.monitor_paced_streams
        jobs = [
            job("monitor bulk", server, REDIS_NDJSON.path(n, session("mon")), redis=redis,
                monitor=True, pause_s=0.2),
            paced_job(PACED[2], server, count, cfg.paced_tokens, cfg.paced_delay_ms,
                      cfg.paced_ramp_s, redis, rss=False, monitor=True),
        ]  # fmt: skip
        monitored = client(jobs)
    sent_rows = []
    for label, result, events in (
        (f"bulk {n:,}, NDJSON", monitored[0], n),
        (f"paced {count} × {cfg.paced_tokens}", monitored[1], count * cfg.paced_tokens),
    ):
        sources = result["monitor"]["by_source"]
        sent = sources.get("client", 0) / events
        inner = sources.get("lua", 0) / events
        sent_rows.append([
            label, f"{sent:.3f}", f"{inner:.3f}",
            ", ".join(f"{k} {v}" for k, v in result["monitor"]["by_command"].items()),
        ])  # fmt: skip
        section.checks.append(Check(
            f"Redis {label}: commands sent per event", sent, "≤ 1", sent <= 1.0, "{:.3f}"
        ))  # fmt: skip
    section.raw = {"monitor": monitored}
    if rows:
        section.tables.append((
            "timed runs (INFO commandstats / INFO cpu; calls include commands run inside Lua)",
            ["workload", "Redis calls/event", "Redis CPU µs/event", "top commands (calls)"],
            rows,
        ))  # fmt: skip
    section.tables.append((
        "untimed pass under MONITOR (who sent what)",
        ["workload", "sent by clients/event", "run inside Lua/event", "commands (calls)"],
        sent_rows,
    ))  # fmt: skip
    section.about = [
        "`INFO commandstats` counts a command a Lua script runs like one a client sends, so "
        "the timed runs' *calls/event* is every command Redis executed (it includes the "
        "per-event writes inside the append script). Which of them were round trips is told "
        "by one extra, untimed pass under `MONITOR` (which slows Redis, hence untimed): "
        "*sent by clients* is what the ≤ 1 target is checked against. The bench's own `INFO` "
        "and `MONITOR` are left out; heartbeats and sweeps are in.",
    ]
    return section


def top_commands(commands: Mapping[str, Mapping[str, int]], k: int = 5) -> str:
    ranked = sorted(commands.items(), key=lambda kv: -kv[1]["calls"])[:k]
    return ", ".join(f"{name} {stats['calls']}" for name, stats in ranked)


# -- the whole run ------------------------------------------------------------------------------


def run(cfg: Config, scratch: Path) -> tuple[list[Section], dict[str, Any]]:
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    facts: dict[str, Any] = {
        "load_before": loadavg(),
        "started": started,
        "src_start": src_fingerprint(),
    }
    redis = RedisServer().start()
    facts["redis_version"] = redis.version()
    facts["redis_argv"] = "redis-server --port <free> --bind 127.0.0.1 --save '' --appendonly no"
    peer_python = None
    if cfg.peer and "bulk" in cfg.only:
        try:
            peer_python, version, commands = make_peer_venv(scratch)
            facts["peer"] = {"version": version, "commands": commands}
        except Exception as exc:  # recorded in RESULTS.md: the run goes on without the peer
            facts["peer"] = {"error": f"{type(exc).__name__}: {exc}"}
    servers = Servers(redis, peer_python)
    sections: list[Section] = []
    done: dict[str, Section] = {}
    steps: list[tuple[str, Callable[..., Section]]] = [
        ("bulk", bulk), ("paced", paced), ("capacity", capacity), ("light", light),
        ("replay", replay), ("join", join),
    ]  # fmt: skip
    try:
        for key, step in steps:
            if key in cfg.only:
                section = step(cfg, servers, redis)
                sections.append(section)
                done[key] = section
                redis.flush()
        if "redis" in cfg.only:
            sections.append(redis_section(cfg, servers, redis, done))
    finally:
        servers.close()
        redis.stop()
    facts["load_after"] = loadavg()
    facts["src_end"] = src_fingerprint()
    facts["finished"] = time.strftime("%Y-%m-%d %H:%M %Z")
    facts["server_tracebacks"] = servers.tracebacks
    return sections, facts


def smaller(cfg: Config, **changes: Any) -> Config:
    return replace(cfg, **changes)
