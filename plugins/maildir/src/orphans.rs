//! Orphans: Maildirs on disk that no row of the table backs any more (users deleted or
//! renamed while this host was away, a disk restored from an old backup), found at the
//! end of a snapshot of the table and kept, archived or removed (`orphans`).
//!
//! Between [`SnapshotEvent::Began`] and [`SnapshotEvent::Ended`] every row of the table
//! reaches the handler once, as a snapshot row or through a live change. [`Backing`]
//! follows the rows by key through those changes and remembers which Maildir each one's
//! username names, so at the end the Maildirs on disk that none names are the orphans.
//! Following rows by key rather than counting names keeps it exact when a change comes
//! twice (at-least-once delivery, a chunk read again) and when two rows share a username.
//!
//! It errs on the side of keeping mail:
//! - only an `Ended` with `whole`, of a snapshot whose `Began` this instance saw with
//!   `resumed: false`, checks anything; a snapshot that never ends checks nothing;
//! - a snapshot row or a live INSERT or UPDATE backs its Maildir whether or not handling
//!   it succeeded (the row exists), and the old Maildir of a change that failed stays
//!   backed (its mail is still there, and a retry from the dead letters needs it);
//! - a Maildir that changed after the snapshot began (mail delivered, a client reading,
//!   a Maildir made by the mail server for a user whose INSERT has not reached this
//!   handler yet) is kept and reported, for the next check to decide;
//! - [`MaildirTree`] checks each orphan again right before it is moved or removed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use epidemic_plugin_sdk::{Change, Level, Logger, Op, SnapshotEvent, Value};

use crate::config::Orphans;
use crate::error::MaildirError;
use crate::mailbox::Mailbox;
use crate::tree::MaildirTree;

/// The log target of the orphan check's lines.
const TARGET: &str = "epidemic_maildir::orphans";

/// The orphan check of one handler: where the snapshot of its table stands, and what to
/// do at its end.
pub struct OrphanCheck {
    table: String,
    mode: Orphans,
    /// The `[[handler]]` entry's name, for the `epidemic backfill` hint.
    handler: String,
    logger: Logger,
    snapshot: Snapshot,
}

enum Snapshot {
    /// No snapshot of the table is under way.
    None,
    /// One began in this instance: every row comes.
    Whole(Backing),
    /// One began before the daemon restarted: this instance misses its first rows.
    Resumed,
}

impl OrphanCheck {
    pub fn new(table: &str, mode: Orphans, handler: &str, logger: Logger) -> OrphanCheck {
        OrphanCheck {
            table: table.to_owned(),
            mode,
            handler: handler.to_owned(),
            logger,
            snapshot: Snapshot::None,
        }
    }

    /// Whether changes are followed now (a whole snapshot is under way).
    pub fn tracking(&self) -> bool {
        matches!(self.snapshot, Snapshot::Whole(_))
    }

    /// A change of the table was handled (`handled`: successfully); `old` and `new` are
    /// the Maildirs its old and new usernames name, where they are valid.
    pub fn observe(
        &mut self,
        change: &Change,
        old: Option<&Mailbox>,
        new: Option<&Mailbox>,
        handled: bool,
    ) {
        if let Snapshot::Whole(backing) = &mut self.snapshot {
            backing.observe(change, old, new, handled);
        }
    }

