//! A [`Backend`] behind the boundary's [`RawBackend`]: converts arguments and results,
//! routes the backend's `tracing` events to the host's logger, and turns panics into
//! errors. Backend authors never call this; [`crate::export_backend!`] does.

use std::time::Duration;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RStr, RString, RVec},
};
use epidemic_plugin_abi::{
    BackendBox, LoggerBox, RBatch, RChunk, RConsumer, RError, RErrorKind, RRegistered, RStartFrom,
    RWatch, RawBackend, RawBackend_TO,
};

use super::{Backend, BackendError, Consumer, Registered, StartFrom};
use crate::backfill::{BackfillRequest, ChunkRequest};
use crate::barrier::BarrierRequest;
use crate::boundary::{self, ColumnCache};
use crate::context::{self, Logger};
use crate::handler::guard;
use crate::ops::{DeadLetter, DeadLetterQuery, DeadLetterUpdate, LeaseRequest, Scratch};

impl From<BackendError> for RError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Connection(m) => RError::new(RErrorKind::Connection, m),
            BackendError::Invalid(m) => RError::new(RErrorKind::Invalid, m),
            BackendError::Evicted(m) => RError::new(RErrorKind::Evicted, m),
            BackendError::Unsupported(m) => RError::new(RErrorKind::Unsupported, m),
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
            RErrorKind::Unsupported => BackendError::Unsupported(e.message.into()),
            RErrorKind::Panic => BackendError::Other(format!("backend panicked: {}", e.message)),
            RErrorKind::Retryable | RErrorKind::Permanent => BackendError::Other(e.message.into()),
        }
    }
}

