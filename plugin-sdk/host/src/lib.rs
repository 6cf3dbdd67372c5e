//! The host side of Epidemic plugins: load a library, check it, and wrap its handler or
//! backend in plain Rust types. Used by the `epidemic` binary and by tests; plugin authors
//! never need it.
//!
//! Libraries are loaded with `lib_header_from_path(..).init_root_module()` rather than
//! `RootModule::load_from_file`, which caches one module per root-module type per
//! process and would hand back the first plugin for every later path. Libraries are
//! never unloaded.
//!
//! [`HostHandler`] and [`HostBackend`] can also wrap a handler or backend built in this
//! process ([`HostHandler::in_process`], [`HostBackend::in_process`]): the same adapters
//! and conversions as a loaded library, without the library, for the host's unit tests.

mod logger;

use std::path::{Path, PathBuf};
use std::time::Duration;

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use abi_stable::std_types::{RResult, RStr, RString, RVec};
use epidemic_plugin_abi::{
    BackendBox, HandlerBox, PluginKind, PluginModuleRef, RConsumer, RError, RHandlerContext,
    ABI_VERSION,
};
use epidemic_plugin_sdk::backend::adapter::{registered, rstart_from};
use epidemic_plugin_sdk::backend::{
    Backend, BackendError, Batch, Capabilities, Consumer, Registered, StartFrom, Watch,
};
use epidemic_plugin_sdk::boundary::{self, ColumnCache, RChange};
use epidemic_plugin_sdk::ops::{
    DeadLetter, DeadLetterQuery, DeadLetterUpdate, LeaseRequest, LeaseState, Scratch, Status,
};
use epidemic_plugin_sdk::{BatchError, Change, Context, Handler, HandlerError, Subscription};

pub use logger::host_logger;

/// Why a library could not be used as a plugin. Every message is one line and names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {path}: file not found")]
    NotFound { path: PathBuf },
    #[error("plugin {path}: cannot load library: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("plugin {path}: not an Epidemic plugin (no Epidemic root module in it)")]
    NotAPlugin { path: PathBuf },
    #[error(
        "plugin {path}: built against epidemic-plugin-sdk {plugin_sdk}, this epidemic uses plugin ABI {host_sdk}; rebuild the plugin against epidemic-plugin-sdk {host_series}"
    )]
    IncompatibleVersion {
        path: PathBuf,
        plugin_sdk: String,
        host_sdk: String,
        host_series: String,
    },
    #[error(
        "plugin {path}: its SDK interface differs from this epidemic's (plugin SDK {plugin_sdk}, host SDK {host_sdk}); rebuild the plugin against SDK {host_sdk}"
    )]
    IncompatibleLayout {
        path: PathBuf,
        plugin_sdk: String,
        host_sdk: String,
        /// abi_stable's full report, often hundreds of lines; shown only on request.
        detail: String,
    },
    #[error("plugin {path}: is a {found} plugin, expected a {expected} plugin")]
    WrongKind {
        path: PathBuf,
        found: &'static str,
        expected: &'static str,
    },
}

impl LoadError {
    /// abi_stable's long explanation, when there is one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            LoadError::IncompatibleLayout { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

fn kind_name(k: PluginKind) -> &'static str {
    match k {
        PluginKind::Handler => "handler",
        PluginKind::Backend => "backend",
    }
}

/// A loaded plugin library.
#[derive(Clone)]
pub struct Library {
    pub path: PathBuf,
    pub kind: PluginKind,
    pub name: String,
    pub version: String,
    /// The plugin ABI version the library was built with (its header's).
    pub abi_version: String,
    /// The `epidemic-plugin-sdk` version the plugin was built against.
    pub sdk_version: String,
    pub url_schemes: Vec<String>,
    module: PluginModuleRef,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("abi_version", &self.abi_version)
            .field("sdk_version", &self.sdk_version)
            .finish()
    }
}

