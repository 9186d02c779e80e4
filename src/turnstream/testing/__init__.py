"""Conformance kits and fakes for code written against turnstream's protocols.

``StoreConformance`` is the store conformance suite every :class:`~turnstream.TurnStore`
passes (memory, fakeredis, real Redis); subclass it with a ``store`` fixture to run it
against a store of your own::

    from turnstream.testing import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        async def store(self):
            store = MyStore()
            yield store
            await store.aclose()

``AdapterConformance`` does the same for a :class:`~turnstream.ReconnectAdapter` (fixtures
``adapter`` and ``start_request``, hook ``expected_text``; see its docstring).
``FakeSubstrate`` is an in-process substrate with a ``FakeSubstrateAdapter`` (no I/O):
deterministic runs, pacing by clock or by hand, counters and fault injection, for testing
code that drives adapters.

``FAULT_POINTS`` names the places where a process dies on purpose when the environment
variable ``TURNSTREAM_FAULTS`` lists them (``pump.after_append:3`` = at the third pass), for
chaos drills of an app's own deployment.

This package imports pytest and hypothesis; ``import turnstream`` never imports it.
"""

from .._faults import FAULT_POINTS
from ._adapter_suite import AdapterConformance, StreamReader
from ._fake_substrate import FakeRun, FakeSubstrate, FakeSubstrateAdapter
from ._store_suite import StoreConformance

__all__ = [
    "FAULT_POINTS",
    "AdapterConformance",
    "FakeRun",
    "FakeSubstrate",
    "FakeSubstrateAdapter",
    "StoreConformance",
    "StreamReader",
]
