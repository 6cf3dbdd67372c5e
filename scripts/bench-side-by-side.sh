#!/usr/bin/env bash
# Side by side in one run: two epidemic release builds (OLD= another commit, NEW= this
# tree's), alternating on the same throwaway PostgreSQL and SQLite, so ratios compare
# fairly on a noisy machine. Example: OLD=/path/to/old/target/release/epidemic scripts/bench-side-by-side.sh
set -euo pipefail
old=${OLD:?set OLD to the epidemic binary to compare with (a release build of another commit)}
new=${NEW:-$(cd "$(dirname "$0")/.." && pwd)/target/release/epidemic}
work=$(mktemp -d /tmp/sbs.XXXXXX); chmod 755 $work
pg_bin=/usr/lib/postgresql/15/bin; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p $work/pg && chown postgres $work/pg
(cd $work/pg && runuser -u postgres -- $pg_bin/initdb -D $work/pg/data -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null)
(cd $work/pg && runuser -u postgres -- $pg_bin/pg_ctl -D $work/pg/data -l $work/pg/log -w -o "-p $port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null)
trap "runuser -u postgres -- $pg_bin/pg_ctl -D $work/pg/data -m fast -w stop >/dev/null" EXIT
printf '[database]\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' $port > $work/pg.toml
python3 -c "import sqlite3; c=sqlite3.connect('$work/b.db'); c.execute('PRAGMA journal_mode=WAL')"
printf '[database]\nurl = "sqlite://%s/b.db"\n' $work > $work/sq.toml
summ() { python3 -c "
import json,sys; r=json.load(open(sys.argv[1]))
print(f\"{sys.argv[2]:12} {r['backend']:9} p50 {r['latency_ms_p50']:.2f} p99 {r['latency_ms_p99']:.2f} drain {r['drain_per_s']:,.0f}/s ratio {r['write_ratio']:.2f}\")" $1 $2; }
for round in 1 2; do
  for which in old new; do
    bin=${!which}
    "$bin" --config $work/pg.toml bench --drain 200000 --idle-secs 1 --json > $work/pg-$which-$round.json 2>/dev/null
    summ $work/pg-$which-$round.json "$which#$round"
  done
done
for which in old new; do
  bin=${!which}
  "$bin" --config $work/sq.toml bench --drain 200000 --idle-secs 1 --json > $work/sq-$which.json 2>/dev/null
  summ $work/sq-$which.json "$which"
done
