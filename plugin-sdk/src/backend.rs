//! The backend side of the SDK: the [`Backend`] trait a database backend implements, and
//! the adapter that exposes it across the boundary with panics caught.
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

use std::time::Duration;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RStr, RString, RVec},
};

use crate::change::Change;
use crate::ffi::{
    BackendBox, RBatch, RChange, RConsumer, RError, RErrorKind, RRegistered, RStartFrom, RWatch,
    RawBackend, RawBackend_TO,
};
use crate::handler::guard;
use crate::ops::{
    DeadLetter, DeadLetterQuery, DeadLetterUpdate, LeaseRequest, LeaseState, Scratch, Status,
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

impl From<BackendError> for RError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Connection(m) => RError::new(RErrorKind::Connection, m),
            BackendError::Invalid(m) => RError::new(RErrorKind::Invalid, m),
            BackendError::Evicted(m) => RError::new(RErrorKind::Evicted, m),
            BackendError::Other(m) => RError::new(RErrorKind::Permanent, m),
        }
    }
}

impl From<RError> for BackendError {
    fn from(e: RError) -> Self {
        match e.kind {
            RErrorKind::Connection => BackendError::Connection(e.message.into()),
            RErrorKind::Invalid => BackendError::Invalid(e.message.into()),
            RErrorKind::Evicted => BackendError::Evicted(e.message.into()),
            RErrorKind::Panic => BackendError::Other(format!("backend panicked: {}", e.message)),
            RErrorKind::Retryable | RErrorKind::Permanent => BackendError::Other(e.message.into()),
        }
    }
}

/// What to capture for one table: the union of the columns every handler needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub table: String,
    pub columns: Vec<String>,
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
    /// the same order, each with its columns in the same order; a name that does not
    /// exist is returned as given (install reports it). The default returns the watches
    /// unchanged.
    fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        Ok(watches.to_vec())
    }

    /// Claim, renew or release the lease on a daemon name (see [`LeaseRequest`]), atomically
    /// and by the database's clock, so two live daemons can never share one name.
    fn lease(&mut self, _request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        Err(unsupported(Self::NAME, "daemon leases"))
    }
}

fn unsupported(backend: &str, what: &str) -> BackendError {
    BackendError::Other(format!("the {backend} backend does not support {what} yet"))
}

fn consumer(c: &RConsumer) -> Consumer {
    Consumer {
        daemon: c.daemon.to_string(),
        handler: c.handler.to_string(),
    }
}

impl From<&Consumer> for RConsumer {
    fn from(c: &Consumer) -> Self {
        RConsumer {
            daemon: c.daemon.as_str().into(),
            handler: c.handler.as_str().into(),
        }
    }
}

impl From<&Watch> for RWatch {
    fn from(w: &Watch) -> Self {
        RWatch {
            table: w.table.as_str().into(),
            columns: w
                .columns
                .iter()
                .map(|c| RString::from(c.as_str()))
                .collect(),
        }
    }
}

pub(crate) fn watches(w: RVec<RWatch>) -> Vec<Watch> {
    w.into_iter()
        .map(|w| Watch {
            table: w.table.into(),
            columns: w.columns.into_iter().map(String::from).collect(),
        })
        .collect()
}

fn strings(v: Vec<String>) -> RVec<RString> {
    v.into_iter().map(RString::from).collect()
}

fn res<T, U>(r: Result<T, BackendError>, f: impl FnOnce(T) -> U) -> RResult<U, RError> {
    match r {
        Ok(v) => RResult::ROk(f(v)),
        Err(e) => RResult::RErr(e.into()),
    }
}

struct BackendAdapter<B>(B);

impl<B: Backend> RawBackend for BackendAdapter<B> {
    fn plan_install(&mut self, w: RVec<RWatch>) -> RResult<RVec<RString>, RError> {
        guard(|| res(self.0.plan_install(&watches(w)), strings))
    }

    fn install(&mut self, w: RVec<RWatch>) -> RResult<RVec<RString>, RError> {
        guard(|| res(self.0.install(&watches(w)), strings))
    }

    fn plan_uninstall(&mut self) -> RResult<RVec<RString>, RError> {
        guard(|| res(self.0.plan_uninstall(), strings))
    }

    fn uninstall(&mut self) -> RResult<RVec<RString>, RError> {
        guard(|| res(self.0.uninstall(), strings))
    }

    fn register(
        &mut self,
        c: &RConsumer,
        tables: RVec<RString>,
        start: RStartFrom,
    ) -> RResult<RRegistered, RError> {
        guard(|| {
            let tables: Vec<String> = tables.into_iter().map(String::from).collect();
            let start = match start {
                RStartFrom::Now => StartFrom::Now,
                RStartFrom::Oldest => StartFrom::Oldest,
            };
            res(self.0.register(&consumer(c), &tables, start), |r| match r {
                Registered::New => RRegistered::New,
                Registered::Existing => RRegistered::Existing,
                Registered::Evicted => RRegistered::Evicted,
            })
        })
    }