    /// A snapshot begins or ends. Errors are about `base_dir` as a whole (missing,
    /// unreadable); one orphan that cannot be moved is logged and the others go on.
    pub fn on_event(
        &mut self,
        event: &SnapshotEvent,
        tree: &MaildirTree,
    ) -> Result<(), MaildirError> {
        match event {
            SnapshotEvent::Began { table, .. } | SnapshotEvent::Ended { table, .. }
                if *table != self.table =>
            {
                self.log(
                    Level::DEBUG,
                    "a snapshot of another table: not this handler's",
                    &[("table", table.clone())],
                );
                Ok(())
            }
            SnapshotEvent::Began { resumed, .. } => {
                if !matches!(self.snapshot, Snapshot::None) {
                    self.log(
                        Level::INFO,
                        "a snapshot begins before the last one ended: the orphan check starts over",
                        &[("table", self.table.clone())],
                    );
                }
                self.snapshot = if *resumed {
                    Snapshot::Resumed
                } else {
                    Snapshot::Whole(Backing::new(SystemTime::now()))
                };
                Ok(())
            }
            SnapshotEvent::Ended { rows, whole, .. } => {
                let snapshot = std::mem::replace(&mut self.snapshot, Snapshot::None);
                match snapshot {
                    Snapshot::Whole(backing) if *whole => self.check(backing, *rows, tree),
                    snapshot => {
                        let why = if !*whole || matches!(snapshot, Snapshot::Resumed) {
                            "the snapshot resumed after a restart, so this instance did not see every row"
                        } else {
                            "this instance did not see the snapshot begin"
                        };
                        self.log(
                            Level::WARN,
                            &format!(
                                "orphan check skipped: {why}; run `epidemic backfill --handler {}` for a whole snapshot",
                                self.handler
                            ),
                            &[("table", self.table.clone())],
                        );
                        Ok(())
                    }
                }
            }
        }
    }

    /// The end of a whole snapshot: find the Maildirs no row backs and deal with them.
    fn check(&self, backing: Backing, rows: u64, tree: &MaildirTree) -> Result<(), MaildirError> {
        let backed = backing.backed();
        let is_backed = |rel: &Path| backed.contains(rel);
        let mut maildirs = 0u64;
        let mut orphans = Vec::new();
        let unreadable = tree.scan_maildirs(|rel| {
            maildirs += 1;
            if !is_backed(rel) {
                orphans.push(rel.to_owned());
            }
        })?;
        for e in &unreadable {
            self.log(
                Level::WARN,
                "orphan check: a directory cannot be read, its Maildirs are not checked",
                &[("error", e.to_string())],
            );
        }

        let mode = self.mode.as_str();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let tag = format!("orphan-{unix}");
        let (mut acted, mut changed, mut failed) = (0u64, 0u64, 0u64);
        for rel in &orphans {
            let path = tree.base_dir().join(rel).display().to_string();
            match tree.last_modified(rel) {
                Ok(t) if t > backing.began_at => {
                    changed += 1;
                    self.log(
                        Level::WARN,
                        "Maildir that no row backs changed during the snapshot: kept, for the next check",
                        &[("path", path), ("mode", mode.to_owned())],
                    );
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    failed += 1;
                    self.log(
                        Level::WARN,
                        "orphan Maildir: no row backs it; left alone",
                        &[("path", path), ("error", e.to_string())],
                    );
                    continue;
                }
            }
            let (message, mut fields) = match self.mode {
                Orphans::Keep => {
                    acted += 1;
                    (
                        "orphan Maildir: no row backs it; kept",
                        vec![("path", path)],
                    )
                }
                Orphans::Archive => match tree.archive_orphan(rel, &tag, is_backed) {
                    Ok(Some(to)) => {
                        acted += 1;
                        (
                            "orphan Maildir: no row backs it; archived",
                            vec![("path", path), ("to", to.display().to_string())],
                        )
                    }
                    Ok(None) => (
                        "orphan Maildir: gone before it was archived",
                        vec![("path", path)],
                    ),
                    Err(e) => {
                        failed += 1;
                        (
                            "orphan Maildir: no row backs it; could not be archived",
                            vec![("path", path), ("error", e.to_string())],
                        )
                    }
                },
                Orphans::Remove => match tree.remove_orphan(rel, is_backed) {
                    Ok(()) => {
                        acted += 1;
                        (
                            "orphan Maildir: no row backs it; removed",
                            vec![("path", path)],
                        )
                    }
                    Err(e) => {
                        failed += 1;
                        (
                            "orphan Maildir: no row backs it; could not be removed",
                            vec![("path", path), ("error", e.to_string())],
                        )
                    }
                },
            };
            fields.push(("mode", mode.to_owned()));
            self.log(Level::WARN, message, &fields);
        }

        let done = match self.mode {
            Orphans::Keep => "kept",
            Orphans::Archive => "archived",
            Orphans::Remove => "removed",
        };
        let level = if orphans.is_empty() && unreadable.is_empty() {
            Level::INFO
        } else {
            Level::WARN
        };
        self.log(
            level,
            &format!(
                "orphan check done: {} orphan Maildir(s) of {maildirs} on disk, orphans = \"{mode}\"",
                orphans.len()
            ),
            &[
                ("table", self.table.clone()),
                ("rows", rows.to_string()),
                ("maildirs", maildirs.to_string()),
                ("orphans", orphans.len().to_string()),
                ("mode", mode.to_owned()),
                (done, acted.to_string()),
                ("changed_during_snapshot", changed.to_string()),
                ("failed", failed.to_string()),
                ("unreadable_dirs", unreadable.len().to_string()),
            ],
        );
        Ok(())
    }

