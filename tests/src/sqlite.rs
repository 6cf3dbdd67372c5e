//! SQLite helpers: a database file in a temp dir and a writer connection, which stands in
//! for the application that owns the database (a separate process from the daemon).

use std::path::{Path, PathBuf};
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
