"""The chaos suite: real workers, a real Redis, faults on purpose.

    _proxy.py      a TCP fault proxy in front of Redis (latency, stall, reset, lost reply, refuse)
    _redis.py      a redis-server with an fsync-always AOF: kill -9, restart, CLIENT PAUSE
    _app.py        the app under test, on turnstream's public API (local and substrate turns)
    _cluster.py    the processes of a run: Redis, a proxy per worker, the substrate, two workers
    _client.py     a raw-socket streaming client and a chat client that resumes and retries
    _check.py      every turn's log read from Redis, held to the invariants; clients to the log
    _scenario.py   what scenarios share: results, the router, running and judging turns
    scenarios/     kills, zombies, reply losses, Redis restarts, stalls, load
    _run.py        the long run (scripts/chaos) and _report.py, its docs/RELIABILITY.md

``test_chaos_smoke.py`` runs every scenario small and seeded inside the normal suite;
``test_harness.py`` checks the proxy, the Redis control and the checker themselves.
"""
