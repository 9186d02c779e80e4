"""Conformance kits for code written against turnstream's protocols.

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

This package imports pytest and hypothesis; ``import turnstream`` never imports it.
"""

from ._store_suite import StoreConformance

__all__ = ["StoreConformance"]
