//! What a plugin learns from the host at start-up ([`Context`]) and how it logs
//! ([`Logger`]).
//!
//! A plugin's log lines belong in the daemon's log, in the daemon's format (`--log-format
//! json` included). A plugin library has its own copy of `tracing` with no subscriber,
//! so the SDK installs one in it that forwards every event to the host's logger: plugin
//! code simply uses `tracing::info!` and friends (or [`Logger`] directly). An event goes
//! to the logger of the handler whose call is running on that thread; from a thread the
//! plugin started itself, to the first handler's. Spans are not forwarded.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::{Mutex, Once};

use abi_stable::std_types::{RString, RVec, Tuple2};
use epidemic_plugin_abi::{LoggerBox, RLevel};
pub use tracing::Level;

/// Where a plugin's log lines go: the host's log, or stderr outside a host (unit tests).
#[derive(Clone, Default)]
pub struct Logger {
    host: Option<LoggerBox>,
}

impl std::fmt::Debug for Logger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.host.is_some() {
            "Logger(host)"
        } else {
            "Logger(stderr)"
        })
    }
}

fn rlevel(level: Level) -> RLevel {
    match level {
        Level::TRACE => RLevel::Trace,
        Level::DEBUG => RLevel::Debug,
        Level::INFO => RLevel::Info,
        Level::WARN => RLevel::Warn,
        _ => RLevel::Error,
    }
}

impl Logger {
    /// A logger writing to the host's log.
    pub fn from_host(host: LoggerBox) -> Logger {
        Logger { host: Some(host) }
    }

    /// A logger writing to stderr (what [`crate::testing`] uses).
    pub fn stderr() -> Logger {
        Logger { host: None }
    }

    /// Whether a line at `level` would be written.
    pub fn enabled(&self, level: Level) -> bool {
        match &self.host {
            Some(h) => h.enabled(rlevel(level)),
            None => level <= Level::INFO,
        }
    }

    /// Write one line with name/value fields.
    pub fn log_with(&self, level: Level, target: &str, message: &str, fields: &[(&str, String)]) {
        match &self.host {
            Some(h) => {
                let fields: RVec<Tuple2<RString, RString>> = fields
                    .iter()
                    .map(|(k, v)| Tuple2(RString::from(*k), RString::from(v.as_str())))
                    .collect();
                h.log(rlevel(level), target.into(), message.into(), fields);
            }
            None if self.enabled(level) => {
                let mut line = format!("{level} {target}: {message}");
                for (k, v) in fields {
                    let _ = write!(line, " {k}={v}");
                }
                eprintln!("{line}");
            }
            None => {}
        }
    }

    pub fn log(&self, level: Level, message: &str) {
        self.log_with(level, "plugin", message, &[]);
    }

    pub fn error(&self, message: &str) {
        self.log(Level::ERROR, message);
    }

    pub fn warn(&self, message: &str) {
        self.log(Level::WARN, message);
    }

    pub fn info(&self, message: &str) {
        self.log(Level::INFO, message);
    }

    pub fn debug(&self, message: &str) {
        self.log(Level::DEBUG, message);
    }
}

/// What the host tells a handler when it creates it.
#[derive(Debug, Clone)]
pub struct Context {
    daemon: String,
    handler: String,
    logger: Logger,
}

impl Context {
    pub fn new(daemon: impl Into<String>, handler: impl Into<String>, logger: Logger) -> Self {
        Context {
            daemon: daemon.into(),
            handler: handler.into(),
            logger,
        }
    }

    /// A context for unit tests: daemon `test`, logging to stderr.
    pub fn for_tests(handler: impl Into<String>) -> Self {
        Context::new("test", handler, Logger::stderr())
    }

    /// The daemon's name (`daemon.name`): which host this is.
    pub fn daemon(&self) -> &str {
        &self.daemon
    }

    /// The `[[handler]]` entry's name.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The daemon's log. `tracing::info!` and friends reach it too.
    pub fn logger(&self) -> &Logger {
        &self.logger
    }
}

thread_local! {
    /// The logger of the handler whose call runs on this thread.
    static CURRENT: RefCell<Option<Logger>> = const { RefCell::new(None) };
    /// Set while the bridge forwards on this thread: if the host's logger ever led back
    /// into this `tracing` (one process sharing one copy), the event is dropped instead
    /// of recursing.
    static FORWARDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The logger for events from threads that are in no handler call.
static FALLBACK: Mutex<Option<Logger>> = Mutex::new(None);
static INSTALL: Once = Once::new();

/// Make `tracing` events of this library reach `logger` (the first one installed is the
/// fallback for threads outside any call).
pub(crate) fn install_bridge(logger: &Logger) {
    if let Ok(mut f) = FALLBACK.lock() {
        if f.is_none() {
            *f = Some(logger.clone());
        }
    }
    // In a plugin library this is the library's own `tracing`, which has no subscriber.
    // In process (unit tests of the host) one may exist already: then it stays.
    INSTALL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Bridge);
    });
}

/// Run `f` with `logger` as this thread's current logger.
pub(crate) fn scoped<R>(logger: &Logger, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(Some(logger.clone())));
    struct Restore(Option<Logger>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

fn with_logger<R>(f: impl FnOnce(&Logger) -> R) -> Option<R> {
    if FORWARDING.with(|x| x.replace(true)) {
        return None;
    }
    let current = CURRENT.with(|c| c.borrow().clone());
    let logger = current.or_else(|| FALLBACK.lock().ok().and_then(|f| f.clone()));
    let out = logger.map(|l| f(&l));
    FORWARDING.with(|x| x.set(false));
    out
}

/// A `tracing` subscriber that forwards events to the host's logger.
struct Bridge;

impl tracing::Subscriber for Bridge {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Which logger (and so which level) applies depends on the thread: ask every time.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && with_logger(|l| l.enabled(*metadata.level())).unwrap_or(false)
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        with_logger(|l| {
            let fields: Vec<(&str, String)> = visitor
                .fields
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            l.log_with(*meta.level(), meta.target(), &visitor.message, &fields);
        });
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}