/// Load and check a plugin library.
pub fn load(path: &Path) -> Result<Library, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound {
            path: path.to_owned(),
        });
    }
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path: path.to_owned(),
        },
        LibraryError::OpenError { err, .. } => LoadError::Open {
            path: path.to_owned(),
            reason: one_line(&err.to_string()),
        },
        other => LoadError::Open {
            path: path.to_owned(),
            reason: one_line(&other.to_string()),
        },
    })?;
    let plugin_sdk = header.version_strings().version.to_string();
    let host_sdk = ABI_VERSION.to_owned();
    let host_series = compat_series(&host_sdk);
    // Semver as abi_stable applies it: 0.x.* only with 0.x.*, otherwise same major.
    // Checked here first so a version mismatch is reported as one, whatever layout
    // differences come with it.
    if compat_series(&plugin_sdk) != compat_series(&host_sdk) {
        return Err(LoadError::IncompatibleVersion {
            path: path.to_owned(),
            plugin_sdk,
            host_sdk,
            host_series,
        });
    }
    let module = header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| match e {
            LibraryError::IncompatibleVersionNumber { .. } => LoadError::IncompatibleVersion {
                path: path.to_owned(),
                plugin_sdk: plugin_sdk.clone(),
                host_sdk: host_sdk.clone(),
                host_series: host_series.clone(),
            },
            other => LoadError::IncompatibleLayout {
                path: path.to_owned(),
                plugin_sdk: plugin_sdk.clone(),
                host_sdk: host_sdk.clone(),
                detail: other.to_string(),
            },
        })?;
    // A plugin built with a different root-module name is a different kind of library
    // altogether; abi_stable reports that through the version strings above.
    let _ = PluginModuleRef::NAME;
    Ok(Library {
        path: path.to_owned(),
        kind: module.kind(),
        name: module.name().to_string(),
        version: module.version().to_string(),
        sdk_version: module.sdk_version().to_string(),
        abi_version: plugin_sdk,
        url_schemes: module
            .url_schemes()
            .as_str()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        module,
    })
}

/// The part of a version that must match for two SDKs to be compatible: `0.1` for
/// `0.1.7`, `2` for `2.3.1`.
fn compat_series(version: &str) -> String {
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or_default();
    if major == "0" {
        format!("0.{}", parts.next().unwrap_or_default())
    } else {
        major.to_owned()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Library {
    fn expect(&self, kind: PluginKind) -> Result<(), LoadError> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(LoadError::WrongKind {
                path: self.path.clone(),
                found: kind_name(self.kind),
                expected: kind_name(kind),
            })
        }
    }

    pub fn expect_handler(&self) -> Result<(), LoadError> {
        self.expect(PluginKind::Handler)
    }

    pub fn expect_backend(&self) -> Result<(), LoadError> {
        self.expect(PluginKind::Backend)
    }

    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }

    /// Create a handler instance from its config table, for the `[[handler]]` entry
    /// `handler` of daemon `daemon`; what it logs goes to this process's `tracing`.
    pub fn new_handler(
        &self,
        config: &serde_json::Value,
        daemon: &str,
        handler: &str,
    ) -> Result<HostHandler, HandlerError> {
        let new = self.module.new_handler();
        let json = config.to_string();
        let ctx = RHandlerContext {
            daemon: daemon.into(),
            handler: handler.into(),
            logger: host_logger(handler),
        };
        match new(RStr::from_str(&json), ctx) {
            RResult::ROk(inner) => Ok(HostHandler::new(inner)),
            RResult::RErr(e) => Err(e.into()),
        }
    }

    /// Open a backend connection; what the backend logs goes to this process's `tracing`.
    pub fn open_backend(
        &self,
        url: &str,
        options: &serde_json::Value,
    ) -> Result<HostBackend, BackendError> {
        let open = self.module.open_backend();
        let json = options.to_string();
        match open(
            RStr::from_str(url),
            RStr::from_str(&json),
            host_logger(&self.name),
        ) {
            RResult::ROk(inner) => Ok(HostBackend::new(inner)),
            RResult::RErr(e) => Err(e.into()),
        }
    }
}

fn ok<T, E: From<RError>>(r: RResult<T, RError>) -> Result<T, E> {
    r.into_result().map_err(E::from)
}

/// A handler instance on the host's side of the boundary.
pub struct HostHandler {
    inner: HandlerBox,
    columns: ColumnCache,
    /// The last batch, converted; reused so its buffer is allocated once.
    batch: Vec<RChange>,
}

impl HostHandler {
    fn new(inner: HandlerBox) -> Self {
        HostHandler {
            inner,
            columns: ColumnCache::new(),
            batch: Vec::new(),
        }
    }

    /// A handler built in this process, behind the same adapter a plugin library uses
    /// (for the host's unit tests). What it logs goes to this process's `tracing`.
    pub fn in_process<H: Handler>(
        config: &serde_json::Value,
        daemon: &str,
        handler: &str,
    ) -> Result<HostHandler, HandlerError> {
        let ctx = Context::new(
            daemon,
            handler,
            epidemic_plugin_sdk::Logger::from_host(host_logger(handler)),
        );
        epidemic_plugin_sdk::handler::in_process::<H>(config, &ctx).map(HostHandler::new)
    }

    pub fn subscriptions(&self) -> Result<Vec<Subscription>, HandlerError> {
        ok::<_, HandlerError>(self.inner.subscriptions())
            .map(|v| v.into_iter().map(Subscription::from).collect())
    }

