"""turnstream's benchmarks: ``python -m bench`` (or ``scripts/bench``) runs the harness.

Not part of the package or the test suite; see bench/README.md and bench/RESULTS.md.
"""
