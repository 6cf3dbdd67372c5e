//! The handler side of the SDK: the [`Handler`] trait plugin authors implement, and the
//! adapter that exposes it across the boundary with panics caught.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RStr, RVec},
};
use epidemic_plugin_abi::{
    HandlerBox, RBatchError, RChange, RError, RErrorKind, RHandlerContext, RSnapshotEvent,
    RSubscription, RawHandler, RawHandler_TO,
};
use serde::de::DeserializeOwned;

use crate::backfill::SnapshotEvent;
use crate::boundary::ColumnCache;
use crate::change::{Change, Op, Subscription};
use crate::context::{self, Context, Logger};

/// How a handler call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again: the host retries with backoff, up to its configured attempts.
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time: the change goes to the dead-letter table at once.
    #[error("{0}")]
    Permanent(String),
    /// The handler panicked (set by the SDK, never by handler code).
    #[error("handler panicked: {0}")]
    Panic(String),
}

impl HandlerError {
    pub fn retryable(msg: impl std::fmt::Display) -> Self {
        HandlerError::Retryable(msg.to_string())
    }

    pub fn permanent(msg: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(msg.to_string())
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Retryable(_))
    }
}

impl From<std::io::Error> for HandlerError {
    /// I/O errors are retryable by default: a full disk or a busy file may clear up.
    fn from(e: std::io::Error) -> Self {
        HandlerError::Retryable(e.to_string())
    }
}

impl From<HandlerError> for RError {
    fn from(e: HandlerError) -> Self {
        match e {
            HandlerError::Retryable(m) => RError::new(RErrorKind::Retryable, m),
            HandlerError::Permanent(m) => RError::new(RErrorKind::Permanent, m),
            HandlerError::Panic(m) => RError::new(RErrorKind::Panic, m),
        }
    }
}

impl From<RError> for HandlerError {
    fn from(e: RError) -> Self {
        match e.kind {
            RErrorKind::Retryable | RErrorKind::Connection => {
                HandlerError::Retryable(e.message.into())
            }
            RErrorKind::Panic => HandlerError::Panic(e.message.into()),
            RErrorKind::Permanent
            | RErrorKind::Invalid
            | RErrorKind::Evicted
            | RErrorKind::Unsupported => HandlerError::Permanent(e.message.into()),
        }
    }
}

/// A batch stopped at one change: the changes before `index` were handled, the one at
/// `index` failed with `error`, the ones after it were not tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("change {index} of the batch: {error}")]
pub struct BatchError {
    pub index: usize,
    pub error: HandlerError,
}

impl BatchError {
    pub fn new(index: usize, error: HandlerError) -> Self {
        BatchError { index, error }
    }
}

/// A handler's own `[handler.config]` table, as the host read it from the config file.
#[derive(Debug, Clone, Default)]
pub struct HandlerConfig {
    value: serde_json::Value,
}

impl HandlerConfig {
    pub fn from_json(value: serde_json::Value) -> Self {
        HandlerConfig { value }
    }

    /// The raw table.
    pub fn json(&self) -> &serde_json::Value {
        &self.value
    }

    /// Deserialize into the handler's config struct. Use `#[serde(deny_unknown_fields)]`
    /// on it so a typo in the config file is an error, not a silent default.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let value = match &self.value {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => v.clone(),
        };
        serde_json::from_value(value)
            .map_err(|e| HandlerError::Permanent(format!("invalid handler config: {e}")))
    }
}