    /// Hand the changes to the handler in one call. On failure, the index is into
    /// `changes`: the ones before it were handled.
    pub fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.batch.clear();
        for c in changes {
            let rc = self.columns.to_rchange(c);
            self.batch.push(rc);
        }
        match self.inner.handle_batch(self.batch.as_slice().into()) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(e) => Err(BatchError::new(
                (e.index as usize).min(changes.len() - 1),
                e.error.into(),
            )),
        }
    }

    /// Tell the handler a snapshot of a table begins or ends.
    pub fn snapshot(
        &mut self,
        event: &epidemic_plugin_sdk::SnapshotEvent,
    ) -> Result<(), HandlerError> {
        ok(self
            .inner
            .snapshot(&epidemic_plugin_sdk::handler::rsnapshot_event(event)))
    }

    /// Hand one change to the handler.
    pub fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        self.handle_batch(std::slice::from_ref(change))
            .map_err(|e| e.error)
    }
}

/// A backend connection on the host's side of the boundary.
pub struct HostBackend {
    inner: BackendBox,
    columns: ColumnCache,
}

impl HostBackend {
    fn new(inner: BackendBox) -> Self {
        HostBackend {
            inner,
            columns: ColumnCache::new(),
        }
    }

    /// A backend opened in this process, behind the same adapter a backend library uses
    /// (for the host's unit tests).
    pub fn in_process<B: Backend>(
        url: &str,
        options: &serde_json::Value,
    ) -> Result<HostBackend, BackendError> {
        let logger = epidemic_plugin_sdk::Logger::from_host(host_logger(B::NAME));
        epidemic_plugin_sdk::backend::adapter::in_process::<B>(url, options, logger)
            .map(HostBackend::new)
    }

    /// What the backend can do beyond the minimum (defaults when it says nothing).
    pub fn capabilities(&self) -> Capabilities {
        serde_json::from_str(&self.inner.capabilities()).unwrap_or_default()
    }

