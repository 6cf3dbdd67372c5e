#!/usr/bin/env bash
# Epidemic beside its peers on one throwaway PostgreSQL 15 (fsync on, wal_level=logical
# for all): PgQ (Skytools' queue, its `pgqd` ticker every 10 ms, a consumer polling
# every 1 ms) and logical decoding (wal2json), with the floors a client could reach at
# best. Rounds interleave the systems; the table holds medians. Not part of the suite.
#
#   latency p50/p99 at 1,000 changes/s, from the writer's COMMIT returning to the
#     consumer having the change: Epidemic by `epidemic bench --rate 1000` (the daemon's
#     dispatcher and a built-in handler); PgQ and wal2json (streamed over the
#     replication protocol) by a Python driver, writer and consumer in one process;
#     floor: a bare NOTIFY to a LISTENing connection.
#   drain of a backlog of N changes written while nobody reads: Epidemic by
#     `epidemic bench --drain N` (handed over, acknowledged and pruned); PgQ by a Python
#     consumer (next_batch, get_batch_events, finish_batch; its table rotation is not
#     timed); wal2json server side (`pg_logical_slot_get_changes`, rows counted, not
#     sent); floors: a keyset SELECT of 500 rows at a time and one COPY, both to Python.
#   write ratio with a reader keeping up, 8 and 32 writers: `pgbench` inserting one row
#     per transaction into a table watched by each system while its reader runs (the
#     `epidemic run` daemon with a handler that writes to /dev/null, the PgQ consumer,
#     `pg_recvlogical` with wal2json), over the same pgbench into an unwatched table in
#     the same round.
#
# Usage: scripts/bench-peers.sh [--rounds R] [--drain N] [--seconds S]
#   defaults: 3 rounds, a backlog of 1000000, 5 s per pgbench run.
# Installs postgresql-15-pgq3, pgqd, postgresql-15-wal2json and python3-psycopg2 from
# Debian when missing (apt-get; run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=3
drain=1000000
seconds=5
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --drain) drain=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "usage: $0 [--rounds R] [--drain N] [--seconds S]" >&2; exit 64 ;;
    esac
done

packages=(postgresql-15-pgq3 pgqd postgresql-15-wal2json python3-psycopg2)
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then
    echo "==> installing ${packages[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null
fi

echo "==> building release binaries" >&2
cargo build --release -q -p epidemic -p epidemic-backend-postgres -p epidemic-recorder
bin=$root/target/release/epidemic

work=$(mktemp -d /tmp/bench-peers.XXXXXX)
chmod 755 "$work"
pg_bin=/usr/lib/postgresql/15/bin
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
    [ -f "$work/pg/data/postmaster.pid" ] && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
mkdir -p "$work/pg" && chown postgres "$work/pg"
(cd "$work/pg" && runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null)
(cd "$work/pg" && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w -t 30 \
    -o "-p $port -k $work/pg -c listen_addresses=127.0.0.1 -c max_connections=100 -c wal_level=logical -c max_replication_slots=8 -c max_wal_senders=8" start >/dev/null)
"$pg_bin/createdb" -h 127.0.0.1 -p "$port" -U postgres bench
echo "working in $work (server on port $port)" >&2

/usr/bin/python3 - "$work" "$port" "$bin" "$root/target/release" "$rounds" "$drain" "$seconds" <<'PY'
import json, os, select, signal, statistics, subprocess, sys, threading, time, urllib.parse
import psycopg2, psycopg2.extras

work, port, epidemic, plugins = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rounds, backlog, seconds = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
PG_BIN = "/usr/lib/postgresql/15/bin"
DSN = f"host=127.0.0.1 port={port} dbname=bench user=postgres"
URL = f"postgres://postgres@127.0.0.1:{port}/bench"
RATE, LATENCY_CHANGES = 1000, 5000
TABLES = ["bench_plain", "bench_epi", "bench_pgq", "bench_w2j"]


def connect(**kw):
    c = psycopg2.connect(DSN, **kw)
    c.autocommit = True
    return c


admin = connect()


