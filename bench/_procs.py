"""Processes the bench starts, and what it reads about them: stdlib only.

Every server binds 127.0.0.1 on a free port (never 6379), every wait is bounded, and every
process is stopped by its PID (terminate, then kill).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    assert port != 6379, "never the shared Redis port"
    return port


# -- what /proc says about a process ------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """CPU time (user + system) of every thread of ``pid``, in seconds.

    ``/proc/<pid>/task/*/schedstat`` counts nanoseconds; ``/proc/<pid>/stat`` only clock
    ticks (10 ms), too coarse for a 20k-event run. A thread that exited is missing from the
    former, so the larger of the two is taken (uvicorn's threads live as long as it does).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    coarse = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    fine = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as file:
                fine += int(file.read().split()[0])
    except OSError:
        return coarse
    return max(coarse, fine / 1e9)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``), in KiB."""
    with open(f"/proc/{pid}/status", "rb") as file:
        for line in file:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def src_fingerprint() -> dict[str, str]:
    """The commit and a digest of ``src/`` as it is now (others may edit it during a run)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".lua"):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %cI"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = "?"
    return {"commit": commit, "src_sha256": digest.hexdigest()[:16]}


def loadavg() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


# -- a tiny Redis client (INFO only) ------------------------------------------------------------


def redis_command(port: int, *args: str, timeout_s: float = 5.0) -> bytes:
    """Send one command to the Redis on ``port``; its bulk-string reply (INFO's text)."""
    request = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            data += chunk
        head, _, rest = data.partition(b"\r\n")
        if head[:1] != b"$":
            return head
        size = int(head[1:])
        while len(rest) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            rest += chunk
        return rest[:size]


def redis_info(port: int) -> dict[str, object]:
    """``INFO commandstats cpu memory stats``: CPU seconds, memory, and calls/usec per command."""
    text = redis_command(port, "INFO", "commandstats", "cpu", "memory", "stats").decode()
    info: dict[str, object] = {}
    commands: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        if key.startswith("cmdstat_"):
            parts = dict(part.split("=", 1) for part in value.split(","))
            commands[key[len("cmdstat_") :]] = {
                "calls": int(parts["calls"]),
                "usec": int(parts["usec"]),
            }
        elif key in ("used_cpu_sys", "used_cpu_user"):
            info[key] = float(value)
        elif key in ("used_memory", "total_commands_processed"):
            info[key] = int(value)
    info["commands"] = commands
    return info


def redis_delta(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, object]:
    """What happened on Redis between two :func:`redis_info` readings.

    The bench's own ``INFO`` calls are left out.
    """
    cpu = float(after["used_cpu_sys"]) + float(after["used_cpu_user"])  # type: ignore[arg-type]
    cpu -= float(before["used_cpu_sys"]) + float(before["used_cpu_user"])  # type: ignore[arg-type]
    b_cmds: Mapping[str, Mapping[str, int]] = before["commands"]  # type: ignore[assignment]
    a_cmds: Mapping[str, Mapping[str, int]] = after["commands"]  # type: ignore[assignment]
    commands = {}
    for name, stats in a_cmds.items():
        if name in ("info", "monitor"):
            continue
        old = b_cmds.get(name, {"calls": 0, "usec": 0})
        calls = stats["calls"] - old["calls"]
        if calls:
            commands[name] = {"calls": calls, "usec": stats["usec"] - old["usec"]}
    return {
        "cpu_s": cpu,
        "calls": sum(c["calls"] for c in commands.values()),
        "usec": sum(c["usec"] for c in commands.values()),
        "memory_delta": int(after["used_memory"]) - int(before["used_memory"]),  # type: ignore[call-overload]
        "commands": commands,
    }


# -- processes ----------------------------------------------------------------------------------


def _wait_for_http(process: subprocess.Popen[bytes], port: int, path: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(request)
                if sock.recv(16).startswith(b"HTTP/1.1 200"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


class Server:
    """One uvicorn worker (``--loop asyncio``, httptools when importable) on a free port."""

    def __init__(
        self,
        name: str,
        target: str,
        env: Mapping[str, str] | None = None,
        *,
        python: str = sys.executable,
        http: str = "httptools",
        health_path: str = "/healthz",
    ) -> None:
        self.name = name
        self.target = target
        self.env = dict(env or {})
        self.python = python
        self.http = http
        self.health_path = health_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix=f"turnstream-bench-{name}-", suffix=".log")[1])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        return [
            self.python, "-m", "uvicorn", "--factory", self.target,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--loop", "asyncio", "--http", self.http,
            "--no-access-log", "--log-level", "warning", "--backlog", "4096",
        ]  # fmt: skip

    def start(self) -> Server:
        # A port found free may be taken before uvicorn binds it: then try another.
        for _ in range(3):
            self.port = free_port()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    self.argv(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            if _wait_for_http(self.process, self.port, self.health_path):
                return self
            _stop(self.process)
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def tracebacks(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("Traceback")

    def stop(self) -> None:
        process, self.process = self.process, None
        _stop(process)

    def close(self) -> None:
        self.stop()
        if not os.environ.get("BENCH_KEEP_LOGS"):
            self.log.unlink(missing_ok=True)


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the bench needs a redis-server binary on PATH")
        self.binary = binary
        self.workdir = tempfile.mkdtemp(prefix="turnstream-bench-redis-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> RedisServer:
        for _ in range(5):
            self.port = free_port()
            argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", self.workdir, "--protected-mode", "yes"]
            self.process = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if redis_command(self.port, "PING", timeout_s=0.5) == b"+PONG":
                        return self
                except OSError:
                    time.sleep(0.05)
            _stop(self.process)
        raise RuntimeError("could not start a throwaway redis-server")

    def version(self) -> str:
        for line in redis_command(self.port, "INFO", "server").decode().splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
        return "?"

    def flush(self) -> None:
        redis_command(self.port, "FLUSHALL")

    def stop(self) -> None:
        process, self.process = self.process, None
        _stop(process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_json(argv: Sequence[str], payload: bytes, timeout_s: float) -> bytes:
    """Run ``argv`` with ``payload`` on stdin; its stdout (raises on failure or timeout)."""
    completed = subprocess.run(
        argv, input=payload, capture_output=True, timeout=timeout_s, cwd=REPO, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{argv[:3]} exited {completed.returncode}:\n{completed.stderr.decode()[-3000:]}"
        )
    return completed.stdout


# -- the peer's scratch venv --------------------------------------------------------------------

PEER_PACKAGE = "resumable-stream"


def make_peer_venv(root: Path) -> tuple[str, str, list[str]]:
    """A scratch venv under ``root`` with PyPI ``resumable-stream``: (python, version, commands).

    The venv sees the project venv's packages through a ``.pth`` file, so the peer runs on the
    very uvicorn, Starlette, redis-py and hiredis the turnstream server runs on; only
    ``resumable-stream`` itself (``--no-deps``: its one dependency, redis, is already there) is
    installed into it. Raises ``RuntimeError`` with pip's words when that fails.
    """
    import sysconfig

    venv = root / "peer-venv"
    commands = [
        f"{sys.executable} -m venv --without-pip {venv}",
        f"echo {sysconfig.get_paths()['purelib']} > {venv}/lib/python3.X/site-packages/"
        "_project.pth",
        f"{sys.executable} -m pip --python {venv}/bin/python install --no-deps "
        f"--disable-pip-version-check -q {PEER_PACKAGE}",
    ]
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(site, "_project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
         "--disable-pip-version-check", "-q", PEER_PACKAGE],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if install.returncode != 0:
        raise RuntimeError(f"pip install {PEER_PACKAGE} failed:\n{install.stderr[-2000:]}")
    version = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({PEER_PACKAGE!r}))"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    return python, version, commands
