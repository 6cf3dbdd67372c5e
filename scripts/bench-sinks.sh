#!/usr/bin/env bash
# Publish rates of the sinks, side by side in one run with a no-op handler on the same
# backend (SQLite): a backlog of N changes is written while nobody reads, then drained by
#   noop     the recorder test plugin writing to /dev/null (a handler that does nothing)
#   webhook  the webhook plugin, one POST per change, to a local receiver (python3)
#   webhook-batch  the same with batch_max = 100 (JSON arrays)
#   nats     the nats plugin into a local nats-server with JetStream, every publish acked
# each from its own copy of the same database. The rate is changes/s from the first
# change delivered to the last, read from the daemon's Prometheus counter.
#
# Usage: scripts/bench-sinks.sh [N]   (default 100000; needs nats-server and python3)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
root=$(pwd)

echo "==> building release binaries" >&2
cargo build --release -q -p epidemic -p epidemic-backend-sqlite -p epidemic-recorder \
    -p epidemic-webhook -p epidemic-nats
bin=$root/target/release/epidemic
plugins=$root/target/release

work=$(mktemp -d /tmp/bench-sinks.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A local webhook receiver: HTTP/1.1 keep-alive, answers 200 to every POST.
hook_port=$(free_port)
python3 - "$hook_port" <<'EOF' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
EOF
pids+=($!)

nats_port=$(free_port)
nats_mon=$(free_port)
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
"$nats_bin" -js -sd "$work/nats" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" 2>"$work/nats.log" &
pids+=($!)
for _ in $(seq 200); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $hook_port)).close(); socket.create_connection(('127.0.0.1', $nats_port)).close()" 2>/dev/null && break
    sleep 0.05
done

# The config of one variant: $1 name, $2 database file, $3 metrics port, $4 plugin lines.
config() {
    cat <<EOF
[database]
url = "sqlite://$2"

[daemon]
name = "bench"
plugin_dir = "$plugins"

[metrics]
listen = "127.0.0.1:$3"

[[handler]]
name = "$1"
$4
[handler.config]
table = "items"
columns = ["id", "version"]
EOF
}

# The backlog: N changes in one database, installed while nobody reads.
python3 - "$work/base.db" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
c.commit()
EOF
config noop "$work/base.db" 1 "plugin = \"recorder\"" > "$work/install.toml"
echo 'file = "/dev/null"' >> "$work/install.toml"
RUST_LOG=warn "$bin" --config "$work/install.toml" install >/dev/null
python3 - "$work/base.db" "$n" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
n = int(sys.argv[2])
with c:
    c.executemany("INSERT INTO items (id, version) VALUES (?, 0)", ((i,) for i in range(1, n + 1)))
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
c.close()
EOF

# Drain one copy of the backlog with variant $1 ($2: plugin lines, $3: config lines).
drain() {
    local name=$1 db=$work/$1.db port
    cp "$work/base.db" "$db"
    port=$(free_port)
    { config "$name" "$db" "$port" "$2"; echo "$3"; } > "$work/$name.toml"
    "$bin" --config "$work/$name.toml" run --from-oldest 2>"$work/$name.log" &
    local pid=$!
    python3 - "$port" "$n" "$name" <<'EOF'
import re, sys, time, urllib.request
port, n, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def delivered():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    m = re.search(r'^epidemic_changes_delivered_total\{[^}]*\} (\S+)', text, re.M)
    return int(float(m.group(1))) if m else 0
deadline = time.time() + 1800
first = None
while time.time() < deadline:
    d = delivered()
    now = time.time()
    if d and first is None:
        first = (now, d)
    if d is not None and d >= n:
        t0, d0 = first
        rate = (d - d0) / max(now - t0, 1e-6)
        print(f"{name} {rate:.0f}")
        break
    time.sleep(0.005)
else:
    sys.exit(f"{name}: not drained in 30 minutes")
EOF
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "==> draining $n changes per variant (SQLite, release build)" >&2
{
    drain noop "plugin = \"recorder\"" 'file = "/dev/null"'
    drain webhook "plugin = \"webhook\"" "url = \"http://127.0.0.1:$hook_port/hook\""
    drain webhook-batch "plugin = \"webhook\"" "url = \"http://127.0.0.1:$hook_port/hook\"
batch_max = 100"
    drain nats "plugin = \"nats\"" "url = \"nats://127.0.0.1:$nats_port\""
} > "$work/rates"

python3 - "$work/rates" "$n" <<'EOF'
import sys
rates = dict(line.split() for line in open(sys.argv[1]))
noop = float(rates["noop"])
print(f"{'variant':15} {'changes/s':>12} {'/ no-op':>8}   ({sys.argv[2]} changes, SQLite)")
for name, rate in rates.items():
    print(f"{name:15} {float(rate):>12,.0f} {float(rate) / noop:>8.3f}")
EOF
