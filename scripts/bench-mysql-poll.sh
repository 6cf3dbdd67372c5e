#!/usr/bin/env bash
# MariaDB's adaptive poll beside a fixed one, in one run on one throwaway server
# (default settings, innodb_flush_log_at_trx_commit=1): rounds alternate
# `poll_min_ms = 1` (the default: fast after changes, slower with quiet time up to
# `poll_interval_ms`) and `poll_min_ms = 50` (a fixed 50 ms poll, as before). Each round
# is `epidemic bench` with latency at the given rates, the write ratio with 8 writers,
# a small drain and 10 s of idle CPU. Prints a table of medians.
#
# Usage: scripts/bench-mysql-poll.sh [--rounds R] [--rate LIST]   (defaults: 3, 100,1000)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
rates=100,1000
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --rate) rates=$2; shift 2 ;;
        *) echo "usage: $0 [--rounds R] [--rate LIST]" >&2; exit 64 ;;
    esac
done

echo "==> building release binaries" >&2
cargo build --release -q -p epidemic -p epidemic-backend-mysql
bin=$(pwd)/target/release/epidemic
work=$(mktemp -d /tmp/bench-mysql-poll.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
    [ -f "$work/pid" ] && kill "$(cat "$work/pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/tmp"
TMPDIR="$work/tmp" mariadb-install-db --no-defaults --datadir="$work/data" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >/dev/null
mariadbd --no-defaults --datadir="$work/data" --user=root --socket="$work/sock" --port="$port" \
    --bind-address=127.0.0.1 --pid-file="$work/pid" --log-error="$work/err.log" --tmpdir="$work/tmp" &
for _ in $(seq 300); do
    mariadb-admin --no-defaults --socket="$work/sock" -uroot ping >/dev/null 2>&1 && break
    sleep 0.2
done
mariadb --no-defaults --socket="$work/sock" -uroot -e "CREATE DATABASE bench"

for r in $(seq "$rounds"); do
    for min in 1 50; do
        printf '[database]\nurl = "mysql://root@127.0.0.1:%s/bench"\npoll_min_ms = %s\n' "$port" "$min" >"$work/p$min.toml"
        echo "==> round $r, poll_min_ms = $min" >&2
        RUST_LOG=warn "$bin" --config "$work/p$min.toml" bench --rate "$rates" --drain 20000 \
            --writers 8 --idle-secs 10 --json >"$work/r$r-p$min.json"
    done
done

python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
med = statistics.median
rows = {}
for mn in (1, 50):
    rs = [json.load(open(f"{work}/r{r}-p{mn}.json")) for r in range(1, rounds + 1)]
    rows[mn] = rs
first = rows[1][0]
rates = [l["rate_per_s"] for l in first["latency_runs"]]
print("| | adaptive (poll_min_ms = 1) | fixed 50 ms (poll_min_ms = 50) |")
print("|---|---|---|")
def lat(r, rate, key):
    return next(l[key] for l in r["latency_runs"] if l["rate_per_s"] == rate)
for rate in rates:
    cells = []
    for mn in (1, 50):
        p50 = med(lat(r, rate, "ms_p50") for r in rows[mn])
        p99 = med(lat(r, rate, "ms_p99") for r in rows[mn])
        cells.append(f"{p50:.2f} / {p99:.2f} ms")
    print(f"| latency p50 / p99 at {rate:,}/s | {cells[0]} | {cells[1]} |")
for key, label, fmt in [("write_ratio", "write ratio, 8 writers, no reader", "{:.2f}"),
                        ("write_ratio_with_reader", "write ratio, 8 writers, reader keeping up", "{:.2f}"),
                        ("idle_cpu_percent", "idle CPU (%)", "{:.2f}"),
                        ("drain_per_s", "drain of 20,000 (changes/s)", "{:,.0f}")]:
    cells = [fmt.format(med(r[key] for r in rows[mn])) for mn in (1, 50)]
    print(f"| {label} | {cells[0]} | {cells[1]} |")
print(f"\n(medians of {rounds} alternating rounds)")
PY
