#!/usr/bin/env bash
# Quickstart: build Epidemic, then watch a SQLite `mail_users` table with the maildir
# plugin and show what happens on disk when rows are inserted, updated and deleted.
# Everything lives in ./quickstart/ (removed and recreated on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v sqlite3 >/dev/null 2>&1; then
    echo "==> installing the sqlite3 command-line tool"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq sqlite3 >/dev/null
fi

echo "==> building (cargo build --workspace)"
cargo build --workspace --quiet
bin="$root/target/debug/epidemic"

demo="$root/quickstart"
rm -rf "$demo" && mkdir -p "$demo/maildirs"
cd "$demo"
sqlite3 mail.db <<'SQL'
PRAGMA journal_mode = WAL;
CREATE TABLE mail_users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    quota_bytes INTEGER,
    last_login TEXT
);
SQL
cat > epidemic.toml <<TOML
[database]
url = "sqlite://mail.db"

[daemon]
name = "mx1"

[[handler]]
name = "maildir"
plugin = "maildir"              # libepidemic_maildir.so, next to the epidemic binary
[handler.config]
table = "mail_users"
base_dir = "$demo/maildirs"
TOML

echo "==> the SQL 'epidemic install' will run (epidemic sql):"
"$bin" sql | sed -n '1,40s/^/    /p'   # the first 40 lines (sed reads all: no broken pipe)
echo "    ..."

echo "==> starting the daemon (epidemic run)"
"$bin" run 2> daemon.log &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "epidemic started" daemon.log && break; sleep 0.1; done

show() {
    sleep 0.3  # only so the demo prints after the daemon acted; tests wait on events
    echo "    maildirs/:"
    (cd maildirs && find . -mindepth 1 | sort | sed 's/^/      /')
    for f in $(cd maildirs && find . -name maildirsize | sort); do
        echo "      $f: $(head -n 1 "maildirs/$f")"
    done
}

echo "==> INSERT ann@example.org with a 1 GB quota, bob (no domain) without quota"
sqlite3 mail.db "INSERT INTO mail_users (username, quota_bytes) VALUES ('ann@example.org', 1000000000), ('bob', NULL);"
show
echo "==> UPDATE ann's quota to 2 GB, and a column no handler watches (last_login)"
sqlite3 mail.db "UPDATE mail_users SET quota_bytes = 2000000000 WHERE username = 'ann@example.org'; UPDATE mail_users SET last_login = datetime('now');"
show
echo "==> UPDATE bob's username to bob@example.net (the directory moves)"
sqlite3 mail.db "UPDATE mail_users SET username = 'bob@example.net' WHERE username = 'bob';"
show
echo "==> DELETE ann"
sqlite3 mail.db "DELETE FROM mail_users WHERE username = 'ann@example.org';"
show

echo "==> stopping the daemon (SIGTERM)"
kill -TERM $pid
wait $pid
trap - EXIT
echo "==> daemon log:"
sed 's/^/    /' daemon.log
echo
echo "Done. Try it yourself: cd quickstart && $bin run, then change mail_users with sqlite3 mail.db."