/// A handler plugin. Implement this, then call [`crate::export_handler!`] once.
///
/// The host creates one instance per `[[handler]]` entry and calls it from one thread at a
/// time. Changes to one row come in commit order. Delivery is at-least-once: after a crash
/// the changes that were in hand may come again (with the same [`Change::stable_id`]), so
/// make handlers idempotent.
///
/// Implement [`Handler::insert`], [`Handler::update`] and [`Handler::delete`] (or
/// [`Handler::handle`]) for one change at a time; implement [`Handler::handle_batch`] too
/// when a batch can be done cheaper as a whole (one transaction, one request, waiting for
/// many acknowledgements at once).
pub trait Handler: Send + 'static {
    /// The plugin's name, shown by `epidemic plugin check` and in logs.
    const NAME: &'static str;

    /// Build the handler from its `[handler.config]` table. `ctx` says which daemon and
    /// which `[[handler]]` entry this is, and holds the daemon's logger.
    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError>
    where
        Self: Sized;

    /// The tables, columns and operations this handler wants.
    fn subscriptions(&self) -> Vec<Subscription>;

    /// Handle changes in order. The default calls [`Handler::handle`] for each and stops
    /// at the first failure, saying which change it was.
    ///
    /// On `Err(BatchError { index, .. })` the host takes the changes before `index` as
    /// handled, retries (or dead-letters) the one at `index` on its own, and then goes on
    /// with the rest. So an implementation must not have acted on changes after `index`,
    /// or must be idempotent for them (they come again).
    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        for (i, change) in changes.iter().enumerate() {
            self.handle(change).map_err(|e| BatchError::new(i, e))?;
        }
        Ok(())
    }

    /// Called for every change the handler subscribed to (by the default
    /// [`Handler::handle_batch`]). The default calls [`Handler::insert`],
    /// [`Handler::update`] or [`Handler::delete`].
    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        match change.op {
            Op::Insert => self.insert(change),
            Op::Update => self.update(change),
            Op::Delete => self.delete(change),
        }
    }

    fn insert(&mut self, _change: &Change) -> Result<(), HandlerError> {
        Ok(())
    }

    fn update(&mut self, _change: &Change) -> Result<(), HandlerError> {
        Ok(())
    }

    fn delete(&mut self, _change: &Change) -> Result<(), HandlerError> {
        Ok(())
    }

    /// A snapshot of a table begins or ends (a backfill: `epidemic backfill`,
    /// `start = "snapshot"`, `on_evicted = "resync"`). Between the two, rows of the table
    /// arrive as INSERTs of origin [`crate::Origin::Snapshot`], interleaved with live
    /// changes. At a [`SnapshotEvent::Ended`] with `whole`, every row of the table reached
    /// this handler as a snapshot row or a live change since the beginning: external state
    /// that none of them backed is an orphan. The default does nothing.
    fn snapshot(&mut self, _event: &SnapshotEvent) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Run `f`, turning a panic into an error so it never unwinds into abi_stable (which
/// would exit the host process).
pub(crate) fn guard<T>(f: impl FnOnce() -> RResult<T, RError>) -> RResult<T, RError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => RResult::RErr(RError::new(RErrorKind::Panic, panic_message(&*payload))),
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// A [`Handler`] behind the boundary's [`RawHandler`]: converts changes, routes its
/// `tracing` events to the host's logger and turns panics into errors.
pub(crate) struct HandlerAdapter<H> {
    inner: H,
    columns: ColumnCache,
    logger: Logger,
    /// The last batch, converted; reused so its buffer is allocated once.
    batch: Vec<Change>,
}

impl<H: Handler> HandlerAdapter<H> {
    /// Build the handler; what `new` logs goes to `ctx`'s logger.
    pub(crate) fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        let logger = ctx.logger().clone();
        let inner = context::scoped(&logger, || H::new(config, ctx))?;
        Ok(HandlerAdapter {
            inner,
            columns: ColumnCache::new(),
            logger,
            batch: Vec::new(),
        })
    }
}

impl<H: Handler> RawHandler for HandlerAdapter<H> {
    fn subscriptions(&self) -> RResult<RVec<RSubscription>, RError> {
        guard(|| {
            context::scoped(&self.logger, || {
                RResult::ROk(
                    self.inner
                        .subscriptions()
                        .into_iter()
                        .map(RSubscription::from)
                        .collect(),
                )
            })
        })
    }

