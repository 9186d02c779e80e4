"""Tests of the reconnect adapters, one module per substrate."""
