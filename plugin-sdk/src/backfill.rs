//! Backfills: what the host and a backend say to each other to bring a consumer up to
//! the table's state, not only to its changes.
//!
//! The host drives a backfill inside the consumer's own delivery loop, one chunk at a
//! time: it asks the backend for the next rows of the table by key
//! ([`crate::backend::Backend::snapshot_chunk`]). The backend reads them and then writes a
//! **watermark** into the table's log, after the read; the consumer's stream delivers it
//! like a change (origin [`crate::Origin::Watermark`]). The host hands the chunk's rows to
//! the handler right after that watermark, minus every row whose key a live change
//! touched in the stream between the read and the watermark (the live change is at least
//! as new). Why that is exact is written per backend in ARCHITECTURE.md; it rests on one
//! property each backend's log has: a change committed before the read comes before the
//! watermark in the consumer's stream.
//!
//! Progress ([`BackfillProgress`]) lives in the database, so a backfill survives a
//! restart of the daemon and resumes after its last finished chunk. Requests and
//! progress cross the boundary as JSON ([`BackfillRequest`], [`BackfillReply`]): adding a
//! field is no ABI change.

use serde::{Deserialize, Serialize};

use crate::backend::Consumer;
use crate::change::{Change, Value};

/// The next chunk of a table's rows, by key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub table: String,
    /// The key of the last row already done; `None` for the first chunk.
    pub after: Option<Vec<Value>>,
    /// Most rows in the chunk.
    pub limit: u32,
    /// A **hint**: the host will keep only rows that meet every one of these conditions
    /// (the part of the handler's row filter a SELECT can say; see [`ColumnIn`]). A
    /// backend may restrict its read to such rows (`col IN (...)`), or ignore any of them:
    /// the host applies the whole filter to every row it gets anyway. Paging is
    /// unchanged, by key over the rows read: `after` is the key of the last row returned,
    /// and a chunk of fewer than `limit` rows is the `last`. Empty (the default, and what
    /// a host older than this field sends): every row.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<ColumnIn>,
}

/// One condition of [`ChunkRequest::only`]: the host keeps only rows whose `column` (the
/// catalog's spelling) equals one of `values` (integers for an integer column, text for a
/// character column). A row whose column is NULL never meets it; an empty `values` is met
/// by no row.
///
/// A backend's comparison may be looser than the host's (a case-insensitive or PAD SPACE
/// collation, `char(n)`): that only reads rows the host then drops. It must never be
/// stricter: every row whose value equals one of `values` exactly must be read. A column
/// the table does not have is a bug or a dropped column; a backend refuses it
/// ([`crate::backend::BackendError::Invalid`], naming the table and the column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnIn {
    pub column: String,
    pub values: Vec<Value>,
}

/// Rows read for a backfill, and the watermark written after reading them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    /// The rows in key order, as INSERT changes of origin `Snapshot`: every captured
    /// column in `columns`/`new`, the key in `key_columns`/`key`, `id` 0, a `stable_id`
    /// of the snapshot's own.
    pub rows: Vec<Change>,
    /// The log id of the watermark the backend wrote into the table's log after reading
    /// the rows: the consumer's stream brings a change of origin `Watermark` with this id.
    pub watermark: i64,
    /// No rows come after these: the table's snapshot is complete.
    pub last: bool,
    /// How many rows the table holds, roughly (for progress), where cheap to know.
    pub rows_estimate: Option<u64>,
}

/// Where one table's backfill for one consumer stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackfillState {
    /// Asked for; the consumer's daemon has not started it yet.
    #[default]
    Requested,
    Running,
    Done,
}

/// One table's backfill for one consumer, as stored in the database.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackfillProgress {
    pub daemon: String,
    pub handler: String,
    pub table: String,
    pub state: BackfillState,
    /// The key of the last row of the last finished chunk.
    pub last_key: Option<Vec<Value>>,
    pub rows_done: u64,
    pub rows_estimate: Option<u64>,
    /// Who asked: `epidemic backfill`, `start = "snapshot"`, `on_evicted = "resync"`.
    pub requested_by: String,
    pub requested_at_us: i64,
    pub started_at_us: i64,
    pub updated_at_us: i64,
}

impl BackfillProgress {
    pub fn consumer(&self) -> Consumer {
        Consumer {
            daemon: self.daemon.clone(),
            handler: self.handler.clone(),
        }
    }
}

/// What the host asks a backend about backfills.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BackfillRequest {
    /// Ask for a backfill of these tables for this consumer. Refused
    /// ([`crate::backend::BackendError::Invalid`], naming the consumer) when one of them is
    /// requested or running already; nothing is stored then.
    Request {
        consumer: Consumer,
        tables: Vec<String>,
        requested_by: String,
    },
    /// The consumer's backfills that are not done.
    Pending { consumer: Consumer },
    /// Store a table's progress (its state included), updating the row `Request` made.
    /// The reply holds the stored progress, or nothing when the row no longer exists
    /// (the backfill was cancelled): the host then stops it.
    Save(BackfillProgress),
    /// Every backfill, done ones included (for `epidemic status`).
    List,
    /// Forget the consumer's backfills that are not done.
    Cancel { consumer: Consumer },
}

/// A backend's answer to a [`BackfillRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackfillReply {
    pub backfills: Vec<BackfillProgress>,
}

/// What a handler is told about a snapshot of a table (see
/// [`crate::Handler::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotEvent {
    /// Rows of `table` of origin `Snapshot` follow, interleaved with live changes.
    /// `resumed`: the snapshot began before the daemon restarted, so this instance does
    /// not see its first rows.
    Began { table: String, resumed: bool },
    /// Every row of `table` was delivered. `whole`: this instance received all of them
    /// (it was not resumed), so whatever external state no row and no live change of the
    /// snapshot backed can be cleaned up (orphans); otherwise it must not be.
    Ended {
        table: String,
        rows: u64,
        whole: bool,
    },
}
