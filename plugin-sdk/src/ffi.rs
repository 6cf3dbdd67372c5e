#![allow(non_local_definitions)] // from #[sabi_trait]; harmless (abi_stable 0.11.3)
//! The stable-ABI boundary: every type that crosses between the host and a plugin
//! library, and the root module each library exports.
//!
//! Plugin authors never touch this module; [`crate::export_handler!`] and
//! [`crate::export_backend!`] generate what is needed. Conversions to and from the
//! plain types of [`crate::change`] are here so both sides convert the same way.

use std::sync::Arc;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::change::{Change, Op, Ops, Subscription, Value};

/// Stable-ABI twin of [`Value`].
#[repr(C, u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum RValue {
    Null,
    Int(i64),
    Float(f64),
    Text(RString),
    Bytes(RVec<u8>),
}

impl From<Value> for RValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => RValue::Null,
            Value::Int(i) => RValue::Int(i),
            Value::Float(f) => RValue::Float(f),
            Value::Text(s) => RValue::Text(s.into()),
            Value::Bytes(b) => RValue::Bytes(b.into()),
        }
    }
}

impl From<RValue> for Value {
    fn from(v: RValue) -> Self {
        match v {
            RValue::Null => Value::Null,
            RValue::Int(i) => Value::Int(i),
            RValue::Float(f) => Value::Float(f),
            RValue::Text(s) => Value::Text(s.into()),
            RValue::Bytes(b) => Value::Bytes(b.into()),
        }
    }
}

/// Stable-ABI twin of [`Change`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RChange {
    pub id: i64,
    pub table: RString,
    pub op: Op,
    pub columns: RVec<RString>,
    pub old: ROption<RVec<RValue>>,
    pub new: ROption<RVec<RValue>>,
    pub changed_at_us: i64,
}

fn rvalues(v: Option<Vec<Value>>) -> ROption<RVec<RValue>> {
    v.map(|vals| vals.into_iter().map(RValue::from).collect())
        .into()
}

fn values(v: ROption<RVec<RValue>>) -> Option<Vec<Value>> {
    v.into_option()
        .map(|vals| vals.into_iter().map(Value::from).collect())
}

impl From<Change> for RChange {
    fn from(c: Change) -> Self {
        RChange {
            id: c.id,
            table: c.table.into(),
            op: c.op,
            columns: c
                .columns
                .iter()
                .map(|s| RString::from(s.as_str()))
                .collect(),
            old: rvalues(c.old),
            new: rvalues(c.new),
            changed_at_us: c.changed_at_us,
        }
    }
}

impl RChange {
    /// Convert to the plain type, sharing `columns` when the caller already has them.
    pub fn into_change(self, columns: Option<&Arc<[String]>>) -> Change {
        let columns = match columns {
            Some(c)
                if c.len() == self.columns.len()
                    && c.iter().zip(&self.columns).all(|(a, b)| a == b.as_str()) =>
            {
                c.clone()
            }
            _ => self.columns.into_iter().map(String::from).collect(),
        };
        Change {
            id: self.id,
            table: self.table.into(),
            op: self.op,
            columns,
            old: values(self.old),
            new: values(self.new),
            changed_at_us: self.changed_at_us,
        }
    }
}

/// Stable-ABI twin of [`Subscription`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RSubscription {
    pub table: RString,
    pub columns: RVec<RString>,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
}

impl From<Subscription> for RSubscription {
    fn from(s: Subscription) -> Self {
        RSubscription {
            table: s.table.into(),
            columns: s.columns.into_iter().map(RString::from).collect(),
            insert: s.ops.insert,
            update: s.ops.update,
            delete: s.ops.delete,
        }
    }
}

impl From<RSubscription> for Subscription {
    fn from(s: RSubscription) -> Self {
        Subscription {
            table: s.table.into(),
            columns: s.columns.into_iter().map(String::from).collect(),
            ops: Ops {
                insert: s.insert,
                update: s.update,
                delete: s.delete,
            },
        }
    }
}

/// Why a plugin call failed. Both handler and backend errors cross as this.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RErrorKind {
    /// Worth trying again later (a handler's transient failure).
    Retryable,
    /// Will fail the same way every time.
    Permanent,
    /// The plugin panicked; the SDK caught it on the plugin's side.
    Panic,
    /// The database connection is gone or unusable; reconnecting may help.
    Connection,
    /// Bad input: config, identifiers, missing tables or columns.
    Invalid,
    /// A backend's consumer was evicted or its cursor is gone (`BackendError::Evicted`).
    Evicted,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RError {
    pub kind: RErrorKind,
    pub message: RString,
}

impl RError {
    pub fn new(kind: RErrorKind, message: impl Into<String>) -> Self {
        RError {
            kind,
            message: message.into().into(),
        }
    }
}

/// Which kind of plugin a library is.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Handler,
    Backend,
}

/// A handler instance as the host sees it. Implemented only by the SDK's adapter, which
/// catches panics on the plugin's side of the boundary.
#[sabi_trait]
pub trait RawHandler: Send {
    fn subscriptions(&self) -> RResult<RVec<RSubscription>, RError>;

