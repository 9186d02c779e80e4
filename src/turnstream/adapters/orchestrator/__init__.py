"""The reference orchestrator: its substrate server and its reconnect adapter.

* :func:`create_substrate_app` — the reference substrate as a Starlette app; run it with
  ``python -m turnstream.adapters.orchestrator`` or ``turnstream substrate``.
* :class:`OrchestratorAdapter` — the reconnect adapter that speaks its protocol (needs httpx
  and httpx-sse: ``pip install turnstream[orchestrator]``).
"""

from typing import TYPE_CHECKING

from ._protocol import FAIL_PROMPT
from ._substrate import ReferenceSubstrate, create_substrate_app

if TYPE_CHECKING:
    from ._adapter import OrchestratorAdapter

__all__ = ["FAIL_PROMPT", "OrchestratorAdapter", "ReferenceSubstrate", "create_substrate_app"]


def __getattr__(name: str) -> object:
    # The adapter pulls in httpx and httpx-sse; serving the substrate needs neither.
    if name == "OrchestratorAdapter":
        from ._adapter import OrchestratorAdapter

        return OrchestratorAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