    pub fn plan_install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        ok(self.inner.plan_install(boundary::rwatches(watches))).map(strings)
    }

    pub fn install(&mut self, watches: &[Watch]) -> Result<Vec<String>, BackendError> {
        ok(self.inner.install(boundary::rwatches(watches))).map(strings)
    }

    pub fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        ok(self.inner.plan_uninstall()).map(strings)
    }

    pub fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        ok(self.inner.uninstall()).map(strings)
    }

    pub fn register(
        &mut self,
        consumer: &Consumer,
        tables: &[String],
        start: StartFrom,
    ) -> Result<Registered, BackendError> {
        let tables = tables.iter().map(|t| RString::from(t.as_str())).collect();
        ok(self
            .inner
            .register(&RConsumer::from(consumer), tables, rstart_from(start)))
        .map(registered)
    }

    pub fn fetch(&mut self, consumer: &Consumer, max: u32) -> Result<Batch, BackendError> {
        let b = ok::<_, BackendError>(self.inner.fetch(&RConsumer::from(consumer), max))?;
        let changes = b
            .changes
            .iter()
            .map(|c| self.columns.to_change(c))
            .collect();
        Ok(Batch {
            changes,
            token: b.token.into(),
        })
    }

    pub fn ack(
        &mut self,
        consumer: &Consumer,
        token: &str,
        upto_id: i64,
    ) -> Result<(), BackendError> {
        ok(self
            .inner
            .ack(&RConsumer::from(consumer), RStr::from_str(token), upto_id))
    }

    pub fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        ok(self
            .inner
            .wait(timeout.as_millis().min(u64::MAX as u128) as u64))
    }

    pub fn prune(&mut self) -> Result<u64, BackendError> {
        ok(self.inner.prune())
    }

    pub fn reconnect(&mut self) -> Result<(), BackendError> {
        ok(self.inner.reconnect())
    }

    pub fn unregister(&mut self, consumer: &Consumer) -> Result<bool, BackendError> {
        ok(self.inner.unregister(&RConsumer::from(consumer)))
    }

    pub fn touch(&mut self, consumer: &Consumer) -> Result<(), BackendError> {
        ok(self.inner.touch(&RConsumer::from(consumer)))
    }

    pub fn evict_stale(&mut self, ttl: Duration) -> Result<Vec<Consumer>, BackendError> {
        let v = ok::<_, BackendError>(self.inner.evict_stale(ttl.as_millis() as u64))?;
        Ok(v.into_iter()
            .map(|c| Consumer {
                daemon: c.daemon.into(),
                handler: c.handler.into(),
            })
            .collect())
    }

    pub fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        let json = serde_json::to_string(letter).map_err(|e| BackendError::Other(e.to_string()))?;
        ok(self.inner.add_dead_letter(RStr::from_str(&json)))
    }

    pub fn dead_letters(
        &mut self,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let json = serde_json::to_string(query).map_err(|e| BackendError::Other(e.to_string()))?;
        let out = ok::<_, BackendError>(self.inner.dead_letters(RStr::from_str(&json)))?;
        serde_json::from_str(&out)
            .map_err(|e| BackendError::Other(format!("backend sent bad dead letters: {e}")))
    }

    pub fn update_dead_letters(&mut self, update: &DeadLetterUpdate) -> Result<u64, BackendError> {
        let json = serde_json::to_string(update).map_err(|e| BackendError::Other(e.to_string()))?;
        ok(self.inner.update_dead_letters(RStr::from_str(&json)))
    }

    /// The statements as a script for the database's command-line client.
    pub fn render_script(&self, statements: &[String]) -> Result<String, BackendError> {
        let v = statements
            .iter()
            .map(|s| RString::from(s.as_str()))
            .collect();
        ok::<RString, BackendError>(self.inner.render_script(v)).map(String::from)
    }

    pub fn scratch(&mut self, op: &Scratch) -> Result<(), BackendError> {
        let json = serde_json::to_string(op).map_err(|e| BackendError::Other(e.to_string()))?;
        ok(self.inner.scratch(RStr::from_str(&json)))
    }

    /// The watches in the catalog's spelling, with their keys (see `Backend::resolve`).
    pub fn resolve(&mut self, watches: &[Watch]) -> Result<Vec<Watch>, BackendError> {
        ok::<_, BackendError>(self.inner.resolve(boundary::rwatches(watches)))
            .map(boundary::watches)
    }

    pub fn lease(&mut self, request: &LeaseRequest) -> Result<LeaseState, BackendError> {
        let json =
            serde_json::to_string(request).map_err(|e| BackendError::Other(e.to_string()))?;
        let out = ok::<_, BackendError>(self.inner.lease(RStr::from_str(&json)))?;
        serde_json::from_str(&out)
            .map_err(|e| BackendError::Other(format!("backend sent a bad lease state: {e}")))
    }

    /// The next chunk of a table's rows for a backfill, and the watermark after it.
    pub fn snapshot_chunk(
        &mut self,
        request: &epidemic_plugin_sdk::backend::ChunkRequest,
    ) -> Result<epidemic_plugin_sdk::backend::Chunk, BackendError> {
        let json =
            serde_json::to_string(request).map_err(|e| BackendError::Other(e.to_string()))?;
        let c = ok::<_, BackendError>(self.inner.snapshot_chunk(RStr::from_str(&json)))?;
        Ok(epidemic_plugin_sdk::backend::Chunk {
            rows: c.rows.iter().map(|r| self.columns.to_change(r)).collect(),
            watermark: c.watermark,
            last: c.last,
            rows_estimate: c.rows_estimate.into_option(),
        })
    }

    /// Backfill requests and progress kept in the database.
    pub fn backfills(
        &mut self,
        request: &epidemic_plugin_sdk::backend::BackfillRequest,
    ) -> Result<epidemic_plugin_sdk::backend::BackfillReply, BackendError> {
        let json =
            serde_json::to_string(request).map_err(|e| BackendError::Other(e.to_string()))?;
        let out = ok::<_, BackendError>(self.inner.backfills(RStr::from_str(&json)))?;
        serde_json::from_str(&out)
            .map_err(|e| BackendError::Other(format!("backend sent bad backfills: {e}")))
    }

    /// Fences and laggards for `epidemic wait`.
    pub fn barrier(
        &mut self,
        request: &epidemic_plugin_sdk::backend::BarrierRequest,
    ) -> Result<epidemic_plugin_sdk::backend::BarrierReply, BackendError> {
        let json =
            serde_json::to_string(request).map_err(|e| BackendError::Other(e.to_string()))?;
        let out = ok::<_, BackendError>(self.inner.barrier(RStr::from_str(&json)))?;
        serde_json::from_str(&out)
            .map_err(|e| BackendError::Other(format!("backend sent a bad barrier reply: {e}")))
    }

    pub fn status(&mut self) -> Result<Status, BackendError> {
        let out = ok::<_, BackendError>(self.inner.status())?;
        serde_json::from_str(&out)
            .map_err(|e| BackendError::Other(format!("backend sent a bad status: {e}")))
    }
}

fn strings(v: RVec<RString>) -> Vec<String> {
    v.into_iter().map(String::from).collect()
}