    #[sabi(last_prefix_field)]
    fn handle(&mut self, change: &RChange) -> RResult<(), RError>;
}

pub type HandlerBox = RawHandler_TO<'static, RBox<()>>;

/// A consumer: one handler of one daemon.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RConsumer {
    pub daemon: RString,
    pub handler: RString,
}

/// What the backend must capture for one table: the union of every handler's columns.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RWatch {
    pub table: RString,
    pub columns: RVec<RString>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RBatch {
    pub changes: RVec<RChange>,
    pub token: RString,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RStartFrom {
    Now,
    Oldest,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RRegistered {
    /// First time this consumer was seen.
    New,
    /// The consumer already had a cursor.
    Existing,
    /// The consumer had been evicted; its cursor was reset.
    Evicted,
}

/// A backend connection as the host sees it. See [`crate::backend::Backend`] for what
/// each call means.
#[sabi_trait]
pub trait RawBackend: Send {
    fn plan_install(&mut self, watches: RVec<RWatch>) -> RResult<RVec<RString>, RError>;
    fn install(&mut self, watches: RVec<RWatch>) -> RResult<RVec<RString>, RError>;
    fn plan_uninstall(&mut self) -> RResult<RVec<RString>, RError>;
    fn uninstall(&mut self) -> RResult<RVec<RString>, RError>;
    fn register(
        &mut self,
        consumer: &RConsumer,
        tables: RVec<RString>,
        start: RStartFrom,
    ) -> RResult<RRegistered, RError>;
    fn fetch(&mut self, consumer: &RConsumer, max: u32) -> RResult<RBatch, RError>;
    fn ack(&mut self, consumer: &RConsumer, token: RStr<'_>, upto_id: i64) -> RResult<(), RError>;
    fn wait(&mut self, timeout_ms: u64) -> RResult<bool, RError>;
    fn prune(&mut self) -> RResult<u64, RError>;
    fn reconnect(&mut self) -> RResult<(), RError>;
    fn unregister(&mut self, consumer: &RConsumer) -> RResult<bool, RError>;
    fn touch(&mut self, consumer: &RConsumer) -> RResult<(), RError>;
    fn evict_stale(&mut self, ttl_ms: u64) -> RResult<RVec<RConsumer>, RError>;
    /// Operational records cross as JSON (see [`crate::ops`]).
    fn add_dead_letter(&mut self, letter_json: RStr<'_>) -> RResult<i64, RError>;
    fn dead_letters(&mut self, query_json: RStr<'_>) -> RResult<RString, RError>;
    fn update_dead_letters(&mut self, update_json: RStr<'_>) -> RResult<u64, RError>;
    fn status(&mut self) -> RResult<RString, RError>;
    fn scratch(&mut self, op_json: RStr<'_>) -> RResult<(), RError>;
    #[sabi(last_prefix_field)]
    fn render_script(&self, statements: RVec<RString>) -> RResult<RString, RError>;
    fn resolve(&mut self, watches: RVec<RWatch>) -> RResult<RVec<RWatch>, RError>;
    /// [`crate::ops::LeaseRequest`] in, [`crate::ops::LeaseState`] out, as JSON.
    fn lease(&mut self, request_json: RStr<'_>) -> RResult<RString, RError>;
}

pub type BackendBox = RawBackend_TO<'static, RBox<()>>;

#[doc(hidden)]
pub extern "C" fn no_handler(_: RStr<'_>) -> RResult<HandlerBox, RError> {
    RResult::RErr(RError::new(
        RErrorKind::Invalid,
        "this library is a backend plugin, not a handler plugin",
    ))
}

#[doc(hidden)]
pub extern "C" fn no_backend(_: RStr<'_>, _: RStr<'_>) -> RResult<BackendBox, RError> {
    RResult::RErr(RError::new(
        RErrorKind::Invalid,
        "this library is a handler plugin, not a backend plugin",
    ))
}

/// The root module every Epidemic plugin library exports.
///
/// A prefix type: fields may only be added at the end, and only in a minor SDK release.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    pub kind: PluginKind,
    /// The plugin's name (`maildir`, `sqlite`).
    pub name: RStr<'static>,
    /// The plugin crate's own version.
    pub version: RStr<'static>,
    /// For a backend: the URL schemes it serves, comma-separated (`postgres,postgresql`).
    pub url_schemes: RStr<'static>,
    /// Creates a handler; a backend library's returns an error.
    pub new_handler: extern "C" fn(config_json: RStr<'_>) -> RResult<HandlerBox, RError>,
    /// Opens a backend connection; a handler library's returns an error.
    #[sabi(last_prefix_field)]
    pub open_backend:
        extern "C" fn(url: RStr<'_>, options_json: RStr<'_>) -> RResult<BackendBox, RError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "epidemic_plugin";
    const NAME: &'static str = "epidemic plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The SDK version this crate is, which is also what a plugin built with it reports.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");
