"""Serving the demo under uvicorn: one worker in this process, or several worker processes.

Several workers need the app as an import string (uvicorn spawns each worker afresh), so
the command line hands the settings to :func:`app_from_env` through one environment
variable, and makes the directory the workers register their PIDs in (``_workers.py``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Final

from starlette.applications import Starlette

from ._app import create_demo_app

__all__ = ["CONFIG_ENV", "app_from_env", "is_loopback", "serve"]

CONFIG_ENV: Final = "TURNSTREAM_DEMO_CONFIG"
logger = logging.getLogger("turnstream.demo")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_from_env() -> Starlette:
    """uvicorn's app factory in each worker process (``--workers`` > 1)."""
    settings: dict[str, Any] = json.loads(os.environ[CONFIG_ENV])
    return create_demo_app(**settings)


def serve(*, host: str, port: int, workers: int, settings: dict[str, Any]) -> int:
    """Serve the demo; the exit status (1 when uvicorn did not start, e.g. the port is taken).

    ``settings`` are :func:`create_demo_app`'s keyword arguments (JSON values only)."""
    import uvicorn

    if workers == 1:
        app = create_demo_app(**settings)  # a ValueError here is the caller's to report
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="on"))
        server.run()
        # uvicorn reports a failed start (port taken) by not having started. An unreachable
        # Redis is no failed start: the demo serves 503s until it is back.
        return 0 if server.started else 1
    registry_dir: str | None = None
    if is_loopback(host):
        registry_dir = tempfile.mkdtemp(prefix="turnstream-demo-workers-")
    else:
        logger.warning("not on a loopback address: the page's kill button is off")
    os.environ[CONFIG_ENV] = json.dumps(
        {**settings, "workers": workers, "registry_dir": registry_dir}
    )
    try:
        uvicorn.run(
            "turnstream._demo._serve:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
        )
    finally:
        if registry_dir is not None:
            shutil.rmtree(registry_dir, ignore_errors=True)
    return 0
