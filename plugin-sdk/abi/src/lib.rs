#![allow(non_local_definitions)] // from #[sabi_trait]; harmless (abi_stable 0.11.3)
//! The stable-ABI boundary of Epidemic plugins: every type that crosses between the host
//! and a plugin library, and the root module each library exports.
//!
//! This crate is the ABI and nothing else. Its version *is* the ABI version that
//! abi_stable checks when the host loads a library: `0.2.x` loads into any `0.2.y` host,
//! `0.1` does not. The author-facing SDK (`epidemic-plugin-sdk`) and the host's loader
//! (`epidemic-plugin-host`) build on it and can change without touching it, so a helper
//! added to the SDK is not an ABI change.
//!
//! Nobody writes these types by hand: the SDK's export macros generate the plugin side,
//! the host crate the other, and both convert to plain Rust types at once.
//!
//! # How the ABI grows within 0.2
//!
//! - The root module ([`PluginModule`]) and the two trait objects ([`RawHandler`],
//!   [`RawBackend`]) are prefix types: a field or method added in 0.2.x goes after the
//!   last one, and a 0.2.0 library stays loadable (a newer host checks the library's
//!   [`PluginModule::sdk_version`] before calling a method 0.2.0 did not have).
//! - A change ([`RChange`]) is plain data passed by the thousand, so it is not a prefix
//!   type: a field added in 0.2.x travels in [`RChange::ext`] under its name, and is
//!   promoted to a field of its own in 0.3. A library that does not know a name ignores it.
//! - Operational records (dead letters, status, leases, capabilities) cross as JSON, so
//!   a field added to them is not an ABI change at all.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
    StableAbi,
};

pub use abi_stable;

/// The ABI version of this crate, which is also what a library built with it reports.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One column value.
#[repr(C, u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum RValue {
    Null,
    Int(i64),
    Float(f64),
    Text(RString),
    Bytes(RVec<u8>),
}

/// The kind of row change.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ROp {
    Insert,
    Update,
    Delete,
}

/// Where a change comes from: the live log, a snapshot of the table's rows, or a
/// watermark a backfill wrote into the log (consumed by the host, never a handler's).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ROrigin {
    Live,
    Snapshot,
    Watermark,
}

/// A field of a change added after 0.2.0 (see [`RChange::ext`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct RField {
    pub name: RString,
    pub value: RValue,
}

/// A list of column names, shared by every change of one table in a batch.
pub type RColumns = RArc<RVec<RString>>;

/// One captured row change. See `epidemic_plugin_sdk::Change` for what each field means.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RChange {
    pub id: i64,
    pub stable_id: RString,
    pub schema: ROption<RString>,
    pub table: RString,
    pub op: ROp,
    pub origin: ROrigin,
    pub key_columns: RColumns,
    pub key: RVec<RValue>,
    pub old_key: ROption<RVec<RValue>>,
    pub columns: RColumns,
    pub old: ROption<RVec<RValue>>,
    pub new: ROption<RVec<RValue>>,
    pub changed_at_us: i64,
    pub txid: ROption<i64>,
    pub commit_seq: ROption<i64>,
    pub attempt: u32,
    /// Fields added in a later 0.2.x, by name; empty in 0.2.0.
    pub ext: RVec<RField>,
}

/// What a handler wants to hear about.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RSubscription {
    pub table: RString,
    pub columns: RVec<RString>,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
}

/// Why a plugin call failed. Both handler and backend errors cross as this, and callers
/// branch on the kind, never on the message.
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
    /// A backend's consumer was evicted or its cursor is gone.
    Evicted,
    /// The backend does not support the call (an older or simpler backend).
    Unsupported,
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

/// A batch call failed at the change with this index (into the slice the handler was
/// given): the changes before it were handled, the ones after it were not tried.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RBatchError {
    pub index: u32,
    pub error: RError,
}

/// Which kind of plugin a library is.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Handler,
    Backend,
}

/// A log level, as `tracing` has them.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// The host's logger, handed to a plugin at start-up: what the plugin logs appears in
/// the daemon's log, in the daemon's format.
#[sabi_trait]
pub trait RawLogger: Clone + Send + Sync {
    /// Whether a record at this level would be written (so a plugin can skip formatting).
    fn enabled(&self, level: RLevel) -> bool;

    /// Write one record: `fields` are name/value pairs already formatted as text.
    #[sabi(last_prefix_field)]
    fn log(
        &self,
        level: RLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RVec<Tuple2<RString, RString>>,
    );
}

pub type LoggerBox = RawLogger_TO<'static, RArc<()>>;

/// What the host tells a handler at start-up.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct RHandlerContext {
    /// The daemon's name (`daemon.name`).
    pub daemon: RString,
    /// The `[[handler]]` entry's name.
    pub handler: RString,
    pub logger: LoggerBox,
}

/// A snapshot of a table begins or ends for a handler (see `SnapshotEvent` in the SDK).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RSnapshotEvent {
    pub table: RString,
    /// false: it begins; true: it ended.
    pub ended: bool,
    /// It begins again after a restart of the daemon (so this instance did not see its
    /// first rows); for an end: whether this instance saw every row of it.
    pub resumed: bool,
    /// Rows delivered (at the end).
    pub rows: u64,
}

/// A handler instance as the host sees it. Implemented only by the SDK's adapter, which
/// catches panics on the plugin's side of the boundary.
#[sabi_trait]
pub trait RawHandler: Send {
    fn subscriptions(&self) -> RResult<RVec<RSubscription>, RError>;

