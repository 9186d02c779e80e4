"""Reconnect adapters, one package per substrate (docs/writing-an-adapter.md).

Each passes :class:`turnstream.testing.AdapterConformance`. Import the one you use by its
package (``turnstream.adapters.orchestrator``…): nothing here imports a substrate's SDK.
"""
