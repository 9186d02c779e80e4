"""``python -m tests.chaos``: the long chaos run (see ``_run.py``)."""

import sys
from pathlib import Path

# The suite's modules import each other as pytest sees them (`chaos.…`, `e2e._server`), with
# tests/ on the path: put it there for this entry point too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos._run import main

sys.exit(main())
