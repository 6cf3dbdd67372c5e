#!/usr/bin/env python3
"""What capture and a reader cost, as CPU per written row, on one throwaway PostgreSQL 15.

Write throughput on a shared two-core machine scatters by +-0.1 from run to run; the CPU
the server spent per written row is steadier, and it adds up: the server's processes
(the postmaster, its background processes, and every backend, counted when it exits) are
all children of the postmaster, so their user + system time over a run, divided by the
rows written, is what each row cost the server. The reader's own share (the daemon's
connections) and the daemon process's are counted apart.

Each run: `pgbench` inserting one row per transaction (WRITERS connections, ROWS rows in
all) into
  plain     a table nobody watches,
  watched   the watched table, nobody reading,
  reader:X  the watched table with `epidemic run` reading it (a recorder handler writing
            to /dev/null), the backend options changed by X (`default`, or KEY=VALUE
            pairs joined by `+`, e.g. `linger_ms=0` or `linger_ms=5+notify=off`).
Rounds alternate the order of the runs; the summary holds medians, and the write ratio
is over `plain` in the same round.

Usage: scripts/bench-server-cpu.py [--rounds R] [--rows N] [--writers 8,32]
                                   [--reader X ...]
  defaults: 3 rounds, 16000 rows, 8 writers, readers `default` and `linger_ms=0`.
Not part of the suite: run as root (the server runs as the `postgres` user).
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_BIN = "/usr/lib/postgresql/15/bin"
HZ = os.sysconf("SC_CLK_TCK")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=16000)
    p.add_argument("--writers", default="8")
    p.add_argument("--reader", action="append", default=None)
    a = p.parse_args()
    a.writers = [int(w) for w in a.writers.split(",")]
    a.reader = a.reader or ["default", "linger_ms=0"]
    for r in a.reader:
        if r != "default" and not all("=" in kv for kv in r.split("+")):
            p.error(f"--reader {r!r}: `default` or KEY=VALUE pairs joined by `+`")
    return a


def ticks(pid, fields):
    """The given fields of /proc/PID/stat (after the command), summed; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(rest[i]) for i in fields)


def children(ppid):
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        yield int(p)
            except OSError:
                pass


def server_cpu(postmaster):
    """Seconds of CPU: the postmaster, its exited children, its live children."""
    total = ticks(postmaster, range(11, 15))  # utime, stime, cutime, cstime
    total += sum(ticks(c, (11, 12)) for c in children(postmaster))
    return total / HZ


def process_cpu(pids):
    return sum(ticks(p, (11, 12)) for p in pids) / HZ