    /// Handle the changes in order; on failure, say at which one.
    fn handle_batch(&mut self, changes: RSlice<'_, RChange>) -> RResult<(), RBatchError>;

    /// A snapshot of a table begins or ends.
    #[sabi(last_prefix_field)]
    fn snapshot(&mut self, event: &RSnapshotEvent) -> RResult<(), RError>;
}

pub type HandlerBox = RawHandler_TO<'static, RBox<()>>;

/// A consumer: one handler of one daemon.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RConsumer {
    pub daemon: RString,
    pub handler: RString,
}

/// What the backend must capture for one table.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RWatch {
    pub table: RString,
    pub columns: RVec<RString>,
    /// Key columns named in the config; empty: the table's primary key.
    pub key: RVec<RString>,
    /// The type of each of `columns` (`int`, `float`, `text`, …), as `resolve` found
    /// them; empty when unknown.
    pub types: RVec<RString>,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RBatch {
    pub changes: RVec<RChange>,
    pub token: RString,
}

/// One chunk of a table's rows, read for a backfill.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RChunk {
    pub rows: RVec<RChange>,
    pub watermark: i64,
    pub last: bool,
    pub rows_estimate: ROption<u64>,
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

/// A backend connection as the host sees it. See `epidemic_plugin_sdk::backend::Backend`
/// for what each call means. Records that are not plain data cross as JSON.
#[sabi_trait]
pub trait RawBackend: Send {
    /// `Capabilities` as JSON.
    fn capabilities(&self) -> RString;
    fn resolve(&mut self, watches: RVec<RWatch>) -> RResult<RVec<RWatch>, RError>;
    fn plan_install(&mut self, watches: RVec<RWatch>) -> RResult<RVec<RString>, RError>;
    fn install(&mut self, watches: RVec<RWatch>) -> RResult<RVec<RString>, RError>;
    fn plan_uninstall(&mut self) -> RResult<RVec<RString>, RError>;
    fn uninstall(&mut self) -> RResult<RVec<RString>, RError>;
    fn render_script(&self, statements: RVec<RString>) -> RResult<RString, RError>;
    fn register(
        &mut self,
        consumer: &RConsumer,
        tables: RVec<RString>,
        start: RStartFrom,
    ) -> RResult<RRegistered, RError>;
    fn unregister(&mut self, consumer: &RConsumer) -> RResult<bool, RError>;
    fn fetch(&mut self, consumer: &RConsumer, max: u32) -> RResult<RBatch, RError>;
    fn ack(&mut self, consumer: &RConsumer, token: RStr<'_>, upto_id: i64) -> RResult<(), RError>;
    fn wait(&mut self, timeout_ms: u64) -> RResult<bool, RError>;
    fn reconnect(&mut self) -> RResult<(), RError>;
    fn prune(&mut self) -> RResult<u64, RError>;
    fn touch(&mut self, consumer: &RConsumer) -> RResult<(), RError>;
    fn evict_stale(&mut self, ttl_ms: u64) -> RResult<RVec<RConsumer>, RError>;
    /// `LeaseRequest` in, `LeaseState` out, as JSON.
    fn lease(&mut self, request_json: RStr<'_>) -> RResult<RString, RError>;
    fn add_dead_letter(&mut self, letter_json: RStr<'_>) -> RResult<i64, RError>;
    fn dead_letters(&mut self, query_json: RStr<'_>) -> RResult<RString, RError>;
    fn update_dead_letters(&mut self, update_json: RStr<'_>) -> RResult<u64, RError>;
    fn status(&mut self) -> RResult<RString, RError>;
    fn scratch(&mut self, op_json: RStr<'_>) -> RResult<(), RError>;
    /// `ChunkRequest` as JSON in.
    fn snapshot_chunk(&mut self, request_json: RStr<'_>) -> RResult<RChunk, RError>;
    /// `BackfillRequest` in, `BackfillReply` out, as JSON.
    fn backfills(&mut self, request_json: RStr<'_>) -> RResult<RString, RError>;
    /// `BarrierRequest` in, `BarrierReply` out, as JSON.
    #[sabi(last_prefix_field)]
    fn barrier(&mut self, request_json: RStr<'_>) -> RResult<RString, RError>;
}

pub type BackendBox = RawBackend_TO<'static, RBox<()>>;

#[doc(hidden)]
pub extern "C" fn no_handler(_: RStr<'_>, _: RHandlerContext) -> RResult<HandlerBox, RError> {
    RResult::RErr(RError::new(
        RErrorKind::Invalid,
        "this library is a backend plugin, not a handler plugin",
    ))
}

#[doc(hidden)]
pub extern "C" fn no_backend(
    _: RStr<'_>,
    _: RStr<'_>,
    _: LoggerBox,
) -> RResult<BackendBox, RError> {
    RResult::RErr(RError::new(
        RErrorKind::Invalid,
        "this library is a handler plugin, not a backend plugin",
    ))
}

/// The root module every Epidemic plugin library exports.
///
/// A prefix type: fields may only be added at the end, and only in a 0.2.x release.
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
    /// The `epidemic-plugin-sdk` version the plugin was built with (the ABI version is
    /// in the library's header).
    pub sdk_version: RStr<'static>,
    /// For a backend: the URL schemes it serves, comma-separated (`postgres,postgresql`).
    pub url_schemes: RStr<'static>,
    /// Creates a handler; a backend library's returns an error.
    pub new_handler: extern "C" fn(
        config_json: RStr<'_>,
        context: RHandlerContext,
    ) -> RResult<HandlerBox, RError>,
    /// Opens a backend connection; a handler library's returns an error. What the backend
    /// logs goes to `logger`.
    #[sabi(last_prefix_field)]
    pub open_backend: extern "C" fn(
        url: RStr<'_>,
        options_json: RStr<'_>,
        logger: LoggerBox,
    ) -> RResult<BackendBox, RError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "epidemic_plugin";
    const NAME: &'static str = "epidemic plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
