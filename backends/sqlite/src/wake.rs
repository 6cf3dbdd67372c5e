//! Wake-ups for the SQLite reader without a busy poll.
//!
//! A commit by another process writes the database file, its `-wal` or its `-journal`.
//! The waker watches the directory for those writes (inotify via `notify`) and confirms
//! each one with `PRAGMA data_version`, which changes only when another connection
//! committed, so the daemon's own cursor updates do not wake it. Without file events
//! (network file systems, a failed watch) it falls back to checking `data_version` every
//! `fallback` interval.
//!
//! A write to the WAL comes *before* the commit is visible: the writer then syncs and
//! publishes the commit in the shared-memory index, which makes no file event. So after
//! an event that `data_version` does not confirm, the waker checks it again every
//! [`HOT_POLL`] for [`HOT_WINDOW`] — but only if another connection holds the write lock
//! then. A writer holds the lock from before its first WAL write until its commit is
//! visible, so a free lock means the write behind the event has committed (and
//! `data_version`, checked after, shows it) or rolled back, or was one of this
//! connection's own commits (its acks). Those own writes made every wake-up poll for
//! 100 ms for nothing: ~16 % of a core at a few hundred changes a second. A later write
//! by another connection makes an event of its own, after the lock was found free.

use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::BackendError;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rusqlite::Connection;

use crate::conn::{is_busy, LockWait};
use crate::error::sql_err;

/// How often `data_version` is checked while a commit is likely in progress.
const HOT_POLL: Duration = Duration::from_micros(500);
/// How long after a file event a commit is considered likely in progress (longer than
/// a slow fsync).
const HOT_WINDOW: Duration = Duration::from_millis(100);

pub(crate) struct SqliteWaker {
    events: Option<Receiver<()>>,
    // Kept alive for as long as the waker: dropping it stops the watch.
    _watcher: Option<RecommendedWatcher>,
    fallback: Duration,
    last_version: Option<i64>,
}

impl SqliteWaker {
    pub fn new(db: &Path, fallback: Duration) -> Self {
        let (events, watcher) = match watch(db) {
            Some((rx, w)) => (Some(rx), Some(w)),
            None => (None, None),
        };
        SqliteWaker {
            events,
            _watcher: watcher,
            fallback: fallback.max(Duration::from_millis(1)),
            last_version: None,
        }
    }

    /// Block until another connection committed, or `timeout` passed: a commit in
    /// progress is seen within half a millisecond of becoming visible, and an idle
    /// database costs nothing (see the module docs).
    ///
    /// `retry` is called first and then again after the interval it returns (`None`: not
    /// again): the reader's acks kept while a writer held the lock are tried in between.
    pub fn wait(
        &mut self,
        conn: &Connection,
        lock: &LockWait,
        timeout: Duration,
        mut retry: impl FnMut() -> Result<Option<Duration>, BackendError>,
    ) -> Result<bool, BackendError> {
        let deadline = Instant::now() + timeout;
        let mut hot_until: Option<Instant> = None;
        let mut retry_at = Some(Instant::now());
        loop {
            if retry_at.is_some_and(|t| Instant::now() >= t) {
                retry_at = retry()?.map(|d| Instant::now() + d);
            }
            let version: i64 = conn
                .prepare_cached("PRAGMA data_version")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(sql_err)?;
            match self.last_version.replace(version) {
                Some(v) if v != version => return Ok(true),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let hot = hot_until.is_some_and(|t| now < t);
            let mut step = (deadline - now).min(if hot { HOT_POLL } else { self.fallback });
            if let Some(t) = retry_at {
                step = step.min(t.saturating_duration_since(now));
            }
            match &self.events {
                Some(rx) => match rx.recv_timeout(step) {
                    Ok(()) => {
                        while rx.try_recv().is_ok() {}
                        if hot || writer_active(conn, lock)? {
                            hot_until = Some(Instant::now() + HOT_WINDOW);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.events = None,
                },
                None => std::thread::sleep(step),
            }
        }
    }
}

/// Whether another connection holds the write lock: a write transaction is begun
/// without waiting, and rolled back at once when it could be (it writes nothing).
fn writer_active(conn: &Connection, lock: &LockWait) -> Result<bool, BackendError> {
    let begin = || conn.prepare_cached("BEGIN IMMEDIATE")?.execute([]);
    match lock.without_waiting(begin) {
        Ok(_) => {
            conn.prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]))
                .map_err(sql_err)?;
            Ok(false)
        }
        Err(e) if is_busy(&e) => Ok(true),
        Err(e) => Err(sql_err(e)),
    }
}

