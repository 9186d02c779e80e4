"""Where a worker's CPU goes under one bench workload: a py-spy profile, summarised.

    python -m bench.profile paced --store memory --streams 200
    python -m bench.profile bulk --store redis --events 100000
    python -m bench.profile paced --route bare --streams 200     # the baseline's own profile

It starts the same server as ``python -m bench`` (one uvicorn worker, ``bench/_app.py``; a
throwaway ``redis-server`` on a free port for ``--store redis``) under ``py-spy record``,
drives one workload with the bench's load client, and prints the share of samples each
function is on the stack for (inclusive) and on top of it (self), plus a few buckets that
say where turnstream's per-event work goes. ``--raw PATH`` keeps py-spy's collapsed stacks.
py-spy comes with the ``bench`` extra (``pip install -e '.[bench]'``); it needs to be
allowed to ptrace the server (the server is its child, which most kernels allow).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench._procs import RedisServer, Server
from bench._run import APP, client, job, session

# Buckets: a stack counts for the first bucket one of whose markers it contains.
BUCKETS = (
    ("uvicorn / h11 / httptools send", ("uvicorn/protocols",)),
    ("redis-py (client, parser)", ("redis/asyncio", "redis/_parsers")),
    ("turnstream store", ("turnstream/stores",)),
    ("turnstream pump / writer / outbox", ("_pump.py", "_writer.py", "_outbox.py")),
    ("turnstream producer forwarding", ("_produce.py",)),
    ("turnstream reader / framing / response", ("_reader.py", "_framing.py", "_response.py")),
    ("asyncio event loop", ("asyncio/",)),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("workload", choices=("paced", "bulk"))
    p.add_argument("--store", choices=("memory", "redis"), default="memory")
    p.add_argument("--route", choices=("turn", "bare"), default="turn")
    p.add_argument("--format", choices=("ndjson", "sse", "ai-sdk"), default="ndjson")
    p.add_argument("--streams", type=int, default=200, help="paced: concurrent turns")
    p.add_argument("--tokens", type=int, default=100, help="paced: tokens per turn")
    p.add_argument("--delay-ms", type=int, default=20, help="paced: between two tokens")
    p.add_argument("--events", type=int, default=100_000, help="bulk: events in the turn")
    p.add_argument("--repeat", type=int, default=3, help="bulk: turns, one after another")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    return p.parse_args(argv)


def summarise(raw: str, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (", 1)[0] + " " + _where(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        bucket = next((name for name, marks in BUCKETS if any(m in stack for m in marks)), "other")
        buckets[bucket] += count
    if not total:
        return "no samples (could py-spy attach?)"
    lines = [f"{total} samples", "", "bucket (a stack counts once, for the first that matches)"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in buckets.most_common()]
    lines += ["", f"top {top} by self"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    lines += ["", f"top {top} by inclusive"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _where(frame: str) -> str:
    # "func (path/to/file.py:12)" → "file.py" (lines differ within a function; merge them)
    inside = frame.partition(" (")[2].rstrip(")")
    path = inside.rpartition(":")[0] or inside
    return f"({'/'.join(Path(path).parts[-2:])})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    redis = RedisServer().start() if args.store == "redis" else None
    env = {"BENCH_STORE": args.store, "BENCH_RETENTION_MS": "2000"}
    if redis is not None:
        env["BENCH_REDIS_URL"] = redis.url
    server = Server(f"profile-{args.store}", APP, env).start()
    raw_path = args.raw or Path(tempfile.mkstemp(prefix="turnstream-profile-", suffix=".txt")[1])
    recorder = subprocess.Popen(
        [spy, "record", "--pid", str(server.pid), "--rate", str(args.rate), "--format", "raw",
         "--output", str(raw_path), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # let py-spy attach before the load starts
        if args.workload == "paced":
            jobs = [_paced(args, server)]
        else:
            jobs = [_bulk(args, server) for _ in range(args.repeat)]
        for r in client(jobs):
            cpu = r["server_cpu_s"][0]
            print(f"# {r['name']}: ok {r['ok']}, errors {r['errors']}, wall {r['wall_s']:.2f} s, "
                  f"server CPU {cpu:.2f} s")  # fmt: skip
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            _, err = recorder.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, err = recorder.communicate()
        server.stop()
        if redis is not None:
            redis.stop()
    if recorder.returncode not in (0, -signal.SIGINT) and not raw_path.stat().st_size:
        print(err.decode(errors="replace"), file=sys.stderr)
        return 1
    print(summarise(raw_path.read_text(), args.top))
    return 0


def _path(args: argparse.Namespace, tail: str) -> str:
    if args.format != "ndjson":
        tail += f"&format={args.format}"
    if args.route == "bare":
        return f"/bare?{tail}"
    return f"/turn?session={session('prof')}-{{i}}&{tail}"  # `{i}`: one session per stream


def _paced(args: argparse.Namespace, server: Server) -> dict[str, object]:
    path = _path(args, f"n={args.tokens}&delay_ms={args.delay_ms}&stamp=0")
    timeout = 0.5 + args.tokens * args.delay_ms / 1000 * 5 + 120
    return job("paced", server, path, record="gaps", count=args.streams, ramp_s=0.5,
               timeout_s=timeout)  # fmt: skip


def _bulk(args: argparse.Namespace, server: Server) -> dict[str, object]:
    events = "line" if args.format == "ndjson" else "data"
    path = _path(args, f"n={args.events}&delay_ms=0&stamp=0")
    return job("bulk", server, path, events=events, timeout_s=300)


if __name__ == "__main__":
    raise SystemExit(main())
