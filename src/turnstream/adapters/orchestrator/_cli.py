"""Serving the reference substrate: ``python -m turnstream.adapters.orchestrator`` and
``turnstream substrate`` share these arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from types import FrameType

__all__ = ["DEFAULT_PORT", "add_substrate_arguments", "main", "serve"]

DEFAULT_PORT = 8100
# A bound on uvicorn's wait for open connections when it stops (the substrate ends its own
# streams at once; this is for anything else that hangs).
_GRACEFUL_SHUTDOWN_S = 5


def _int_from(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}, got {value}")
        return value

    return parse


def add_substrate_arguments(parser: argparse.ArgumentParser) -> None:
    from ._substrate import MAX_TOKEN_DELAY_MS, MAX_TOKENS

    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=_int_from(0, 65535),
        default=DEFAULT_PORT,
        help="TCP port (default %(default)s)",
    )
    parser.add_argument(
        "--tokens",
        type=_int_from(0, MAX_TOKENS),
        default=40,
        help="text deltas per run (default %(default)s)",
    )
    parser.add_argument(
        "--token-delay-ms",
        type=_int_from(0, MAX_TOKEN_DELAY_MS),
        default=25,
        metavar="MS",
        help="delay before each text delta (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default %(default)s)",
    )


def serve(
    *, host: str, port: int, tokens: int, token_delay_ms: int, log_level: str = "info"
) -> int:
    """Run the reference substrate under uvicorn until interrupted; 1 if it did not start."""
    import uvicorn

    from ._substrate import create_substrate_app

    app = create_substrate_app(tokens=tokens, token_delay_ms=token_delay_ms)
    substrate = app.state.substrate

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn waits for open responses before the lifespan's shutdown: end the
            # substrate's streams now, or a long run's stream would hold the exit.
            substrate.close_streams_threadsafe()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    server = Server(config)
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m turnstream.adapters.orchestrator",
        description="Serve the reference substrate for OrchestratorAdapter.",
    )
    add_substrate_arguments(parser)
    args = parser.parse_args(argv)
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        parser.exit(1, "the reference substrate needs uvicorn: pip install uvicorn\n")
    return serve(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        token_delay_ms=args.token_delay_ms,
        log_level=args.log_level,
    )
