"""The chaos scenarios. Each takes the cluster, a seeded ``random.Random`` and its counts, and
returns a :class:`ScenarioResult`: faults tried/fired, turns, lost / duplicated / abandoned,
restarts, extra model calls, and whatever else the checker found.

The target behaviour each one holds the core to (turnstream's invariants):

* ``kills`` — a worker SIGKILLs itself at a named fault point (``TURNSTREAM_FAULTS``), two
  workers on one Redis, clients resume or retry on the survivor: nothing lost, nothing twice,
  nothing abandoned; a local turn whose owner died may restart (counted apart), a substrate
  turn is never started twice on the substrate.
* ``zombies`` — the owner is SIGSTOPped past its lease, the other worker takes over, then the
  owner is continued: it writes nothing after the takeover.
* ``reply_losses`` — the proxy lets a command through and drops its reply (an append, a
  renewal, a finish, or any): nothing lost or twice, and the model called exactly once.
* ``redis_restarts`` — Redis is killed -9 and restarted on its AOF mid-turn, for less than a
  lease: every turn completes, the model called once.
* ``stalls`` — Redis out of reach for longer than the lease (both workers' proxies hold every
  byte, or one worker's only, or ``CLIENT PAUSE``), some stalls past the socket timeout too:
  every turn ends (completed, or failed with ``store_unavailable``), none is left running,
  no reader hangs, the model called once.
* ``load`` — many concurrent turns on one worker: all complete, nothing lost or twice.
"""

from .kills import kills
from .load import load
from .replies import reply_losses
from .restarts import redis_restarts
from .stalls import stalls
from .zombies import zombies

__all__ = ["kills", "load", "redis_restarts", "reply_losses", "stalls", "zombies"]
