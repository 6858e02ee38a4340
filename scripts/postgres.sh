#!/usr/bin/env bash
# Starts a throw-away PostgreSQL for tests on 127.0.0.1 and prints its DSN (the only line on
# stdout; progress goes to stderr). Installs Debian's `postgresql` with apt-get when no server
# binaries are found (needs root). Idempotent: a server it already started is reused, so a
# second call takes well under a second. Trust authentication, loopback only: for tests.
#   DSN="$(bash scripts/postgres.sh)"          # or: source scripts/postgres.sh (exports it)
# Env: TOKENMETER_PG_DIR (state folder, default /tmp/tokenmeter-pg), TOKENMETER_PG_PORT.
set -euo pipefail

_pg_main() {
  local dir="${TOKENMETER_PG_DIR:-/tmp/tokenmeter-pg}" bin="" port db=tokenmeter_test
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      echo "postgres.sh: no PostgreSQL server binaries and cannot apt-get install (need root on Debian)" >&2
      return 1
    fi
    echo "postgres.sh: installing Debian's postgresql (apt-get)..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  fi

  # initdb/postgres refuse to run as root: run them as the `postgres` user when we are root.
  local as=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || { echo "postgres.sh: no postgres user" >&2; return 1; }
    as=(runuser -u postgres --)
  fi

  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    echo "postgres.sh: initdb in $dir/data" >&2
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
  fi
  if [ -f "$dir/port" ]; then
    port="$(cat "$dir/port")"
  else
    port="${TOKENMETER_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
    echo "$port" > "$dir/port"
  fi
  if ! "${as[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    echo "postgres.sh: starting PostgreSQL on 127.0.0.1:$port" >&2
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=on" >/dev/null \
      || { tail -5 "$dir/server.log" >&2; return 1; }
  fi
  if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
  fi
  TOKENMETER_TEST_PG_DSN="postgresql://postgres@127.0.0.1:$port/$db"
  export TOKENMETER_TEST_PG_DSN
  echo "$TOKENMETER_TEST_PG_DSN"
}

_pg_main
