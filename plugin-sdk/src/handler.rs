//! The handler side of the SDK: the [`Handler`] trait plugin authors implement, and the
//! adapter that exposes it across the boundary with panics caught.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RStr, RVec},
};
use serde::de::DeserializeOwned;

use crate::change::{Change, Op, Subscription};
use crate::ffi::{
    HandlerBox, RChange, RError, RErrorKind, RSubscription, RawHandler, RawHandler_TO,
};

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
            RErrorKind::Permanent | RErrorKind::Invalid | RErrorKind::Evicted => {
                HandlerError::Permanent(e.message.into())
            }
        }
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
/// time. Calls for one row come in commit order. Delivery is at-least-once: after a crash
/// the change that was in hand may come again, so make handlers idempotent.
pub trait Handler: Send + 'static {
    /// The plugin's name, shown by `epidemic plugin check` and in logs.
    const NAME: &'static str;

    /// Build the handler from its `[handler.config]` table.
    fn new(config: &HandlerConfig) -> Result<Self, HandlerError>
    where
        Self: Sized;

    /// The tables, columns and operations this handler wants.
    fn subscriptions(&self) -> Vec<Subscription>;

    /// Called for every change the handler subscribed to. The default calls
    /// [`Handler::insert`], [`Handler::update`] or [`Handler::delete`].
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

struct HandlerAdapter<H> {
    inner: H,
    /// The columns of the last change seen, shared with the next one when they are equal.
    columns: Option<std::sync::Arc<[String]>>,
}

impl<H: Handler> RawHandler for HandlerAdapter<H> {
    fn subscriptions(&self) -> RResult<RVec<RSubscription>, RError> {
        guard(|| {
            RResult::ROk(
                self.inner
                    .subscriptions()
                    .into_iter()
                    .map(RSubscription::from)
                    .collect(),
            )
        })
    }

    fn handle(&mut self, change: &RChange) -> RResult<(), RError> {
        guard(|| {
            let change = change.clone().into_change(self.columns.as_ref());
            self.columns = Some(change.columns.clone());
            self.inner.handle(&change).map_err(RError::from).into()
        })
    }
}

#[doc(hidden)]
pub extern "C" fn new_handler<H: Handler>(config_json: RStr<'_>) -> RResult<HandlerBox, RError> {
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
        match H::new(&HandlerConfig::from_json(value)) {
            Ok(h) => RResult::ROk(RawHandler_TO::from_value(
                HandlerAdapter {
                    inner: h,
                    columns: None,
                },
                TD_Opaque,
            )),
            Err(e) => RResult::RErr(RError::new(RErrorKind::Invalid, e.to_string())),
        }
    })
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
