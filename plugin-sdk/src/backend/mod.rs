//! The backend side of the SDK, for backend authors: the [`Backend`] trait a database
//! backend implements ([`adapter`] exposes it across the boundary with panics caught), and
//! [`kit`], what every backend needs the same way.
//!
//! # Contract
//!
//! A backend instance owns one database connection and is used by one thread. The host
//! opens one instance per consumer (one handler of one daemon), so a backend never has
//! to share a connection between threads.
//!
//! Reading is batch by batch: [`Backend::fetch`] returns the next changes for a consumer
//! in an order where changes to one row come in commit order, together with an opaque
//! token. The host handles a prefix of the batch and calls [`Backend::ack`] with the token
//! and the id of the last change it handled; the backend then makes the consumer's cursor
//! durable in the database. A fetch after a partial ack returns the rest of the batch
//! first. Nothing may be skipped: a change committed after a fetch must show up in a
//! later fetch, whatever order transactions committed in.
//!
//! Every change carries the row's key ([`Watch::key`], resolved by [`Backend::resolve`])
//! and a [`Change::stable_id`] that is never reused in the database (see [`kit::stable_id`]).

pub mod adapter;
pub mod kit;
pub mod linger;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::backfill::{
    BackfillProgress, BackfillReply, BackfillRequest, BackfillState, Chunk, ChunkRequest, ColumnIn,
};
pub use crate::barrier::{BarrierReply, BarrierRequest, Laggard};
use crate::change::Change;
pub use crate::ops::{
    ConsumerStatus, DeadLetter, DeadLetterQuery, DeadLetterUpdate, LeaseHolder, LeaseRequest,
    LeaseState, Scratch, Status, TableStatus, SCRATCH_TABLE,
};

/// How a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The connection is gone or unusable: the host backs off and calls
    /// [`Backend::reconnect`].
    #[error("{0}")]
    Connection(String),
    /// Bad input: an identifier, a missing table or column, a bad URL or option.
    #[error("{0}")]
    Invalid(String),
    /// The consumer's cursor was evicted (unseen longer than `consumer_ttl`) or is gone
    /// (forgotten): nothing of it was updated. The host registers it again, which says
    /// loudly what may have been missed. An ack or heartbeat that updates no cursor is
    /// this error, never a success.
    #[error("{0}")]
    Evicted(String),
    /// The backend does not implement this call.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else (SQL errors the backend did not expect).
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    pub fn is_connection(&self) -> bool {
        matches!(self, BackendError::Connection(_))
    }

    pub fn is_evicted(&self) -> bool {
        matches!(self, BackendError::Evicted(_))
    }
}

/// What to capture for one table: the union of the columns every handler needs, and the
/// row's key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    pub table: String,
    pub columns: Vec<String>,
    /// The key columns: given by the config (`[table.NAME] key = [..]`), or empty for
    /// "the table's primary key", which [`Backend::resolve`] fills in.
    pub key: Vec<String>,
    /// The type of each of `columns`, as [`Backend::resolve`] found them in the catalog
    /// (one per column, in order; [`ColumnType::Missing`] for a column the table lacks),
    /// so the host can check a handler's row filter at start; empty when the backend does
    /// not say.
    pub types: Vec<ColumnType>,
}

/// What kind of values a column holds, coarsely: what a row filter can compare it with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Int,
    Float,
    /// An exact decimal (delivered as text).
    Decimal,
    Text,
    Bytes,
    Bool,
    /// Dates, times, JSON, arrays, …: delivered as text.
    #[default]
    Other,
    /// The table has no such column.
    Missing,
}

impl ColumnType {
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::Decimal => "decimal",
            ColumnType::Text => "text",
            ColumnType::Bytes => "bytes",
            ColumnType::Bool => "bool",
            ColumnType::Other => "other",
            ColumnType::Missing => "missing",
        }
    }

    /// The type for a name `as_str` gives; `Other` for any other name (a newer backend).
    pub fn parse(name: &str) -> ColumnType {
        match name {
            "int" => ColumnType::Int,
            "float" => ColumnType::Float,
            "decimal" => ColumnType::Decimal,
            "text" => ColumnType::Text,
            "bytes" => ColumnType::Bytes,
            "bool" => ColumnType::Bool,
            "missing" => ColumnType::Missing,
            _ => ColumnType::Other,
        }
    }
}

