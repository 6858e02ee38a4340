#!/usr/bin/env bash
# Makes .venv match requirements.lock: creates it when missing, rebuilds it when the lock
# changed since it was built (the lock is generated from pyproject.toml, so a dependency
# change shows up there). Run, never sourced: scripts/env.sh calls it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || { echo "error: $PY not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 2; }
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "error: $PY is not Python 3.11 (the lock is resolved for 3.11); set PYTHON=" >&2; exit 2; }

# One build at a time: a second shell sourcing env.sh meanwhile waits for it, then finds the
# stamp current (two concurrent builds would delete each other's files).
exec 9>.venv-build.lock
flock 9

stamp=.venv/.tokenmeter-lock
want="$(sha256sum requirements.lock | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo ">> building .venv from requirements.lock (~2.5 GB; about 2 minutes on a fast link)"
  start=$SECONDS
  rm -rf .venv
  log="$(mktemp)"
  # pip's output goes to a log that is shown only if something fails.
  if ! { "$PY" -m venv .venv \
        && .venv/bin/python -m pip install --quiet --upgrade "pip>=24" \
        && .venv/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock \
        && .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . ; } >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -40 >&2
    echo "error: could not build .venv from requirements.lock (pip output above)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$want" > "$stamp"
  echo ">> .venv ready in $((SECONDS - start)) s"
fi
