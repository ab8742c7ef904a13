#!/usr/bin/env bash
# A throwaway PostgreSQL on 127.0.0.1 for the tests that need one.
#   scripts/pg.sh start   initializes and starts it; prints its URL
#   scripts/pg.sh stop    stops it and removes its files
# TROUPE_PG_DIR and TROUPE_PG_PORT override where and on which port.
# It trades durability for speed (fsync off): nothing in it outlives a run.
set -euo pipefail

DIR="${TROUPE_PG_DIR:-/tmp/troupe-pg}"
PORT="${TROUPE_PG_PORT:-54329}"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
if [ -z "$BIN" ]; then
    echo "PostgreSQL is not installed (run scripts/install-deps.sh)" >&2
    exit 1
fi

# initdb and postgres refuse to run as root.
as_pg() {
    if [ "$(id -u)" = "0" ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

stop() {
    if [ -f "$DIR/data/postmaster.pid" ]; then
        as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
}

case "${1:-}" in
start)
    stop
    mkdir -p "$DIR"
    if [ "$(id -u)" = "0" ]; then chown postgres "$DIR"; fi
    as_pg "$BIN/initdb" -D "$DIR/data" -A trust -U troupe -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; exit 1; }
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
        start >/dev/null || { cat "$DIR/server.log" >&2; exit 1; }
    as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U troupe troupe
    echo "postgres://troupe@127.0.0.1:$PORT/troupe"
    ;;
stop)
    stop
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