    fn log(&self, level: Level, message: &str, fields: &[(&str, String)]) {
        self.logger.log_with(level, TARGET, message, fields);
    }
}

/// Which Maildirs the rows seen since a snapshot began name.
struct Backing {
    began_at: SystemTime,
    /// Each row, by key, and its Maildir relative to `base_dir`.
    rows: HashMap<RowRef, PathBuf>,
    /// Maildirs a change failed on: never orphans in this check.
    held: HashSet<PathBuf>,
}

/// A row of the table. Backends always fill in the key during a backfill; a change
/// without one (a hand-made test change) is known by its username instead.
#[derive(Debug, PartialEq, Eq, Hash)]
enum RowRef {
    /// The key's values as text (`Value` has floats, so it cannot be hashed itself).
    Key(String),
    Username(PathBuf),
}

fn row_ref(key: &[Value], mailbox: Option<&Mailbox>) -> Option<RowRef> {
    if key.is_empty() {
        mailbox.map(|m| RowRef::Username(m.relative_dir()))
    } else {
        Some(RowRef::Key(format!("{key:?}")))
    }
}

impl Backing {
    fn new(began_at: SystemTime) -> Backing {
        Backing {
            began_at,
            rows: HashMap::new(),
            held: HashSet::new(),
        }
    }

    fn observe(
        &mut self,
        change: &Change,
        old: Option<&Mailbox>,
        new: Option<&Mailbox>,
        handled: bool,
    ) {
        match change.op {
            Op::Insert => self.set(row_ref(&change.key, new), new),
            Op::Update => {
                let old_ref = match &change.old_key {
                    Some(old_key) => row_ref(old_key, old),
                    None if change.key.is_empty() => row_ref(&[], old),
                    // The same key: the new username replaces the old one below.
                    None => None,
                };
                if let Some(r) = old_ref {
                    self.rows.remove(&r);
                }
                self.set(row_ref(&change.key, new), new);
            }
            Op::Delete => {
                if let Some(r) = row_ref(&change.key, old) {
                    self.rows.remove(&r);
                }
            }
        }
        if !handled {
            if let Some(old) = old {
                self.held.insert(old.relative_dir());
            }
        }
    }

    /// The row now names `mailbox` (or, with none, no valid username: no Maildir).
    fn set(&mut self, row: Option<RowRef>, mailbox: Option<&Mailbox>) {
        match (row, mailbox) {
            (Some(row), Some(m)) => {
                self.rows.insert(row, m.relative_dir());
            }
            (Some(row), None) => {
                self.rows.remove(&row);
            }
            (None, _) => {}
        }
    }

    /// Every Maildir a row names or a failed change holds, relative to `base_dir`.
    fn backed(&self) -> HashSet<&Path> {
        self.rows
            .values()
            .chain(&self.held)
            .map(PathBuf::as_path)
            .collect()
    }
}
