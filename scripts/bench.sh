#!/usr/bin/env bash
# Reproduce docs/benchmarks.md: a release build, then `epidemic bench` on SQLite, on a
# throwaway PostgreSQL 15 and on a throwaway MariaDB, each with its default durability
# settings (fsync on), all on this machine. Extra arguments go to every `epidemic bench`
# (for example --quick, or --drain 200000). Results: a table per backend on stdout and
# JSON files in the printed directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

cargo build --release --workspace --quiet
bin="$root/target/release/epidemic"
work=$(mktemp -d /tmp/epidemic-bench.XXXXXX)
chmod 755 "$work"
echo "working in $work"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_bin=/usr/lib/postgresql/15/bin
pg_dir="$work/pg"; pg_port=$(free_port)
maria_dir="$work/maria"; maria_port=$(free_port)
cleanup() {
    [ -f "$pg_dir/data/postmaster.pid" ] && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    [ -f "$maria_dir/pid" ] && kill "$(cat "$maria_dir/pid")" 2>/dev/null || true
}
trap cleanup EXIT

run_bench() { # name url
    local cfg="$work/$1.toml"
    printf '[database]\nurl = "%s"\n' "$2" > "$cfg"
    echo
    "$bin" --config "$cfg" bench "${@:3}" --json > "$work/$1.json"
    python3 - "$work/$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"## {r['backend']}")
print(f"latency p50/p95/p99/max ms : {r['latency_ms_p50']:.2f} / {r['latency_ms_p95']:.2f} / {r['latency_ms_p99']:.2f} / {r['latency_ms_max']:.2f}  ({r['latency_changes']} at {r['latency_rate_per_s']}/s)")
print(f"drain                      : {r['drain_per_s']:,.0f} changes/s ({r['drain_changes']:,} changes)")
print(f"writes unwatched           : {r['write_unwatched']['rows_per_s']:,.0f} rows/s")
print(f"writes watched             : {r['write_watched']['rows_per_s']:,.0f} rows/s (ratio {r['write_ratio']:.2f})")
if r.get('write_watched_no_notify'):
    print(f"writes watched, notify off : {r['write_watched_no_notify']['rows_per_s']:,.0f} rows/s (ratio {r['write_ratio_no_notify']:.2f})")
print(f"idle CPU                   : {r['idle_cpu_percent']:.2f} %")
print(f"peak RSS draining          : {r['peak_rss_mb_draining']:.1f} MB")
PY
}

# SQLite, WAL mode (as recommended), default synchronous (FULL in WAL).
python3 -c "import sqlite3; c=sqlite3.connect('$work/bench.db'); c.execute('PRAGMA journal_mode=WAL')"
run_bench sqlite "sqlite://$work/bench.db" "$@"

# PostgreSQL 15, defaults (fsync on, synchronous_commit on).
mkdir -p "$pg_dir" && chown postgres "$pg_dir"
(cd "$pg_dir" && runuser -u postgres -- "$pg_bin/initdb" -D "$pg_dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null)
(cd "$pg_dir" && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 30 \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=50" start >/dev/null)
run_bench postgres "postgres://postgres@127.0.0.1:$pg_port/postgres" "$@"

# MariaDB, defaults (innodb_flush_log_at_trx_commit=1).
mkdir -p "$maria_dir/tmp"
TMPDIR="$maria_dir/tmp" mariadb-install-db --no-defaults --datadir="$maria_dir/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >/dev/null
mariadbd --no-defaults --datadir="$maria_dir/data" --user=root --socket="$maria_dir/sock" --port="$maria_port" \
    --bind-address=127.0.0.1 --pid-file="$maria_dir/pid" --log-error="$maria_dir/err.log" --tmpdir="$maria_dir/tmp" &
for _ in $(seq 100); do
    mariadb-admin --no-defaults --protocol=tcp -h127.0.0.1 -P"$maria_port" -uroot ping >/dev/null 2>&1 && break
    sleep 0.2
done
mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$maria_port" -uroot -e "CREATE DATABASE bench"
run_bench mariadb "mysql://root@127.0.0.1:$maria_port/bench" "$@"
echo
echo "JSON results in $work"
