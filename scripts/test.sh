#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the database servers the tests
# start (throwaway instances, in temp dirs, on free ports), builds every crate including
# the plugin libraries the tests load, then runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
# The NATS sink's tests start their own nats-server with JetStream (Debian starts none).
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null 2>&1 || need_apt+=(nats-server)
# The TLS tests of the sinks make a throwaway CA with the openssl tool.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# libfaketime runs a daemon with its clock a day ahead (the clock-skew scenario).
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need_apt+=(faketime)
# promtool checks and unit-tests the alert rules in docs/ (tests/monitoring.rs); the
# server it comes with is not needed, nor its recommended node exporter.
need_promtool=no
command -v promtool >/dev/null 2>&1 || need_promtool=yes
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # Debian starts the packaged servers; the tests start their own, so stop these.
    service mariadb stop >/dev/null 2>&1 || true
    service postgresql stop >/dev/null 2>&1 || true
    service nats-server stop >/dev/null 2>&1 || true
fi
if [ "$need_promtool" = yes ]; then
    echo "==> installing prometheus (for promtool)"
    export DEBIAN_FRONTEND=noninteractive
    [ ${#need_apt[@]} -gt 0 ] || apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    service prometheus stop >/dev/null 2>&1 || true
fi

# cargo-deb builds the Debian package that tests/package.rs installs with dpkg. Pinned to
# a minor version: packaging the debug build (--profile dev) is deprecated upstream.
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "==> installing cargo-deb (cargo install, about 2 minutes)"
    cargo install cargo-deb --version '~3.8' --locked --quiet
fi

# No incremental build: a run starts from a clean tree, and its caches would only take disk.
export CARGO_INCREMENTAL=0
echo "==> building the workspace (host, backends, plugins)"
cargo build --workspace --all-targets

echo "==> running the tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The README's other command, the SQLite quickstart, end to end (about 10 s).
echo "==> running the quickstart (scripts/quickstart.sh)"
if ./scripts/quickstart.sh >"$log.quickstart" 2>&1; then
    echo "quickstart: ok"
else
    echo "quickstart: FAILED; its output:"
    cat "$log.quickstart"
    status=1
    failed_quickstart=1
fi
rm -f "$log.quickstart"
set -e
# One closing line for the whole run (cargo ends with the last crate's doc tests).
passed=$(grep -oE 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')
failed=$((failed + ${failed_quickstart:-0}))
echo "summary: $passed passed, $failed failed"
exit "$status"
