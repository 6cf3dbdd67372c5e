#!/usr/bin/env bash
# Backfill rate and memory: a table of N rows, a new daemon whose handler does nothing
# (the recorder test plugin writing to /dev/null) with `start = "snapshot"`, on each
# backend, first alone and then with W writers updating random rows and inserting new
# ones as fast as they can for the whole backfill. Reports rows/s (rows_done over the
# time between the backfill's start and its last chunk, as the database stored them) and
# the daemon's peak RSS (VmHWM). Throwaway PostgreSQL 15 and MariaDB servers in a temp
# dir, stopped at the end.
#
# Usage: scripts/bench-backfill.sh [N] [W] [backends...]
#        (defaults: 1000000 rows, 4 writers, sqlite postgres mysql)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
writers=${2:-4}
shift $(($# >= 2 ? 2 : $#)) || true
backends=("${@:-sqlite postgres mysql}")
read -r -a backends <<<"${backends[*]}"
root=$(pwd)

echo "==> building release binaries" >&2
cargo build --release -q -p epidemic -p epidemic-backend-sqlite -p epidemic-backend-postgres \
    -p epidemic-backend-mysql -p epidemic-recorder
bin=$root/target/release/epidemic
plugins=$root/target/release

work=$(mktemp -d /tmp/bench-backfill.XXXXXX)
chmod 755 "$work"
pg_bin=/usr/lib/postgresql/15/bin
pids=()
cleanup() {
    for p in "${pids[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    if [ -f "$work/pg/data/postmaster.pid" ]; then
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ -f "$work/my/pid" ]; then kill "$(cat "$work/my/pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---- servers -----------------------------------------------------------------------
start_postgres() {
    pg_port=$(free_port)
    mkdir -p "$work/pg" && chown postgres "$work/pg"
    (cd "$work/pg" && runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg/data" -U postgres \
        -A trust -E UTF8 --locale=C.UTF-8 >/dev/null)
    (cd "$work/pg" && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
        -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null)
}
start_mysql() {
    my_port=$(free_port)
    mkdir -p "$work/my/tmp"
    TMPDIR=$work/my/tmp mariadb-install-db --no-defaults --datadir="$work/my/data" \
        --auth-root-authentication-method=normal --skip-test-db --user=root >/dev/null
    mariadbd --no-defaults --datadir="$work/my/data" --socket="$work/my/sock" --port="$my_port" \
        --bind-address=127.0.0.1 --pid-file="$work/my/pid" --log-error="$work/my/log" \
        --tmpdir="$work/my/tmp" --skip-name-resolve --innodb-buffer-pool-size=256M \
        --innodb-log-file-size=256M --innodb-flush-log-at-trx-commit=2 --user=root &
    pids+=($!)
    for _ in $(seq 600); do
        mariadb --socket="$work/my/sock" -uroot -e 'SELECT 1' >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "mariadbd did not start" >&2
    exit 1
}

# ---- one backend: $1 name; sets url, sql() and writer() -----------------------------
setup() {
    case $1 in
    sqlite)
        url="sqlite://$work/bf.db"
        sql() { python3 -c "
import sqlite3, sys
c = sqlite3.connect('$work/bf.db', isolation_level=None, timeout=60)
c.execute('PRAGMA journal_mode=WAL')
c.executescript(sys.stdin.read())"; }
        fill="WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $n)
              INSERT INTO items SELECT i, 'user' || i, i FROM s;"
        ;;
    postgres)
        [ -n "${pg_port:-}" ] || start_postgres
        url="postgres://postgres@127.0.0.1:$pg_port/postgres"
        sql() { "$pg_bin/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null; }
        fill="INSERT INTO items SELECT i, 'user' || i, i FROM generate_series(1, $n) i; ANALYZE items;"
        ;;
    mysql)
        [ -n "${my_port:-}" ] || start_mysql
        mariadb --socket="$work/my/sock" -uroot -e 'CREATE DATABASE IF NOT EXISTS bf'
        url="mysql://root@127.0.0.1:$my_port/bf"
        sql() { mariadb --socket="$work/my/sock" -uroot bf; }
        fill="INSERT INTO items SELECT seq, CONCAT('user', seq), seq FROM seq_1_to_$n; ANALYZE TABLE items;"
        ;;
    esac
}

# A writer: updates a random row's quota and inserts a new row, in turns, until killed.
# $1 backend, $2 writer number.
writer() {
    case $1 in
    sqlite)
        python3 - "$work/bf.db" "$n" "$2" <<'EOF'
import random, sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
n, w = int(sys.argv[2]), int(sys.argv[3])
i = 0
while True:
    i += 1
    c.execute("UPDATE items SET quota = quota + 1 WHERE id = ?", (random.randint(1, n),))
    c.execute("INSERT INTO items VALUES (?, ?, 0)", (n + w * 100_000_000 + i, f"w{w}-{i}"))
EOF
        ;;
    postgres)
        printf '\\set id random(1, %s)\nUPDATE items SET quota = quota + 1 WHERE id = :id;\nINSERT INTO items VALUES (%s + %s * 100000000 + :client_id * 10000000 + nextval('"'"'wseq'"'"'), '"'"'w'"'"', 0);\n' \
            "$n" "$n" "$2" >"$work/pgbench-$2.sql"
        "$pg_bin/pgbench" -n -h 127.0.0.1 -p "$pg_port" -U postgres -c 1 -T 100000 \
            -f "$work/pgbench-$2.sql" postgres >/dev/null 2>&1
        ;;
    mysql)
        python3 - "$n" "$2" <<'EOF' | mariadb --socket="$work/my/sock" -uroot bf >/dev/null 2>&1