    fn handle_batch(&mut self, changes: RSlice<'_, RChange>) -> RResult<(), RBatchError> {
        let n = changes.len();
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.batch.clear();
            for c in changes.iter() {
                let change = self.columns.to_change(c);
                self.batch.push(change);
            }
            let (inner, batch) = (&mut self.inner, &self.batch);
            context::scoped(&self.logger, || inner.handle_batch(batch))
        }));
        match result {
            Ok(Ok(())) => RResult::ROk(()),
            Ok(Err(e)) => RResult::RErr(RBatchError {
                index: e.index.min(n.saturating_sub(1)) as u32,
                error: e.error.into(),
            }),
            // Which change panicked is not known: none of the batch counts as handled.
            Err(payload) => RResult::RErr(RBatchError {
                index: 0,
                error: RError::new(RErrorKind::Panic, panic_message(&*payload)),
            }),
        }
    }

    fn snapshot(&mut self, event: &RSnapshotEvent) -> RResult<(), RError> {
        let event = snapshot_event(event);
        let (inner, logger) = (&mut self.inner, &self.logger);
        guard(|| {
            context::scoped(logger, || {
                inner.snapshot(&event).map_err(RError::from).into()
            })
        })
    }
}

/// The plain form of a snapshot event.
pub fn snapshot_event(e: &RSnapshotEvent) -> SnapshotEvent {
    let table = e.table.as_str().to_owned();
    if e.ended {
        SnapshotEvent::Ended {
            table,
            rows: e.rows,
            whole: !e.resumed,
        }
    } else {
        SnapshotEvent::Began {
            table,
            resumed: e.resumed,
        }
    }
}

/// The stable-ABI form of a snapshot event.
pub fn rsnapshot_event(e: &SnapshotEvent) -> RSnapshotEvent {
    match e {
        SnapshotEvent::Began { table, resumed } => RSnapshotEvent {
            table: table.as_str().into(),
            ended: false,
            resumed: *resumed,
            rows: 0,
        },
        SnapshotEvent::Ended { table, rows, whole } => RSnapshotEvent {
            table: table.as_str().into(),
            ended: true,
            resumed: !whole,
            rows: *rows,
        },
    }
}

#[doc(hidden)]
pub extern "C" fn new_handler<H: Handler>(
    config_json: RStr<'_>,
    ctx: RHandlerContext,
) -> RResult<HandlerBox, RError> {
    guard(|| {
        let value: serde_json::Value = match serde_json::from_str(config_json.as_str()) {
            Ok(v) => v,
            Err(e) => {
                return RResult::RErr(RError::new(
                    RErrorKind::Invalid,
                    format!("handler config is not valid JSON: {e}"),
                ))
            }
        };
        let ctx = Context::new(
            ctx.daemon.as_str(),
            ctx.handler.as_str(),
            Logger::from_host(ctx.logger),
        );
        // In a library of its own, this library's `tracing` must reach the host.
        context::install_bridge(ctx.logger());
        match HandlerAdapter::<H>::new(&HandlerConfig::from_json(value), &ctx) {
            Ok(adapter) => RResult::ROk(RawHandler_TO::from_value(adapter, TD_Opaque)),
            Err(e) => RResult::RErr(RError::new(RErrorKind::Invalid, e.to_string())),
        }
    })
}

/// The handler as the boundary's trait object, built in this process: what the host gets
/// from a plugin library, without the library (for unit tests of the host). It shares
/// the host's `tracing`, so no bridge is installed.
pub fn in_process<H: Handler>(
    config: &serde_json::Value,
    ctx: &Context,
) -> Result<HandlerBox, HandlerError> {
    let adapter = HandlerAdapter::<H>::new(&HandlerConfig::from_json(config.clone()), ctx)?;
    Ok(RawHandler_TO::from_value(adapter, TD_Opaque))
}

/// Export a [`Handler`] implementation as this library's plugin root module.
///
/// ```text
/// struct Hello;
/// impl epidemic_plugin_sdk::Handler for Hello { /* ... */ }
/// epidemic_plugin_sdk::export_handler!(Hello);
/// ```
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        $crate::__export_root_module!($crate::__private::handler_module::<$handler>(env!(
            "CARGO_PKG_VERSION"
        )));
    };
}
