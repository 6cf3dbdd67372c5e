//! `maildir`: the Epidemic handler plugin that keeps a tree of Maildirs in step with a
//! mail users table — Epidemic's original use case.
//!
//! A web front end or billing system writes rows; every mail server runs this handler and
//! creates, re-quotas, renames and removes the users' Maildirs on its own disk.
//!
//! | change | what happens on disk |
//! |---|---|
//! | INSERT | `base_dir/<domain>/<local>/` (for `local@domain`) or `base_dir/<username>/` (no `@`) with `cur`, `new`, `tmp`; a Maildir++ `maildirsize` whose first line is `<bytes>S` when the quota is not NULL |
//! | UPDATE of the quota | `maildirsize` is rewritten atomically (temporary file + rename), keeping its usage lines; a NULL quota removes it |
//! | UPDATE of the username | the Maildir is renamed (the new domain directory is created as needed, an emptied old one is removed) |
//! | DELETE | the Maildir is removed, or with `on_delete = "archive"` moved to `archive_dir/<domain>/<local>-<change id>` |
//! | snapshot row (a backfill) | as an INSERT: the Maildir is completed and its quota (re)written |
//! | end of a whole snapshot | every Maildir on disk that no row backs (an orphan) is logged, then kept, archived to `archive_dir/<domain>/<local>-orphan-<unix seconds>` or removed, as `orphans` says |
//!
//! Every step is idempotent, since delivery is at-least-once: a repeated INSERT completes
//! or leaves the Maildir; a rename whose source is gone and target exists is done; a
//! DELETE of a missing Maildir is done. An UPDATE whose old Maildir is missing creates the
//! new one. A domain directory left empty by a rename, removal or archive is removed.
//!
//! # Safety
//!
//! A username becomes a path only through [`Mailbox::parse`], which refuses anything that
//! could leave `base_dir`: empty names or parts, `.`/`..`, a leading dot, `/`, `\`, NUL and
//! other control characters, more than one `@`, parts longer than 200 bytes. Such a change,
//! and a NULL or non-text username, is a permanent error and nothing on disk is touched.
//! Symbolic links in place of a domain directory or Maildir are not followed. A directory
//! is renamed, removed or archived only if it has a `cur` directory or is empty, so a bare
//! username that equals a domain name cannot take a whole domain with it.
//!
//! # Orphans
//!
//! A host that was away (evicted after `consumer_ttl`, restored from a backup, new) is
//! brought up to the table by a snapshot (`epidemic backfill`, `start = "snapshot"`,
//! `on_evicted = "resync"`): every row arrives as a snapshot row or through a live change
//! between the snapshot's beginning and end. The handler follows the rows by key over
//! that time, and at the end every Maildir under `base_dir` that no row's username names
//! is an orphan. Each orphan gets a warning with its path, and one summary line gives
//! their number and the mode; then `orphans` decides: `keep` (the default) leaves them,
//! `archive` moves them into `archive_dir` with an `-orphan-<unix seconds>` suffix (`.2`,
//! `.3`, ... if taken), `remove` removes them as a DELETE does. An emptied domain
//! directory is removed.
//!
//! What counts as a Maildir here: a directory with `cur`, `new` and `tmp` directories at
//! `base_dir/<domain>/<local>` or `base_dir/<user>`. Nothing whose name starts with a dot
//! is entered (Maildir++ folders, the default `archive_dir`), nor `archive_dir` wherever
//! it is, nor anything through a symbolic link (a link in place of a Maildir, a domain
//! directory, or `cur`). A bare user's Maildir is not searched for domain users, and it
//! is not moved or removed while it holds the Maildir of a user of the domain with its
//! name that a row backs.
//!
//! It keeps mail whenever in doubt:
//! - only a snapshot this instance saw from its beginning is checked. One that resumed
//!   after a restart of the daemon (`whole` false at its end) missed its first rows: the
//!   check is skipped with a warning naming `epidemic backfill --handler NAME`, which runs
//!   a whole one. A snapshot that never ends (the daemon stopped) checks nothing;
//! - a snapshot row or live INSERT/UPDATE backs its Maildir even when handling it failed,
//!   and the old Maildir of a change that failed (a rename onto an existing Maildir, say)
//!   stays backed: its mail is still there, and a retry from the dead letters needs it;
//! - a Maildir that changed after the snapshot began (the directory or its `cur`, `new`
//!   or `tmp`: a delivery, a client, the mail server making it for a user whose INSERT
//!   has not reached this handler yet) is kept and reported; the next check decides;
//! - each orphan is checked again (still a Maildir, no symbolic link on the way) right
//!   before it is moved or removed.
//!
//! Memory: one entry per row (its key and Maildir path, roughly 150 bytes) while a
//! snapshot runs, about 15 MB for 100,000 users, freed at its end; the scan at the end
//! holds only the orphans' paths.
//!
//! `base_dir` must exist at start-up and is never created (an unmounted mount point must
//! not be filled); if it disappears later, changes fail with a retryable error.
//!
//! Errors about the data (bad username, bad quota, a file where a directory should be, a
//! rename target that already exists) are permanent; I/O errors are retryable.
//!
//! # Config
//!
//! ```toml
//! [[handler]]
//! name = "maildir"
//! plugin = "libepidemic_maildir.so"
//! [handler.config]
//! table = "mail_users"            # default "mail_users"
//! base_dir = "/var/mail/vhosts"   # required, absolute, must exist
//! username_column = "username"    # default "username"
//! quota_column = "quota_bytes"    # default "quota_bytes"; NULL means no quota
//! on_delete = "archive"           # "remove" (default) or "archive"
//! orphans = "archive"             # "keep" (default), "archive" or "remove": see Orphans
//! archive_dir = "/var/mail/vhosts/.archive"  # default <base_dir>/.archive
//! dir_mode = "0700"               # default 0700; a string or a TOML integer like 0o700
//! uid = 5000                      # optional: owner of what is created (needs privileges)
//! gid = 5000                      # optional: group of what is created
//! ```
//!
//! `archive_dir` must be on the same file system as `base_dir` when `on_delete` or
//! `orphans` is `"archive"` (archiving is a rename); if it lies inside `base_dir`, its
//! first component there must start with a dot, so it can never be a domain or a user.
//! Unknown keys are errors.
//!
//! # What it does not do
//!
//! It does not deliver mail, compute quota usage (the mail server maintains the usage
//! lines of `maildirsize`), lowercase or otherwise normalise usernames (normalise them in
//! the database), or create Maildir++ folders.