import random, sys
n, w = int(sys.argv[1]), int(sys.argv[2])
i = 0
try:
    while True:
        i += 1
        print(f"UPDATE items SET quota = quota + 1 WHERE id = {random.randint(1, n)};")
        print(f"INSERT INTO items VALUES ({n + w * 100_000_000 + i}, 'w{w}-{i}', 0);")
except BrokenPipeError:
    pass
EOF
        ;;
    esac
}

# One run: $1 backend, $2 writers. Prints a table row.
run() {
    local backend=$1 k=$2
    setup "$backend"
    local dir=$work/$backend-$k
    mkdir -p "$dir"
    if [ -f "$work/last.toml" ]; then "$bin" --config "$work/last.toml" uninstall >/dev/null 2>&1 || true; fi
    case $backend in
    sqlite) rm -f "$work/bf.db" "$work/bf.db-wal" "$work/bf.db-shm" ;;
    esac
    printf 'DROP TABLE IF EXISTS items;\nCREATE TABLE items (id BIGINT PRIMARY KEY, name VARCHAR(64) NOT NULL, quota BIGINT);\n' | sql
    [ "$backend" = postgres ] && printf 'DROP SEQUENCE IF EXISTS wseq; CREATE SEQUENCE wseq;\n' | sql
    echo "$fill" | sql
    cat >"$dir/bf.toml" <<EOF
[database]
url = "$url"

[daemon]
name = "bf$k"
plugin_dir = "$plugins"

[[handler]]
name = "noop"
plugin = "recorder"
start = "snapshot"
[handler.config]
table = "items"
columns = ["name", "quota"]
file = "/dev/null"
EOF
    cp "$dir/bf.toml" "$work/last.toml"
    "$bin" --config "$dir/bf.toml" install >/dev/null
    local wpids=()
    for w in $(seq 1 "$k"); do
        writer "$backend" "$w" &
        wpids+=($!)
        pids+=($!)
    done
    RUST_LOG=warn "$bin" --config "$dir/bf.toml" run >"$dir/log" 2>&1 &
    local daemon=$!
    pids+=($daemon)
    local hwm=0 state=""
    while :; do
        sleep 0.5
        kill -0 "$daemon" 2>/dev/null || { echo "the daemon stopped:" >&2; cat "$dir/log" >&2; exit 1; }
        hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
        state=$("$bin" --config "$dir/bf.toml" status --json 2>/dev/null | python3 -c '
import json, sys
b = [x for x in json.load(sys.stdin).get("backfills", []) if x["handler"] == "noop"]
if b and b[0]["state"] == "done":
    x = b[0]
    secs = (x["updated_at_us"] - x["started_at_us"]) / 1e6
    print(x["rows_done"], "%.2f" % secs)' || true)
        [ -n "$state" ] && break
    done
    # The writers' children first (python, pgbench, mariadb), then the subshells.
    for p in "${wpids[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    kill "$daemon"
    wait "$daemon" 2>/dev/null || true
    read -r rows secs <<<"$state"
    python3 -c "print(f'| $backend | $k | {$rows:,} | {$secs:.1f} | {$rows / max($secs, 1e-9):,.0f} | {$hwm / 1024:.1f} |')"
}

echo "| backend | writers | rows | seconds | rows/s | daemon peak RSS (MB) |"
echo "| --- | --- | --- | --- | --- | --- |"
for b in "${backends[@]}"; do
    run "$b" 0
    run "$b" "$writers"
done
