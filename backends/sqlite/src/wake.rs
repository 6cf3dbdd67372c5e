//! Wake-ups for the SQLite reader without a busy poll.
//!
//! A commit by another process writes the database file, its `-wal` or its `-journal`.
//! The waker watches the directory for those writes (inotify via `notify`) and confirms
//! each one with `PRAGMA data_version`, which changes only when another connection
//! committed, so the daemon's own cursor updates do not wake it. Without file events
//! (network file systems, a failed watch) it falls back to checking `data_version` every
//! `fallback` interval.

use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use epidemic_plugin_sdk::backend::BackendError;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rusqlite::Connection;

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

    /// Block until another connection committed, or `timeout` passed.
    ///
    /// A write to the WAL comes *before* the commit is visible: the writer then syncs
    /// and publishes the commit in the shared-memory index, which makes no file event.
    /// So after an event that `data_version` does not confirm yet, the waker checks
    /// again every [`HOT_POLL`] for [`HOT_WINDOW`]: a commit in progress is seen within
    /// half a millisecond of becoming visible, and an idle database costs nothing.
    ///
    /// `retry` is called first and then again after the interval it returns (`None`: not
    /// again): the reader's acks kept while a writer held the lock are tried in between.
    pub fn wait(
        &mut self,
        conn: &Connection,
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
                        hot_until = Some(Instant::now() + HOT_WINDOW);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.events = None,
                },
                None => std::thread::sleep(step),
            }
        }
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
