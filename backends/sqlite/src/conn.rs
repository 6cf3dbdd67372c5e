//! Opening a connection and the session settings every Epidemic connection uses.
//!
//! Every connection uses a private cache with `read_uncommitted` off: only a shared cache
//! can show a connection another's uncommitted rows (and `?cache=shared` is refused in
//! `options`), so every read sees committed data only. In WAL mode the connection also
//! commits without an fsync and never checkpoints on commit (reasons below): it writes
//! only Epidemic's bookkeeping, never the user's tables or the log.
//!
//! Lock waits: every connection waits for a lock with its own busy handler
//! ([`LockWait`]), which retries after tens to hundreds of microseconds instead of
//! SQLite's default 1, 2, 5 … 100 ms. In WAL mode a writer holds the write lock through
//! its commit's fsync (a millisecond or less) and takes it back microseconds after; an ack
//! waiting in the default handler slept far past each release and then found the lock
//! taken again, and at 1,000 changes/s the reader fell up to a second behind. The handler
//! can also be told not to wait at all ([`LockWait::without_waiting`]): the reader's acks
//! are tried that way and kept while the lock is held (see `reader`), so they rarely
//! wait at all.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::BackendError;
use rusqlite::{Connection, OpenFlags};

use crate::error::sql_err;
use crate::options::SqliteOptions;

/// Now, by SQLite's clock, in microseconds since the Unix epoch. All of a database's
/// daemons run on the host that has the file, so they share this clock: leases,
/// `last_seen` and eviction use it.
pub(crate) const NOW_US: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

/// The first retry's sleep of [`LockWait`]'s busy handler; each retry doubles it up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_micros(20);
/// The longest sleep between two attempts to take a lock held for a moment (a writer's
/// commit).
const RETRY_MAX: Duration = Duration::from_micros(500);
/// The longest sleep between two attempts to take a lock held for long (an
/// application's long transaction): attempts slow down to a sixteenth of the time
/// waited so far, up to this, so a wait of seconds costs a few hundred attempts and
/// notices the release at most ~6 % late.
const RETRY_MAX_LONG: Duration = Duration::from_millis(10);

/// How a connection waits for a lock another connection holds: retries after short,
/// growing sleeps for up to `busy_timeout_ms`, or not at all inside
/// [`LockWait::without_waiting`].
#[derive(Clone)]
pub(crate) struct LockWait {
    timeout: Duration,
    no_wait: Arc<AtomicBool>,
}

impl LockWait {
    /// Install this handler on `conn` (replacing any other busy handler).
    pub fn install(&self, conn: &mut Connection) -> Result<(), BackendError> {
        let timeout = self.timeout;
        let no_wait = Arc::clone(&self.no_wait);
        let mut started = Instant::now();
        conn.busy_handler(Some(move |count: i32| -> bool {
            if no_wait.load(Ordering::Relaxed) {
                return false;
            }
            if count == 0 {
                started = Instant::now();
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return false;
            }
            let sleep = RETRY_FIRST
                .saturating_mul(1 << count.clamp(0, 16))
                .min(RETRY_MAX.max(waited / 16).min(RETRY_MAX_LONG))
                .min(timeout - waited);
            std::thread::sleep(sleep);
            true
        }))
        .map_err(sql_err)
    }

    /// How long a statement waits for a held lock (`busy_timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run `f` with lock waits off: a statement that finds the lock held fails at once
    /// with SQLITE_BUSY.
    pub fn without_waiting<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore<'a>(&'a AtomicBool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.no_wait.store(true, Ordering::Relaxed);
        let _restore = Restore(&self.no_wait);
        f()
    }
}

/// Whether `e` is a lock another connection holds (SQLITE_BUSY), as opposed to a failure.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
}

pub(crate) fn connect(
    path: &Path,
    options: &SqliteOptions,
) -> Result<(Connection, LockWait), BackendError> {
    if !path.exists() {
        return Err(BackendError::Invalid(format!(
            "database file {} does not exist",
            path.display()
        )));
    }
    let mut conn = Connection::open_with_flags(
        path,
        // PRIVATE_CACHE even if the process enabled shared caches: only a shared
        // cache can show a connection uncommitted rows, so this and
        // `read_uncommitted = 0` below mean every read sees committed data only.
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE,
    )
    .map_err(|e| BackendError::Connection(format!("cannot open {}: {e}", path.display())))?;
    conn.pragma_update(None, "read_uncommitted", 0)
        .map_err(sql_err)?;
    let lock_wait = LockWait {
        timeout: Duration::from_millis(options.busy_timeout_ms),
        no_wait: Arc::new(AtomicBool::new(false)),
    };
    lock_wait.install(&mut conn)?;
    // This connection writes only Epidemic's bookkeeping: cursors, heartbeats, dead
    // letters, pruning. In WAL mode `synchronous = NORMAL` skips the fsync per commit
    // (a reader acks after every batch; each fsync held SQLite's one write lock for
    // milliseconds, delaying writers and the reader's next read). What a power loss
    // can cost is the newest bookkeeping commits, in order: an ack lost means a change
    // is delivered again, never that one is lost. Writers' own commits, which fill
    // the log through the triggers, keep their connection's setting. In
    // rollback-journal mode NORMAL risks corruption on power loss: left as it is.
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(sql_err)?;
    if journal.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql_err)?;
        // A commit that finds the WAL over its limit checkpoints it, fsyncs
        // included, in the committing connection. A reader acks often, so it did most
        // checkpoints and every one delayed its next read by tens of milliseconds.
        // Epidemic's connections never checkpoint on commit; `prune`, off the
        // delivery path, runs a passive checkpoint instead (and the application's
        // own commits still checkpoint as usual).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sql_err)?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok((conn, lock_wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::database_path;

    #[test]
    fn connections_never_read_uncommitted_rows() {
        let err = database_path("sqlite:///var/x.db?mode=rw&cache=shared")
            .expect_err("a shared cache must be refused");
        assert!(err.to_string().contains("cache=shared"), "{err}");
        let path = std::env::temp_dir().join(format!(
            "epidemic-sqlite-unit-{}-private-cache.db",
            std::process::id()
        ));
        Connection::open(&path).unwrap();
        let (conn, _) = connect(&path, &SqliteOptions::default()).unwrap();
        let read_uncommitted: i64 = conn
            .query_row("PRAGMA read_uncommitted", [], |r| r.get(0))
            .unwrap();
        assert_eq!(read_uncommitted, 0);
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }
}
