"""The scripts a reader runs first: how they set up ``.venv``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").iterdir() if not p.name.startswith("_"))


def test_every_script_names_its_venv_profile() -> None:
    # A sourced script sees its caller's arguments as its own when given none: sourced bare
    # from `scripts/test -k handler`, _venv.sh read `-k` as the profile and exited 2.
    sourcing = [p for p in SCRIPTS if "_venv.sh" in p.read_text()]
    assert {p.name for p in sourcing} >= {"test", "demo", "bench", "chaos"}
    for script in sourcing:
        for line in script.read_text().splitlines():
            if re.match(r"\s*(source|\.)\s+\S*_venv\.sh", line):
                assert re.search(r'_venv\.sh"?\s+(dev|demo)\b', line), f"{script.name}: {line}"


def test_sourcing_with_the_callers_arguments_works() -> None:
    # The installs are stamped, so in a prepared checkout this only checks and returns.
    result = subprocess.run(
        ["bash", "-c", 'source scripts/_venv.sh dev && echo "ready $1"', "test", "-k", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ready -k")
