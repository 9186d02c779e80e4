# Sourced by the scripts: make .venv and install the project when needed.
#
#   source scripts/_venv.sh          the dev profile: the project and every dev tool
#   source scripts/_venv.sh demo     the demo profile: the runtime and uvicorn only
#
# Each profile has its own stamp, so that running one script never reinstalls what another
# already installed: the dev profile is a superset of the demo one, so a fresh dev stamp
# satisfies the demo too, while a demo stamp alone makes the dev profile install its tools.
# A stamp older than pyproject.toml is stale (the dependencies may have changed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
profile="${1:-dev}"
case "$profile" in
    dev) extras='.[dev,hiredis]' ;;
    demo) extras='.[demo]' ;;
    *) echo "_venv.sh: unknown profile $profile (dev or demo)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "turnstream needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
_fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
# .turnstream-installed is the single stamp of the scripts before profiles: a dev install.
if _fresh .venv/.turnstream-dev || _fresh .venv/.turnstream-installed; then
    : # the dev tools are there, and with them everything the demo needs
elif [ "$profile" = demo ] && _fresh .venv/.turnstream-demo; then
    :
else
    if [ "$profile" = dev ]; then
        echo "== installing turnstream and its dev tools into .venv"
    else
        echo "== installing turnstream and uvicorn into .venv (the dev tools come with scripts/test)"
    fi
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "$extras"
    touch ".venv/.turnstream-$profile"
fi
unset -f _fresh