def sql(q, args=None):
    with admin.cursor() as cur:
        cur.execute(q, args)
        return cur.fetchall() if cur.description else None


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values, p):
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(1, -(-len(s) * p // 100))
    return s[int(k) - 1]


# ---- setup ---------------------------------------------------------------------------
for t in TABLES:
    sql(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, payload text NOT NULL)")
sql("CREATE EXTENSION pgq")
sql("SELECT pgq.create_queue('bench')")
# A tick whenever events are 10 ms old (or 500 accumulated), pgqd asking every 10 ms.
sql("SELECT pgq.set_queue_config('bench', 'ticker_max_lag', '10 ms')")
sql("SELECT pgq.register_consumer('bench', 'c')")
sql("CREATE TRIGGER pgq AFTER INSERT OR UPDATE OR DELETE ON bench_pgq "
    "FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('bench')")
with open(f"{work}/pgqd.ini", "w") as f:
    f.write(f"[pgqd]\nlogfile = {work}/pgqd.log\npidfile = {work}/pgqd.pid\n"
            f"base_connstr = host=127.0.0.1 port={port} user=postgres\n"
            "initial_database = bench\ndatabase_list = bench\nticker_period = 0.01\n")
pgqd = subprocess.Popen(["pgqd", f"{work}/pgqd.ini"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

config = f"{work}/epidemic.toml"
with open(config, "w") as f:
    f.write(f'[database]\nurl = "{URL}"\n\n[daemon]\nname = "peers"\nplugin_dir = "{plugins}"\n\n'
            '[[handler]]\nname = "noop"\nplugin = "recorder"\n[handler.config]\n'
            'table = "bench_epi"\ncolumns = ["id", "payload"]\nfile = "/dev/null"\n')
subprocess.run([epidemic, "--config", config, "install"], check=True, stdout=subprocess.DEVNULL)
script = f"{work}/insert-%s.sql"
for t in TABLES:
    with open(script % t, "w") as f:
        f.write(f"INSERT INTO {t} (payload) VALUES ('payload');\n")


# ---- consumers -----------------------------------------------------------------------
class PgqConsumer(threading.Thread):
    """next_batch / get_batch_events / finish_batch, polling every 1 ms when idle."""

    def __init__(self, on_ids):
        super().__init__(daemon=True)
        self.on_ids, self.stop = on_ids, threading.Event()

    def run(self):
        c = connect()
        cur = c.cursor()
        while not self.stop.is_set():
            cur.execute("SELECT pgq.next_batch('bench', 'c')")
            batch = cur.fetchone()[0]
            if batch is None:
                time.sleep(0.001)
                continue
            cur.execute("SELECT ev_data FROM pgq.get_batch_events(%s)", (batch,))
            rows = cur.fetchall()
            now = time.monotonic()
            self.on_ids(now, [int(urllib.parse.parse_qs(r[0])["id"][0]) for r in rows])
            cur.execute("SELECT pgq.finish_batch(%s)", (batch,))
        c.close()


class Wal2jsonConsumer(threading.Thread):
    """Streams a wal2json slot over the replication protocol, confirming as it goes."""

    def __init__(self, slot, table, on_ids):
        super().__init__(daemon=True)
        self.slot, self.table, self.on_ids = slot, table, on_ids
        self.stop, self.ready = threading.Event(), threading.Event()

    def run(self):
        c = psycopg2.connect(DSN, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        cur = c.cursor()
        cur.start_replication(slot_name=self.slot, decode=True, options={
            "format-version": "2", "include-transaction": "false", "add-tables": f"public.{self.table}"})
        self.ready.set()
        while not self.stop.is_set():
            msg = cur.read_message()
            if msg is None:
                select.select([cur], [], [], 0.05)
                continue
            now = time.monotonic()
            change = json.loads(msg.payload)
            ids = [col["value"] for col in change.get("columns", []) if col["name"] == "id"]
            self.on_ids(now, ids)
            cur.send_feedback(flush_lsn=msg.data_start)
        c.close()


def notify_consumer(on_ids, stop, ready):
    c = connect()
    c.cursor().execute("LISTEN bench")
    ready.set()
    while not stop.is_set():
        if select.select([c], [], [], 0.05)[0]:
            c.poll()
            now = time.monotonic()
            ids = [int(n.payload) for n in c.notifies]
            c.notifies.clear()
            on_ids(now, ids)


# ---- measurements --------------------------------------------------------------------
def latency(write, start_consumer):
    """`write(i)` commits change i and returns its id; the consumer reports arrivals."""
    seen, lock = {}, threading.Lock()

    def on_ids(now, ids):
        with lock:
            for i in ids:
                seen.setdefault(int(i), now)
    stop = start_consumer(on_ids)
    time.sleep(0.5)
    sent = []
    t0 = time.monotonic()
    for i in range(LATENCY_CHANGES):
        due = t0 + i / RATE
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        id_ = write(i)
        sent.append((id_, time.monotonic()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if all(i in seen for i, _ in sent):
                break
        time.sleep(0.01)
    stop()
    with lock:
        ms = [max(0.0, seen[i] - t) * 1e3 for i, t in sent if i in seen]
    if len(ms) < len(sent):
        log(f"  {len(sent) - len(ms)} changes never arrived")
    return pct(ms, 50), pct(ms, 99)


def inserter(table):
    c = connect()
    cur = c.cursor()

    def write(_):
        cur.execute(f"INSERT INTO {table} (payload) VALUES ('payload') RETURNING id")
        return cur.fetchone()[0]
    return write


def latency_pgq():
    def start(on_ids):
        t = PgqConsumer(on_ids)
        t.start()
        return lambda: (t.stop.set(), t.join())
    return latency(inserter("bench_pgq"), start)


def latency_wal2json():
    sql("SELECT pg_create_logical_replication_slot('lat', 'wal2json')")

    def start(on_ids):
        t = Wal2jsonConsumer("lat", "bench_w2j", on_ids)
        t.start()
        t.ready.wait(30)
        return lambda: (t.stop.set(), t.join())
    try:
        return latency(inserter("bench_w2j"), start)
    finally:
        sql("SELECT pg_drop_replication_slot('lat')")


def latency_notify():
    c = connect()
    cur = c.cursor()

    def write(i):
        cur.execute("SELECT pg_notify('bench', %s)", (str(i),))
        return i

    def start(on_ids):
        stop, ready = threading.Event(), threading.Event()
        t = threading.Thread(target=notify_consumer, args=(on_ids, stop, ready), daemon=True)
        t.start()
        ready.wait(30)
        return lambda: (stop.set(), t.join())
    return latency(write, start)


def epidemic_bench():
    out = subprocess.run([epidemic, "--config", config, "bench", "--json", "--rate", str(RATE),
                          "--latency-changes", str(LATENCY_CHANGES), "--drain", str(backlog),
                          "--writers", "1", "--rows-per-writer", "50", "--idle-secs", "1"],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return r


def write_backlog(table, n):
    c = connect()
    cur = c.cursor()
    done = 0
    while done < n:
        k = min(1000, n - done)
        cur.execute(f"INSERT INTO {table} (payload) SELECT 'payload' FROM generate_series(1, %s)", (k,))
        done += k
    c.close()


def drain_pgq():
    count = [0]

    def on_ids(_now, ids):
        count[0] += len(ids)
    write_backlog("bench_pgq", backlog)
    time.sleep(0.2)  # the ticker's last tick over the backlog
    t0 = time.monotonic()
    consumer = PgqConsumer(on_ids)
    consumer.start()
    while count[0] < backlog:
        time.sleep(0.002)
    secs = time.monotonic() - t0
    consumer.stop.set()
    consumer.join()
    return backlog / secs


def drain_wal2json():
    sql("SELECT pg_create_logical_replication_slot('drain', 'wal2json')")
    try:
        write_backlog("bench_w2j", backlog)
        t0 = time.monotonic()
        n = sql("SELECT count(*) FROM pg_logical_slot_get_changes('drain', NULL, NULL, "
                "'format-version', '2', 'include-transaction', 'false', 'add-tables', 'public.bench_w2j')")[0][0]
        secs = time.monotonic() - t0
        if n != backlog:
            log(f"  wal2json decoded {n} changes of {backlog}")
        return backlog / secs
    finally:
        sql("SELECT pg_drop_replication_slot('drain')")


def drain_floors():
    sql("TRUNCATE bench_plain")
    write_backlog("bench_plain", backlog)
    c = connect()
    cur = c.cursor()
    t0 = time.monotonic()
    last, n = 0, 0
    while True:
        cur.execute("SELECT id, payload FROM bench_plain WHERE id > %s ORDER BY id LIMIT 500", (last,))
        rows = cur.fetchall()
        if not rows:
            break
        n += len(rows)
        last = rows[-1][0]
    keyset = n / (time.monotonic() - t0)

    class Null:
        def write(self, b):
            return len(b)
    t0 = time.monotonic()
    cur.copy_expert("COPY (SELECT id, payload FROM bench_plain) TO STDOUT", Null())
    copy = backlog / (time.monotonic() - t0)
    c.close()
    sql("TRUNCATE bench_plain")
    return keyset, copy


def pgbench(table, clients):
    out = subprocess.run([f"{PG_BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                          "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", script % table, "bench"],
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(out)


def writes_epidemic(clients):
    daemon = subprocess.Popen([epidemic, "--config", config, "run"], stdout=subprocess.DEVNULL,
                              stderr=open(f"{work}/daemon.log", "a"))
    try:
        time.sleep(1.0)  # registered and waiting
        return pgbench("bench_epi", clients)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


def writes_pgq(clients):
    t = PgqConsumer(lambda _now, _ids: None)
    t.start()
    try:
        return pgbench("bench_pgq", clients)
    finally:
        t.stop.set()
        t.join()


def writes_wal2json(clients):
    sql("SELECT pg_create_logical_replication_slot('writes', 'wal2json')")
    recv = subprocess.Popen([f"{PG_BIN}/pg_recvlogical", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                             "-d", "bench", "-S", "writes", "--start", "-f", "/dev/null",
                             "-o", "format-version=2", "-o", "add-tables=public.bench_w2j"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        return pgbench("bench_w2j", clients)
    finally:
        recv.terminate()
        recv.wait(30)
        time.sleep(0.2)
        sql("SELECT pg_drop_replication_slot('writes')")


# ---- rounds --------------------------------------------------------------------------
results = []  # (round, system, metric, value)


def note(rnd, system, metric, value):
    results.append((rnd, system, metric, value))
    log(f"round {rnd} {system:9} {metric:22} {value:,.2f}")


systems = ["epidemic", "pgq", "wal2json", "floor"]
for rnd in range(1, rounds + 1):
    order = systems[rnd - 1:] + systems[:rnd - 1]
    for system in order:
        if system == "epidemic":
            r = epidemic_bench()
            note(rnd, system, "p50", r["latency_ms_p50"])
            note(rnd, system, "p99", r["latency_ms_p99"])
            note(rnd, system, "drain", r["drain_pruned_per_s"])
        elif system == "pgq":
            p50, p99 = latency_pgq()
            note(rnd, system, "p50", p50)
            note(rnd, system, "p99", p99)
            note(rnd, system, "drain", drain_pgq())
        elif system == "wal2json":
            p50, p99 = latency_wal2json()
            note(rnd, system, "p50", p50)
            note(rnd, system, "p99", p99)
            note(rnd, system, "drain", drain_wal2json())
        else:
            p50, p99 = latency_notify()
            note(rnd, system, "p50", p50)
            note(rnd, system, "p99", p99)
            keyset, copy = drain_floors()
            note(rnd, system, "drain", keyset)
            note(rnd, system, "drain_copy", copy)
    for clients in (8, 32):
        plain = pgbench("bench_plain", clients)
        note(rnd, "unwatched", f"tps_{clients}", plain)
        runs = {"epidemic": writes_epidemic, "pgq": writes_pgq, "wal2json": writes_wal2json}
        for system in order:
            if system in runs:
                note(rnd, system, f"ratio_{clients}", runs[system](clients) / plain)
        sql("TRUNCATE bench_plain")

pgqd.terminate()
pgqd.wait(30)


def med(system, metric):
    v = [x for _, s, m, x in results if s == system and m == metric]
    return statistics.median(v) if v else float("nan")


def cell(system):
    return {
        "lat": f"{med(system, 'p50'):.2f} / {med(system, 'p99'):.2f} ms",
        "drain": f"{med(system, 'drain') / 1000:,.0f}k/s",
        "r8": f"{med(system, 'ratio_8'):.2f}",
        "r32": f"{med(system, 'ratio_32'):.2f}",
    }


e, q, w = cell("epidemic"), cell("pgq"), cell("wal2json")
floor_lat = f"NOTIFY {med('floor', 'p50'):.2f} / {med('floor', 'p99'):.2f} ms"
floor_drain = (f"keyset SELECT {med('floor', 'drain') / 1000:,.0f}k/s, "
               f"COPY {med('floor', 'drain_copy') / 1000:,.0f}k/s")
print(f"\nmedians of {rounds} interleaved rounds; backlog {backlog:,}; pgbench runs of {seconds} s\n")
print("| PostgreSQL | Epidemic | PgQ (10 ms tick) | logical decoding (wal2json) | floor |")
print("|---|---|---|---|---|")
print(f"| latency p50 / p99 at 1,000 changes/s | {e['lat']} | {q['lat']} | {w['lat']} | {floor_lat} |")
print(f"| drain of a backlog of {backlog:,} | {e['drain']} (pruned) | {q['drain']} | "
      f"{w['drain']} server side | {floor_drain} |")
print(f"| write ratio, 8 writers, reader keeping up | {e['r8']} | {q['r8']} | {w['r8']} | 1.0 |")
print(f"| write ratio, 32 writers | {e['r32']} | {q['r32']} | {w['r32']} | 1.0 |")
print(f"\nunwatched pgbench: {med('unwatched', 'tps_8'):,.0f} tps at 8 writers, "
      f"{med('unwatched', 'tps_32'):,.0f} at 32")
with open(f"{work}/results.json", "w") as f:
    json.dump(results, f)
print(f"every round's figures: {work}/results.json")
PY