fn watch(db: &Path) -> Option<(Receiver<()>, RecommendedWatcher)> {
    let db = std::path::absolute(db).ok()?;
    let dir = db.parent()?.to_owned();
    let name = db.file_name()?.to_owned();
    let names: Vec<OsString> = ["", "-wal", "-journal"]
        .iter()
        .map(|suffix| {
            let mut n = name.clone();
            n.push(suffix);
            n
        })
        .collect();
    let (tx, rx) = channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|f| names.iter().any(|n| n == f)))
        {
            let _ = tx.send(());
        }
    })
    .ok()?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).ok()?;
    Some((rx, watcher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::connect;
    use crate::options::SqliteOptions;

    /// A WAL database in a directory of its own (the waker watches the directory).
    fn database(name: &str) -> (std::path::PathBuf, Connection) {
        let dir = std::env::temp_dir().join(format!(
            "epidemic-sqlite-wake-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db");
        let app = Connection::open(&path).unwrap();
        app.pragma_update(None, "journal_mode", "WAL").unwrap();
        app.execute_batch("CREATE TABLE t (x)").unwrap();
        (dir, app)
    }

    #[test]
    fn the_lock_probe_sees_another_connections_write_transaction() {
        let (dir, app) = database("probe");
        let (conn, lock) = connect(&dir.join("db"), &SqliteOptions::default()).unwrap();
        assert!(!writer_active(&conn, &lock).unwrap());
        app.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(writer_active(&conn, &lock).unwrap());
        app.execute_batch("INSERT INTO t VALUES (1); COMMIT")
            .unwrap();
        assert!(!writer_active(&conn, &lock).unwrap());
        // The probe left no transaction open: the application writes again at once.
        app.busy_timeout(Duration::ZERO).unwrap();
        app.execute_batch("INSERT INTO t VALUES (2)").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Own commits do not wake the waiter; another connection's commit does, through its
    /// file event (the fallback poll is ten minutes), also right after an own commit.
    #[test]
    fn another_connections_commit_wakes_the_waiter_and_its_own_do_not() {
        let (dir, app) = database("wake");
        let options = SqliteOptions::default();
        let (conn, lock) = connect(&dir.join("db"), &options).unwrap();
        let mut waker = SqliteWaker::new(&dir.join("db"), Duration::from_secs(600));
        let wait = |waker: &mut SqliteWaker, timeout| {
            waker.wait(&conn, &lock, timeout, || Ok(None)).unwrap()
        };
        assert!(!wait(&mut waker, Duration::from_millis(1)));
        for round in 0..3 {
            conn.execute_batch("INSERT INTO t VALUES (0)").unwrap();
            assert!(
                !wait(&mut waker, Duration::from_millis(50)),
                "woken by its own commit in round {round}"
            );
            let writer = std::thread::spawn({
                let path = dir.join("db");
                move || {
                    let app = Connection::open(path).unwrap();
                    app.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT")
                        .unwrap();
                }
            });
            assert!(
                wait(&mut waker, Duration::from_secs(30)),
                "another connection's commit did not wake the waiter in round {round}"
            );
            writer.join().unwrap();
        }
        drop(app);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