mod config;
mod error;
mod mailbox;
mod orphans;
mod tree;

#[cfg(test)]
mod tests;

use epidemic_plugin_sdk::{
    Change, Context, Handler, HandlerConfig, HandlerError, Logger, Op, SnapshotEvent, Subscription,
    Value,
};

pub use config::{MaildirConfig, OnDelete, Orphans};
pub use error::MaildirError;
pub use mailbox::Mailbox;
pub use tree::MaildirTree;

use orphans::OrphanCheck;

/// The handler: one per `[[handler]]` entry.
pub struct MaildirHandler {
    config: MaildirConfig,
    tree: MaildirTree,
    orphans: OrphanCheck,
}

impl MaildirHandler {
    /// A handler logging to stderr as `maildir`; [`MaildirHandler::with_context`] names
    /// the daemon's logger and `[[handler]]` entry instead.
    pub fn from_config(config: MaildirConfig) -> MaildirHandler {
        let tree = MaildirTree::new(&config);
        let orphans = OrphanCheck::new(&config.table, config.orphans, Self::NAME, Logger::stderr());
        MaildirHandler {
            config,
            tree,
            orphans,
        }
    }

    /// Log to the daemon's log, and name this `[[handler]]` entry in hints.
    pub fn with_context(mut self, ctx: &Context) -> MaildirHandler {
        self.orphans = OrphanCheck::new(
            &self.config.table,
            self.config.orphans,
            ctx.handler(),
            ctx.logger().clone(),
        );
        self
    }

