"""The ``turnstream`` command (also ``python -m turnstream``).

    turnstream demo [--redis URL [--workers N]] [--substrate URL] …   the demo chat app
    turnstream substrate [--port P] …                   the reference substrate

Both serve under uvicorn on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from ._supervisor import DEFAULT_LEASE_MS

__all__ = ["main"]


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _redis_url(text: str) -> str:
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(
            f"not a Redis URL (redis://host:port/db, rediss://…, unix://…): {text!r}"
        )
    return text


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnstream",
        description="Durable, replayable, re-attachable chat turns for ASGI apps.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="serve the demo chat page with a built-in fake model",
        description="Serve the demo: a chat page on / over a deterministic fake model.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    demo.add_argument(
        "--port", type=_int_at_least(0, 65535), default=8000, help="TCP port (default %(default)s)"
    )
    demo.add_argument(
        "--redis",
        type=_redis_url,
        metavar="URL",
        help="share turns through this Redis (redis://host:port/db) instead of memory",
    )
    demo.add_argument(
        "--workers",
        type=_int_at_least(1, 16),
        default=1,
        metavar="N",
        help=(
            "worker processes (default %(default)s; more need --redis); on a loopback address "
            "the page then has a button that SIGKILLs the worker owning the turn"
        ),
    )
    # The default reply lasts 6 s: long enough for a person to reload or drop the connection
    # mid-turn, which is what the demo is for. The page's speed control overrides it per turn.
    demo.add_argument(
        "--tokens", type=_int_at_least(0), default=60, help="words per reply (default %(default)s)"
    )
    demo.add_argument(
        "--token-delay-ms",
        type=_int_at_least(0),
        default=100,
        metavar="MS",
        help="delay between two words (default %(default)s)",
    )
    demo.add_argument(
        "--lease-ms",
        type=_int_at_least(30),
        default=DEFAULT_LEASE_MS,
        metavar="MS",
        help="how long a dead worker's turn stays leased (default %(default)s)",
    )
    demo.add_argument(
        "--substrate",
        type=_http_url,
        metavar="URL",
        help=(
            "run turns on the reference substrate at URL (see `turnstream substrate`) "
            "instead of the built-in fake model; --tokens/--token-delay-ms then do not apply"
        ),
    )
    substrate = commands.add_parser(
        "substrate",
        help="serve the reference substrate that `demo --substrate` talks to",
        description=(
            "Serve the reference substrate: runs that outlive their clients, "
            "one per execution id, re-attachable after any event id."
        ),
    )
    # Only argparse and the argument definitions: serving it imports starlette and uvicorn.
    from .adapters.orchestrator._cli import add_substrate_arguments

    add_substrate_arguments(substrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import uvicorn  # noqa: F401  (only: is it there)
    except ImportError:
        parser.exit(1, f"turnstream {args.command} needs uvicorn: pip install uvicorn\n")
    if args.command == "substrate":
        from .adapters.orchestrator._cli import serve

        return serve(
            host=args.host,
            port=args.port,
            tokens=args.tokens,
            token_delay_ms=args.token_delay_ms,
            log_level=args.log_level,
        )
    # `demo` (the subcommand is required, so argparse refused anything else).
    if args.substrate is not None:
        try:
            import httpx  # noqa: F401
            import httpx_sse  # noqa: F401
        except ImportError:
            parser.exit(
                1,
                "turnstream demo --substrate needs httpx and httpx-sse: "
                "pip install 'turnstream[orchestrator]'\n",
            )

    if args.workers > 1 and args.redis is None:
        # Each worker process would have a memory store of its own: no turn could be resumed
        # by another worker, and a kill would lose the turn instead of showing a takeover.
        parser.error("--workers above 1 needs --redis URL (the workers share turns through it)")

    from ._demo._serve import serve as serve_demo

    try:
        return serve_demo(
            host=args.host,
            port=args.port,
            workers=args.workers,
            settings={
                "redis_url": args.redis,
                "tokens": args.tokens,
                "token_delay_ms": args.token_delay_ms,
                "lease_ms": args.lease_ms,
                "substrate_url": args.substrate,
            },
        )
    except ValueError as exc:  # e.g. a --redis URL that is not one
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