pub fn consumer(c: &RConsumer) -> Consumer {
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

pub fn start_from(s: RStartFrom) -> StartFrom {
    match s {
        RStartFrom::Now => StartFrom::Now,
        RStartFrom::Oldest => StartFrom::Oldest,
    }
}

pub fn rstart_from(s: StartFrom) -> RStartFrom {
    match s {
        StartFrom::Now => RStartFrom::Now,
        StartFrom::Oldest => RStartFrom::Oldest,
    }
}

pub fn registered(r: RRegistered) -> Registered {
    match r {
        RRegistered::New => Registered::New,
        RRegistered::Existing => Registered::Existing,
        RRegistered::Evicted => Registered::Evicted,
    }
}

fn rregistered(r: Registered) -> RRegistered {
    match r {
        Registered::New => RRegistered::New,
        Registered::Existing => RRegistered::Existing,
        Registered::Evicted => RRegistered::Evicted,
    }
}

fn res<T, U>(r: Result<T, BackendError>, f: impl FnOnce(T) -> U) -> RResult<U, RError> {
    match r {
        Ok(v) => RResult::ROk(f(v)),
        Err(e) => RResult::RErr(e.into()),
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

struct BackendAdapter<B> {
    inner: B,
    logger: Logger,
    columns: ColumnCache,
}

impl<B: Backend> BackendAdapter<B> {
    /// Run a call into the backend with its logger current and panics caught.
    fn call<T>(&mut self, f: impl FnOnce(&mut B) -> RResult<T, RError>) -> RResult<T, RError> {
        let (inner, logger) = (&mut self.inner, &self.logger);
        guard(|| context::scoped(logger, || f(inner)))
    }

    fn call_json<Q: serde::de::DeserializeOwned, T>(
        &mut self,
        json: RStr<'_>,
        f: impl FnOnce(&mut B, Q) -> RResult<T, RError>,
    ) -> RResult<T, RError> {
        self.call(|b| match from_json::<Q>(json) {
            Ok(q) => f(b, q),
            Err(e) => RResult::RErr(e),
        })
    }
}

impl<B: Backend> RawBackend for BackendAdapter<B> {
    fn capabilities(&self) -> RString {
        let (inner, logger) = (&self.inner, &self.logger);
        match guard(|| context::scoped(logger, || RResult::ROk(to_json(&inner.capabilities())))) {
            RResult::ROk(s) => s,
            RResult::RErr(_) => "{}".into(),
        }
    }

    fn resolve(&mut self, w: RVec<RWatch>) -> RResult<RVec<RWatch>, RError> {
        self.call(|b| res(b.resolve(&boundary::watches(w)), |v| boundary::rwatches(&v)))
    }

    fn plan_install(&mut self, w: RVec<RWatch>) -> RResult<RVec<RString>, RError> {
        self.call(|b| {
            res(b.plan_install(&boundary::watches(w)), |v| {
                boundary::strings(&v)
            })
        })
    }

    fn install(&mut self, w: RVec<RWatch>) -> RResult<RVec<RString>, RError> {
        self.call(|b| res(b.install(&boundary::watches(w)), |v| boundary::strings(&v)))
    }

    fn plan_uninstall(&mut self) -> RResult<RVec<RString>, RError> {
        self.call(|b| res(b.plan_uninstall(), |v| boundary::strings(&v)))
    }

    fn uninstall(&mut self) -> RResult<RVec<RString>, RError> {
        self.call(|b| res(b.uninstall(), |v| boundary::strings(&v)))
    }

    fn render_script(&self, statements: RVec<RString>) -> RResult<RString, RError> {
        let (inner, logger) = (&self.inner, &self.logger);
        guard(|| {
            context::scoped(logger, || {
                let v = boundary::from_rstrings(statements);
                RResult::ROk(inner.render_script(&v).into())
            })
        })
    }

    fn register(
        &mut self,
        c: &RConsumer,
        tables: RVec<RString>,
        start: RStartFrom,
    ) -> RResult<RRegistered, RError> {
        self.call(|b| {
            let tables = boundary::from_rstrings(tables);
            res(
                b.register(&consumer(c), &tables, start_from(start)),
                rregistered,
            )
        })
    }

    fn unregister(&mut self, c: &RConsumer) -> RResult<bool, RError> {
        self.call(|b| res(b.unregister(&consumer(c)), |x| x))
    }

    fn fetch(&mut self, c: &RConsumer, max: u32) -> RResult<RBatch, RError> {
        let (inner, logger, columns) = (&mut self.inner, &self.logger, &mut self.columns);
        guard(|| {
            context::scoped(logger, || {
                res(inner.fetch(&consumer(c), max), |batch| RBatch {
                    changes: batch
                        .changes
                        .into_iter()
                        .map(|c| columns.into_rchange(c))
                        .collect(),
                    token: batch.token.into(),
                })
            })
        })
    }

    fn ack(&mut self, c: &RConsumer, token: RStr<'_>, upto_id: i64) -> RResult<(), RError> {
        self.call(|b| res(b.ack(&consumer(c), token.as_str(), upto_id), |()| ()))
    }

    fn wait(&mut self, timeout_ms: u64) -> RResult<bool, RError> {
        self.call(|b| res(b.wait(Duration::from_millis(timeout_ms)), |x| x))
    }

    fn reconnect(&mut self) -> RResult<(), RError> {
        self.call(|b| res(b.reconnect(), |()| ()))
    }

    fn prune(&mut self) -> RResult<u64, RError> {
        self.call(|b| res(b.prune(), |n| n))
    }

    fn touch(&mut self, c: &RConsumer) -> RResult<(), RError> {
        self.call(|b| res(b.touch(&consumer(c)), |()| ()))
    }

    fn evict_stale(&mut self, ttl_ms: u64) -> RResult<RVec<RConsumer>, RError> {
        self.call(|b| {
            res(b.evict_stale(Duration::from_millis(ttl_ms)), |v| {
                v.iter().map(RConsumer::from).collect()
            })
        })
    }

    fn lease(&mut self, request_json: RStr<'_>) -> RResult<RString, RError> {
        self.call_json(request_json, |b, r: LeaseRequest| {
            res(b.lease(&r), |s| to_json(&s))
        })
    }

    fn add_dead_letter(&mut self, letter_json: RStr<'_>) -> RResult<i64, RError> {
        self.call_json(letter_json, |b, l: DeadLetter| {
            res(b.add_dead_letter(&l), |id| id)
        })
    }

    fn dead_letters(&mut self, query_json: RStr<'_>) -> RResult<RString, RError> {
        self.call_json(query_json, |b, q: DeadLetterQuery| {
            res(b.dead_letters(&q), |v| to_json(&v))
        })
    }

    fn update_dead_letters(&mut self, update_json: RStr<'_>) -> RResult<u64, RError> {
        self.call_json(update_json, |b, u: DeadLetterUpdate| {
            res(b.update_dead_letters(&u), |n| n)
        })
    }

    fn status(&mut self) -> RResult<RString, RError> {
        self.call(|b| res(b.status(), |s| to_json(&s)))
    }

    fn scratch(&mut self, op_json: RStr<'_>) -> RResult<(), RError> {
        self.call_json(op_json, |b, op: Scratch| res(b.scratch(&op), |()| ()))
    }

    fn snapshot_chunk(&mut self, request_json: RStr<'_>) -> RResult<RChunk, RError> {
        let request = match from_json::<ChunkRequest>(request_json) {
            Ok(r) => r,
            Err(e) => return RResult::RErr(e),
        };
        let (inner, logger, columns) = (&mut self.inner, &self.logger, &mut self.columns);
        guard(|| {
            context::scoped(logger, || {
                res(inner.snapshot_chunk(&request), |chunk| RChunk {
                    rows: chunk
                        .rows
                        .into_iter()
                        .map(|c| columns.into_rchange(c))
                        .collect(),
                    watermark: chunk.watermark,
                    last: chunk.last,
                    rows_estimate: chunk.rows_estimate.into(),
                })
            })
        })
    }

    fn backfills(&mut self, request_json: RStr<'_>) -> RResult<RString, RError> {
        self.call_json(request_json, |b, r: BackfillRequest| {
            res(b.backfills(&r), |reply| to_json(&reply))
        })
    }

    fn barrier(&mut self, request_json: RStr<'_>) -> RResult<RString, RError> {
        self.call_json(request_json, |b, r: BarrierRequest| {
            res(b.barrier(&r), |reply| to_json(&reply))
        })
    }
}

fn open<B: Backend>(
    url: &str,
    options: &serde_json::Value,
    logger: Logger,
) -> Result<BackendBox, BackendError> {
    let inner = context::scoped(&logger, || B::open(url, options))?;
    Ok(RawBackend_TO::from_value(
        BackendAdapter {
            inner,
            logger,
            columns: ColumnCache::new(),
        },
        TD_Opaque,
    ))
}

#[doc(hidden)]
pub extern "C" fn open_backend<B: Backend>(
    url: RStr<'_>,
    options_json: RStr<'_>,
    logger: LoggerBox,
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
        let logger = Logger::from_host(logger);
        // In a library of its own, this library's `tracing` must reach the host.
        context::install_bridge(&logger);
        res(open::<B>(url.as_str(), &options, logger), |b| b)
    })
}

/// The backend as the boundary's trait object, opened in this process: what the host gets
/// from a backend library, without the library (for unit tests of the host). It shares
/// the host's `tracing`, so no bridge is installed.
pub fn in_process<B: Backend>(
    url: &str,
    options: &serde_json::Value,
    logger: Logger,
) -> Result<BackendBox, BackendError> {
    open::<B>(url, options, logger)
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