    fn fetch(&mut self, c: &RConsumer, max: u32) -> RResult<RBatch, RError> {
        guard(|| {
            res(self.0.fetch(&consumer(c), max), |b| RBatch {
                changes: b.changes.into_iter().map(RChange::from).collect(),
                token: b.token.into(),
            })
        })
    }

    fn ack(&mut self, c: &RConsumer, token: RStr<'_>, upto_id: i64) -> RResult<(), RError> {
        guard(|| res(self.0.ack(&consumer(c), token.as_str(), upto_id), |()| ()))
    }

    fn wait(&mut self, timeout_ms: u64) -> RResult<bool, RError> {
        guard(|| res(self.0.wait(Duration::from_millis(timeout_ms)), |b| b))
    }

    fn prune(&mut self) -> RResult<u64, RError> {
        guard(|| res(self.0.prune(), |n| n))
    }

    fn reconnect(&mut self) -> RResult<(), RError> {
        guard(|| res(self.0.reconnect(), |()| ()))
    }

    fn unregister(&mut self, c: &RConsumer) -> RResult<bool, RError> {
        guard(|| res(self.0.unregister(&consumer(c)), |b| b))
    }

    fn touch(&mut self, c: &RConsumer) -> RResult<(), RError> {
        guard(|| res(self.0.touch(&consumer(c)), |()| ()))
    }

    fn evict_stale(&mut self, ttl_ms: u64) -> RResult<RVec<RConsumer>, RError> {
        guard(|| {
            res(self.0.evict_stale(Duration::from_millis(ttl_ms)), |v| {
                v.iter().map(RConsumer::from).collect()
            })
        })
    }

    fn add_dead_letter(&mut self, letter_json: RStr<'_>) -> RResult<i64, RError> {
        guard(|| match from_json::<DeadLetter>(letter_json) {
            Ok(l) => res(self.0.add_dead_letter(&l), |id| id),
            Err(e) => RResult::RErr(e),
        })
    }

    fn dead_letters(&mut self, query_json: RStr<'_>) -> RResult<RString, RError> {
        guard(|| match from_json::<DeadLetterQuery>(query_json) {
            Ok(q) => res(self.0.dead_letters(&q), |v| to_json(&v)),
            Err(e) => RResult::RErr(e),
        })
    }

    fn update_dead_letters(&mut self, update_json: RStr<'_>) -> RResult<u64, RError> {
        guard(|| match from_json::<DeadLetterUpdate>(update_json) {
            Ok(u) => res(self.0.update_dead_letters(&u), |n| n),
            Err(e) => RResult::RErr(e),
        })
    }

    fn status(&mut self) -> RResult<RString, RError> {
        guard(|| res(self.0.status(), |s| to_json(&s)))
    }

    fn render_script(&self, statements: RVec<RString>) -> RResult<RString, RError> {
        guard(|| {
            let v: Vec<String> = statements.into_iter().map(String::from).collect();
            RResult::ROk(self.0.render_script(&v).into())
        })
    }

    fn scratch(&mut self, op_json: RStr<'_>) -> RResult<(), RError> {
        guard(|| match from_json::<Scratch>(op_json) {
            Ok(op) => res(self.0.scratch(&op), |()| ()),
            Err(e) => RResult::RErr(e),
        })
    }

    fn resolve(&mut self, w: RVec<RWatch>) -> RResult<RVec<RWatch>, RError> {
        guard(|| {
            res(self.0.resolve(&watches(w)), |v| {
                v.iter().map(RWatch::from).collect()
            })
        })
    }

    fn lease(&mut self, request_json: RStr<'_>) -> RResult<RString, RError> {
        guard(|| match from_json::<LeaseRequest>(request_json) {
            Ok(r) => res(self.0.lease(&r), |s| to_json(&s)),
            Err(e) => RResult::RErr(e),
        })
    }
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> RString {
    serde_json::to_string(v).unwrap_or_default().into()
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(s: RStr<'_>) -> Result<T, RError> {
    serde_json::from_str(s.as_str()).map_err(|e| {
        RError::new(
            RErrorKind::Invalid,
            format!("bad JSON across the plugin boundary: {e}"),
        )
    })
}

#[doc(hidden)]
pub extern "C" fn open_backend<B: Backend>(
    url: RStr<'_>,
    options_json: RStr<'_>,
) -> RResult<BackendBox, RError> {
    guard(|| {
        let options: serde_json::Value = match serde_json::from_str(options_json.as_str()) {
            Ok(v) => v,
            Err(e) => {
                return RResult::RErr(RError::new(
                    RErrorKind::Invalid,
                    format!("backend options are not valid JSON: {e}"),
                ))
            }
        };
        res(B::open(url.as_str(), &options), |b| {
            RawBackend_TO::from_value(BackendAdapter(b), TD_Opaque)
        })
    })
}

/// Export a [`Backend`] implementation as this library's plugin root module.
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        $crate::__export_root_module!($crate::__private::backend_module::<$backend>(env!(
            "CARGO_PKG_VERSION"
        )));
    };
}