impl Watch {
    pub fn new<C: Into<String>>(
        table: impl Into<String>,
        columns: impl IntoIterator<Item = C>,
    ) -> Self {
        Watch {
            table: table.into(),
            columns: columns.into_iter().map(Into::into).collect(),
            key: Vec::new(),
            types: Vec::new(),
        }
    }

    /// The captured columns: the key columns first, then the watched ones not in the key.
    pub fn captured(&self) -> Vec<String> {
        let mut all = self.key.clone();
        for c in &self.columns {
            if !all.contains(c) {
                all.push(c.clone());
            }
        }
        all
    }
}

/// What a backend can do beyond the contract's minimum, for the host to use without
/// naming any backend or option. Crosses as JSON: a field added later is no ABI change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Option sets `epidemic bench` also measures writes with a reader attached with,
    /// side by side (PostgreSQL: wake-ups off, no linger), each merged into the
    /// `[database]` options.
    pub bench_variants: Vec<BenchVariant>,
    /// Fills [`Change::txid`].
    pub transaction_ids: bool,
    /// Fills [`Change::commit_seq`].
    pub commit_order: bool,
    /// Fills [`Change::schema`].
    pub schemas: bool,
}

/// A named set of backend options `epidemic bench` compares against the configured ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchVariant {
    /// What the variant is, for the report (`notify off`).
    pub label: String,
    /// Merged into the `[database]` options.
    pub options: serde_json::Value,
}

/// One handler of one daemon; owns a durable cursor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Consumer {
    pub daemon: String,
    pub handler: String,
}

impl std::fmt::Display for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.daemon, self.handler)
    }
}

/// Where a consumer seen for the first time starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Only changes committed from now on.
    Now,
    /// Every change still in the log.
    Oldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    New,
    Existing,
    /// The consumer had been evicted (unseen longer than `consumer_ttl`); changes it had
    /// not handled may have been pruned. Its cursor was reset as for a new consumer.
    Evicted,
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    /// Opaque to the host; handed back to [`Backend::ack`].
    pub token: String,
}