    fn mailbox(&self, value: Option<&Value>) -> Result<Mailbox, MaildirError> {
        match value {
            Some(Value::Text(username)) => Mailbox::parse(username),
            other => Err(MaildirError::UsernameNotText {
                column: self.config.username_column.clone(),
                found: describe(other),
            }),
        }
    }

    fn quota(&self, value: Option<&Value>) -> Result<Option<u64>, MaildirError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let bytes = match value {
            Value::Null => return Ok(None),
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::Text(s) => s.trim().parse::<u64>().ok(),
            // Some drivers hand NUMERIC columns over as floats; accept whole numbers.
            Value::Float(f) if f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 9.2e18 => {
                Some(*f as u64)
            }
            Value::Float(_) | Value::Bytes(_) => None,
        };
        bytes.map(Some).ok_or_else(|| MaildirError::InvalidQuota {
            column: self.config.quota_column.clone(),
            value: value.to_string(),
        })
    }

    fn on_insert(&self, change: &Change) -> Result<(), MaildirError> {
        let mailbox = self.mailbox(change.new_value(&self.config.username_column))?;
        let quota = self.quota(change.new_value(&self.config.quota_column))?;
        self.tree.check_base_dir()?;
        self.tree.create(&mailbox)?;
        self.tree.set_quota(&mailbox, quota)
    }

    fn on_update(&self, change: &Change) -> Result<(), MaildirError> {
        let username_column = &self.config.username_column;
        // Check everything about the new row before touching the disk.
        let mailbox = self.mailbox(change.new_value(username_column))?;
        let quota = self.quota(change.new_value(&self.config.quota_column))?;
        self.tree.check_base_dir()?;
        if change.changed(username_column) {
            // An old username that was NULL or refused never had a directory: there is
            // nothing to move, and the new one is created below.
            if let Ok(old) = self.mailbox(change.old_value(username_column)) {
                self.tree.rename(&old, &mailbox)?;
            }
        }
        let created = self.tree.create(&mailbox)?;
        if created || change.changed(&self.config.quota_column) {
            self.tree.set_quota(&mailbox, quota)?;
        }
        Ok(())
    }

    fn on_delete(&self, change: &Change) -> Result<(), MaildirError> {
        let mailbox = self.mailbox(change.old_value(&self.config.username_column))?;
        self.tree.check_base_dir()?;
        match self.config.on_delete {
            OnDelete::Remove => self.tree.remove(&mailbox),
            OnDelete::Archive => self.tree.archive(&mailbox, change.id).map(drop),
        }
    }
}

fn describe(value: Option<&Value>) -> String {
    match value {
        None => "missing".to_owned(),
        Some(Value::Null) => "NULL".to_owned(),
        Some(Value::Int(_)) => "an integer".to_owned(),
        Some(Value::Float(_)) => "a float".to_owned(),
        Some(Value::Bytes(_)) => "binary data".to_owned(),
        Some(Value::Text(_)) => "text".to_owned(),
    }
}

impl Handler for MaildirHandler {
    const NAME: &'static str = "maildir";

    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        Ok(
            MaildirHandler::from_config(MaildirConfig::from_handler_config(config)?)
                .with_context(ctx),
        )
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(
            &self.config.table,
            [&self.config.username_column, &self.config.quota_column],
        )]
    }

    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        // A snapshot row is an INSERT of origin Snapshot: it creates the Maildir and
        // (re)writes its quota like any INSERT.
        let result = match change.op {
            Op::Insert => self.on_insert(change),
            Op::Update => self.on_update(change),
            Op::Delete => self.on_delete(change),
        };
        if self.orphans.tracking() {
            let username = &self.config.username_column;
            let old = self.mailbox(change.old_value(username)).ok();
            let new = self.mailbox(change.new_value(username)).ok();
            self.orphans
                .observe(change, old.as_ref(), new.as_ref(), result.is_ok());
        }
        Ok(result?)
    }

    fn snapshot(&mut self, event: &SnapshotEvent) -> Result<(), HandlerError> {
        Ok(self.orphans.on_event(event, &self.tree)?)
    }
}

epidemic_plugin_sdk::export_handler!(MaildirHandler);