def main():
    a = parse_args()
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "epidemic",
         "-p", "epidemic-backend-postgres", "-p", "epidemic-recorder"],
        check=True, cwd=ROOT)
    binary = f"{ROOT}/target/release/epidemic"
    work = tempfile.mkdtemp(prefix="epidemic-server-cpu.")
    os.chmod(work, 0o755)
    os.makedirs(f"{work}/pg")
    subprocess.run(["chown", "postgres", f"{work}/pg"], check=True)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    def as_postgres(*cmd):
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True,
                       cwd=f"{work}/pg", stdout=subprocess.DEVNULL)

    def psql(sql):
        return subprocess.run(
            [f"{PG_BIN}/psql", "-qAtX", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
             "postgres", "-c", sql], check=True, capture_output=True, text=True).stdout

    as_postgres(f"{PG_BIN}/initdb", "-D", f"{work}/pg/data", "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--locale=C.UTF-8")
    # No checkpoint or autovacuum in the middle of a run: each run starts with a CHECKPOINT.
    as_postgres(f"{PG_BIN}/pg_ctl", "-D", f"{work}/pg/data", "-l", f"{work}/pg/server.log",
                "-w", "-o", f"-p {port} -k {work}/pg -c listen_addresses=127.0.0.1 "
                "-c max_connections=100 -c checkpoint_timeout=30min -c max_wal_size=8GB "
                "-c autovacuum=off", "start")
    try:
        with open(f"{work}/pg/data/postmaster.pid") as f:
            postmaster = int(f.readline())
        psql("CREATE TABLE plain (id bigserial PRIMARY KEY, payload text NOT NULL); "
             "CREATE TABLE watched (id bigserial PRIMARY KEY, payload text NOT NULL)")
        for t in ("plain", "watched"):
            with open(f"{work}/{t}.sql", "w") as f:
                f.write(f"INSERT INTO {t} (payload) VALUES ('payload');\n")
        config = f"{work}/epidemic.toml"
        with open(config, "w") as f:
            f.write(f'[database]\nurl = "postgres://postgres@127.0.0.1:{port}/postgres"\n'
                    f'[daemon]\nname = "bench"\nplugin_dir = "{ROOT}/target/release"\n'
                    '[[handler]]\nname = "sink"\nplugin = "recorder"\n[handler.config]\n'
                    'table = "watched"\ncolumns = ["id", "payload"]\nfile = "/dev/null"\n')
        subprocess.run([binary, "--config", config, "install"], check=True,
                       capture_output=True)
        runs = ["plain", "watched"] + [f"reader:{r}" for r in a.reader]
        results = {}
        for rnd in range(a.rounds):
            for writers in a.writers:
                order = runs if rnd % 2 == 0 else list(reversed(runs))
                for run in order:
                    daemon = None
                    if run.startswith("reader:"):
                        env = {**os.environ, "RUST_LOG": "warn"}
                        spec = run.split(":", 1)[1]
                        if spec != "default":
                            for kv in spec.split("+"):
                                k, v = kv.split("=", 1)
                                env[f"EPIDEMIC_DATABASE__{k.upper()}"] = v
                        daemon = subprocess.Popen([binary, "--config", config, "run"],
                                                  stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL, env=env)
                        time.sleep(2)  # started, caught up, waiting
                        if daemon.poll() is not None:
                            sys.exit(f"epidemic run ({run}) exited with {daemon.returncode}")
                    psql("CHECKPOINT")
                    ours = [int(p) for p in psql(
                        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                        "AND pid <> pg_backend_pid()").split()] if daemon else []
                    reader0 = process_cpu(ours)
                    daemon0 = process_cpu([daemon.pid]) if daemon else 0
                    server0 = server_cpu(postmaster)
                    table = "plain" if run == "plain" else "watched"
                    out = subprocess.run(
                        [f"{PG_BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(port),
                         "-U", "postgres", "-c", str(writers), "-j", "2",
                         "-t", str(a.rows // writers), "-f", f"{work}/{table}.sql", "postgres"],
                        check=True, capture_output=True, text=True).stdout
                    tps = float(next(l for l in out.splitlines() if l.startswith("tps")).split()[2])
                    reader1 = process_cpu(ours)
                    daemon1 = process_cpu([daemon.pid]) if daemon else 0
                    if daemon:
                        daemon.terminate()
                        daemon.wait()
                    time.sleep(0.3)  # the backends that ended are reaped
                    rows = a.rows // writers * writers
                    row = {
                        "server": (server_cpu(postmaster) - server0) / rows * 1e6,
                        "reader": (reader1 - reader0) / rows * 1e6,
                        "daemon": (daemon1 - daemon0) / rows * 1e6,
                        "tps": tps,
                    }
                    results.setdefault((writers, run), []).append(row)
                    print(f"round {rnd + 1}, {writers} writers, {run}: server {row['server']:.1f} "
                          f"us/row (reader's connections {row['reader']:.1f}), daemon "
                          f"{row['daemon']:.1f} us/row, {tps:.0f} rows/s", flush=True)
        print("\nmedians (us of CPU per written row; ratio: rows/s over plain's)")
        print("| writers | run | server | of it the reader's | daemon | write ratio |")
        print("|---|---|---|---|---|---|")
        for writers in a.writers:
            for run in runs:
                rows = results[(writers, run)]
                med = lambda k: statistics.median(r[k] for r in rows)
                ratio = statistics.median(
                    r["tps"] / p["tps"] for r, p in zip(rows, results[(writers, "plain")]))
                print(f"| {writers} | {run} | {med('server'):.1f} | {med('reader'):.1f} | "
                      f"{med('daemon'):.1f} | {ratio:.2f} |")
    finally:
        as_postgres(f"{PG_BIN}/pg_ctl", "-D", f"{work}/pg/data", "-m", "fast", "-w", "stop")


if __name__ == "__main__":
    main()