/// A database backend. Implement this, then call [`crate::export_backend!`] once.
pub trait Backend: Send + 'static {
    /// The backend's name (`sqlite`, `postgres`).
    const NAME: &'static str;
    /// The `database.url` schemes this backend serves, comma-separated
    /// (`"postgres,postgresql"`).
    const URL_SCHEMES_JOINED: &'static str;

    /// Connect. `options` is the `[database]` table minus `url`, as JSON.
    fn open(url: &str, options: &serde_json::Value) -> Result<Self, BackendError>
    where
        Self: Sized;

    /// What this backend can do beyond the minimum.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The statements [`Backend::install`] would run now, applying nothing.
    fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError>;

    /// Create or bring up to date log tables, triggers and bookkeeping tables.
    /// Idempotent. Returns the statements it ran.
    fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError>;

    /// The statements [`Backend::uninstall`] would run now.
    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError>;

    /// Remove every object Epidemic created, and nothing else.
    fn uninstall(&mut self) -> Result<Vec<String>, BackendError>;

    /// Make sure the consumer has a durable cursor for these tables.
    fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError>;

    /// The next changes for the consumer, at most `max`. Empty when there is nothing new.
    fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError>;

    /// The consumer handled the batch's changes up to and including the one with `upto_id`.
    fn ack(&mut self, consumer: &Consumer, token: &str, upto_id: i64) -> Result<(), BackendError>;

    /// Block until there may be new changes or `timeout` passes. Returns `true` when woken
    /// by a sign of new changes. Spurious wake-ups are allowed; missing one is not fatal
    /// (the host fetches after every timeout) but costs latency.
    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError>;

    /// Delete log rows every registered consumer has passed. Returns how many.
    fn prune(&mut self) -> Result<u64, BackendError>;

    /// Drop the connection and open a new one.
    fn reconnect(&mut self) -> Result<(), BackendError>;

    /// Forget a consumer and its cursors (a handler removed from a daemon's config), so
    /// it no longer holds back pruning. Its dead letters stay. Returns whether it existed.
    fn unregister(&mut self, _consumer: &Consumer) -> Result<bool, BackendError> {
        Err(unsupported(Self::NAME, "unregister"))
    }

    /// Heartbeat: the consumer is alive (its last-seen time becomes now).
    fn touch(&mut self, _consumer: &Consumer) -> Result<(), BackendError> {
        Err(unsupported(Self::NAME, "touch"))
    }

    /// Mark every consumer not seen for `ttl` as evicted, so it no longer holds back
    /// pruning. Returns the consumers this call evicted.
    fn evict_stale(&mut self, _ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        Err(unsupported(Self::NAME, "evict_stale"))
    }

    /// Store a dead letter; returns its id.
    fn add_dead_letter(&mut self, _letter: &DeadLetter) -> Result<i64, BackendError> {
        Err(unsupported(Self::NAME, "add_dead_letter"))
    }

    fn dead_letters(&mut self, _query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        Err(unsupported(Self::NAME, "dead_letters"))
    }

    /// Apply an update; returns how many letters it touched.
    fn update_dead_letters(&mut self, _update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        Err(unsupported(Self::NAME, "update_dead_letters"))
    }

    /// Consumers, backlogs, triggers and drift, for `epidemic status`.
    fn status(&mut self) -> Result<Status, BackendError> {
        Err(unsupported(Self::NAME, "status"))
    }

    /// The statements as one script for the database's own command-line client, for
    /// `epidemic sql`. The default ends each with `;` and a blank line; a backend whose
    /// client needs more (MySQL's `DELIMITER` around trigger bodies) overrides it.
    fn render_script(&self, statements: &[String]) -> String {
        statements.iter().map(|s| format!("{s};\n\n")).collect()
    }

    /// Scratch-table work for `epidemic bench`.
    fn scratch(&mut self, _op: &Scratch) -> Result<(), BackendError> {
        Err(unsupported(Self::NAME, "bench"))
    }

    /// The watches with every table and column name in the catalog's own spelling, for a
    /// database whose names are case-insensitive (SQLite, MySQL): the host then uses
    /// these spellings everywhere (subscriptions, dispatch), so a handler that wrote
    /// `Mail_Users` still gets the changes of `mail_users`. One watch per watch given, in
    /// the same order, each with its columns in the same order, and its `key` filled in
    /// with the table's primary key when the config named none. A table with neither is
    /// [`BackendError::Invalid`], naming the table and the `key = [..]` fix. A name that
    /// does not exist is returned as given (install reports it). The default returns the
    /// watches unchanged.
    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        Ok(watches.to_vec())
    }

    /// Claim, renew or release the lease on a daemon name (see [`LeaseRequest`]), atomically
    /// and by the database's clock, so two live daemons can never share one name.
    fn lease(&mut self, _request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        Err(unsupported(Self::NAME, "daemon leases"))
    }

    /// Read the next rows of a table by key for a backfill, without locking the table,
    /// then write a watermark into the table's log (see [`crate::backfill`]). Every
    /// change committed before the rows were read must come before the watermark in
    /// every consumer's stream; the watermark comes to every consumer of the table as a
    /// change of origin `Watermark` (the host drops it for handlers). The request's
    /// `only` conditions are a hint the read may use to skip rows the host would drop
    /// ([`ColumnIn`]: never stricter than exact equality).
    fn snapshot_chunk(&mut self, _request: &ChunkRequest) -> Result<Chunk, BackendError> {
        Err(unsupported(Self::NAME, "backfills"))
    }

    /// Store and read backfill requests and progress (see [`BackfillRequest`]).
    fn backfills(&mut self, _request: &BackfillRequest) -> Result<BackfillReply, BackendError> {
        Err(unsupported(Self::NAME, "backfills"))
    }

    /// Fences and laggards for `epidemic wait` (see [`crate::barrier`]).
    fn barrier(&mut self, _request: &BarrierRequest) -> Result<BarrierReply, BackendError> {
        Err(unsupported(Self::NAME, "epidemic wait"))
    }
}

fn unsupported(backend: &str, what: &str) -> BackendError {
    BackendError::Unsupported(format!("the {backend} backend does not support {what}"))
}
