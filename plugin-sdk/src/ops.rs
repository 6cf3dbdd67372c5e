//! Operational records backends keep in the database for the host: dead letters and the
//! status report. They cross the library boundary as JSON, so adding a field is not an
//! ABI change.

use serde::{Deserialize, Serialize};

use crate::backend::Consumer;
use crate::change::{Change, Op};

/// A change a handler gave up on, kept in the database until it is retried or dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Assigned by the backend (0 in a new letter).
    pub id: i64,
    pub daemon: String,
    pub handler: String,
    pub table: String,
    pub change_id: i64,
    pub op: Op,
    /// The change exactly as it was delivered (JSON of [`Change`]).
    pub change: String,
    /// The last error.
    pub error: String,
    pub attempts: u32,
    /// When it was (last) given up on, microseconds since the Unix epoch.
    pub failed_at_us: i64,
    /// `epidemic dead-letters retry` asked the daemon to deliver it again.
    pub retry_requested: bool,
}

impl DeadLetter {
    pub fn new(
        consumer: &Consumer,
        change: &Change,
        error: &str,
        attempts: u32,
        failed_at_us: i64,
    ) -> Self {
        DeadLetter {
            id: 0,
            daemon: consumer.daemon.clone(),
            handler: consumer.handler.clone(),
            table: change.table.clone(),
            change_id: change.id,
            op: change.op,
            change: serde_json::to_string(change).unwrap_or_default(),
            error: error.to_owned(),
            attempts,
            failed_at_us,
            retry_requested: false,
        }
    }

    /// The stored change.
    pub fn change(&self) -> Result<Change, String> {
        serde_json::from_str(&self.change)
            .map_err(|e| format!("dead letter {}: stored change is damaged: {e}", self.id))
    }
}

/// Which dead letters to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeadLetterQuery {
    All,
    Consumer(Consumer),
    /// The consumer's letters that `retry` marked.
    RetryRequested(Consumer),
    Ids(Vec<i64>),
}

/// A change to dead letters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeadLetterUpdate {
    /// Ask the owning daemon to deliver these again.
    RequestRetry(Vec<i64>),
    /// Forget these (after a successful retry, or `epidemic dead-letters drop`).
    Delete(Vec<i64>),
    /// A retry failed again: record the error and clear the retry request.
    Failed {
        id: i64,
        error: String,
        attempts: u32,
        failed_at_us: i64,
    },
}

/// What `epidemic status` shows, as a backend reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub backend: String,
    pub consumers: Vec<ConsumerStatus>,
    pub tables: Vec<TableStatus>,
    /// Conditions that weaken a guarantee, one sentence each with the remedy (a missing
    /// privilege that makes gap detection fall back to a timeout, say). `run` logs them
    /// as warnings at start; `status` prints them.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Who holds each daemon name (filled by the host from [`LeaseRequest::List`]).
    #[serde(default)]
    pub daemons: Vec<LeaseHolder>,
    /// Backfills, running and done (filled by the host from
    /// [`crate::backfill::BackfillRequest::List`]).
    #[serde(default)]
    pub backfills: Vec<crate::backfill::BackfillProgress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub daemon: String,
    pub handler: String,
    pub tables: Vec<String>,
    /// The cursor in the backend's own terms (an id, a snapshot).
    pub position: String,
    /// Changes in the log not yet handled by this consumer.
    pub backlog: i64,
    /// Age in seconds of the oldest change not yet handled.
    pub oldest_pending_age_s: Option<f64>,
    pub dead_letters: i64,
    pub last_seen_us: i64,
    /// Evicted for being unseen longer than `consumer_ttl`: no longer holds back pruning.
    pub evicted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableStatus {
    pub table: String,
    pub log_table: String,
    pub columns: Vec<String>,
    /// Rows in the log table.
    pub log_rows: i64,
    /// Expected trigger names and whether each is present.
    pub triggers: Vec<(String, bool)>,
    /// Schema drift, one sentence each: a dropped trigger, a dropped or renamed column.
    pub problems: Vec<String>,
}

/// The drift sentences of [`TableStatus::problems`], shared so every backend says the
/// same thing (tests and operators match on them).
pub mod drift {
    use crate::change::Op;

    use std::fmt::Display;

    pub fn table_gone(table: impl Display) -> String {
        format!("table {table} no longer exists")
    }

    pub fn trigger_missing(trigger: impl Display, table: impl Display, op: Op) -> String {
        format!("trigger {trigger} on {table} is missing: {op} changes are not captured; run `epidemic install`")
    }

    /// `consequence` is what it means on that backend ("handlers that need it cannot get
    /// it", "the triggers fail every write to the table"); "their" is the handlers'.
    pub fn column_gone(column: impl Display, table: impl Display, consequence: &str) -> String {
        format!(
            "column {column} of table {table} no longer exists (dropped or renamed): {consequence}; \
             change their columns or restore the column, then run `epidemic install`"
        )
    }
}

/// Work on the scratch table `epidemic bench` measures with. The table is named by the
/// host (`epidemic_bench_scratch`) and is never one of the user's tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Scratch {
    /// Create `table (id BIGINT PRIMARY KEY, payload VARCHAR(64))`, dropping a leftover
    /// from an earlier run first (with what Epidemic kept for it).
    Create { table: String },
    /// Insert rows with ids `first_id ..< first_id + count`, `per_tx` rows per transaction.
    Insert {
        table: String,
        first_id: i64,
        count: u64,
        per_tx: u64,
    },
    /// Drop the table and everything Epidemic keeps for it: log table, triggers,
    /// registry entry, cursors, dead letters.
    Drop { table: String },
}

/// The scratch table's name: in Epidemic's own namespace, so it can never be a user's.
pub const SCRATCH_TABLE: &str = "epidemic_bench_scratch";

/// A request on the lease that makes a daemon name exclusive to one live daemon.
///
/// The lease is one row per daemon name holding the instance that owns it and when it
/// expires, by the database's clock (never a daemon's). A backend carries out each
/// request atomically (one statement or one transaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    /// Take the name, or keep it: granted when nobody holds it, when `instance` already
    /// holds it, when the holder's lease has expired, or when the holder is
    /// `take_over` (an instance the caller proved dead). A grant sets the holder to
    /// `instance`/`holder` and the expiry to now + `ttl_ms`.
    Claim {
        daemon: String,
        /// Random, new for every start of a daemon.
        instance: String,
        /// Who holds it, for people: `pid 1234 on host mx1`.
        holder: String,
        ttl_ms: u64,
        take_over: Option<String>,
    },
    /// Give the name up at a clean shutdown (only if `instance` holds it).
    Release { daemon: String, instance: String },
    /// Every lease, for `epidemic status` (empty when nothing is installed).
    List,
}

/// One daemon name's lease, as `epidemic status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    pub daemon: String,
    /// `pid 1234 on host mx1`.
    pub holder: String,
    /// Until the lease expires by the database's clock; negative once it has (the
    /// daemon stopped without releasing it, or is cut off).
    pub expires_in_ms: i64,
}

/// The lease after a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// The caller holds the name.
    Granted,
    /// Another live instance holds it.
    Held {
        instance: String,
        holder: String,
        /// Until its lease expires, by the database's clock.
        expires_in_ms: u64,
        /// How many times the holder has claimed or renewed it: a number that moves
        /// while the caller waits means the holder is alive.
        renewals: i64,
    },
    /// After a release.
    Released,
    /// The answer to [`LeaseRequest::List`], by daemon name.
    Holders(Vec<LeaseHolder>),
}
