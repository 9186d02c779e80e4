"""``python -m turnstream.adapters.orchestrator``: serve the reference substrate."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
