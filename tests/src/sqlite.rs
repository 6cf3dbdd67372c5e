//! SQLite helpers: a database file in a temp dir and a writer connection, which stands in
//! for the application that owns the database (a separate process from the daemon).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rusqlite::Connection;

/// Create `dir/NAME.db` in WAL mode with `schema` applied; returns its path.
pub fn create_db(dir: &Path, name: &str, schema: &str) -> PathBuf {
    let path = dir.join(format!("{name}.db"));
    let conn = Connection::open(&path).expect("create sqlite db");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.execute_batch(schema).expect("apply schema");
    path
}

/// A writer connection that waits for locks instead of failing.
pub fn connect(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open sqlite db");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    conn
}

/// The database's schema objects (type, name), minus SQLite's internal ones; what
/// `uninstall` must restore exactly.
pub fn objects(path: &Path) -> Vec<(String, String, String)> {
    let conn = connect(path);
    let mut stmt = conn
        .prepare("SELECT type, name, COALESCE(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// `sqlite://` URL for a path.
pub fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Run `sql` in the `sqlite3` tool, a process of its own, waiting for locks and stopping
/// at the first error; returns its output (`|`-separated). Use it, not [`connect`], on a
/// file a backend library loaded into this test process has open: two copies of SQLite in
/// one process break each other's POSIX locks (closing one's file descriptor drops the
/// other's locks), which can delete a WAL from under an open connection.
pub fn sqlite3(path: &Path, sql: &str) -> String {
    let mut child = Command::new("sqlite3")
        .args(["-bail", "-batch", "-cmd", ".timeout 30000"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sqlite3 (Debian package sqlite3; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(sql.as_bytes())
        .expect("write to sqlite3");
    let out = child.wait_with_output().expect("sqlite3");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
