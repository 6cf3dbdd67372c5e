//! `epidemic run`: one consumer thread per handler, each with its own backend
//! connection and cursor, plus the main thread that prunes and watches for shutdown.
//!
//! Delivery is at-least-once. A consumer acknowledges after each batch (and, on shutdown,
//! after the change in hand), so a crash redelivers at most the batch in flight. One
//! handler's failures or retries never hold up another handler: they do not share a
//! thread, a connection or a cursor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use epidemic_plugin_sdk::host::{HostBackend, HostHandler};
use epidemic_plugin_sdk::{
    BackendError, Change, Consumer, HandlerError, Registered, StartFrom, Subscription,
};
use tracing::{debug, error, info, warn};

use crate::config::{Config, HandlerConfig};
use crate::plugins::{self, LoadedHandler};

/// Longest single block in the backend's `wait`, so a shutdown request is seen quickly.
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// Reconnect backoff after a lost connection: starts here, doubles, capped.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

pub struct RunOptions {
    pub start: StartFrom,
}

/// Set by SIGTERM/SIGINT; a second signal exits at once.
pub fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // Order matters: the conditional shutdown checks the flag before the second
        // handler sets it, so only a repeated signal exits immediately.
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop))
            .context("cannot install signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install signal handler")?;
    }
    Ok(stop)
}

pub fn run(cfg: Config, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let daemon = cfg.daemon_name()?;
    let backend_lib = plugins::load_backend(&cfg)?;
    let handlers = plugins::load_handlers(&cfg)?;
    let watches = plugins::watches(&handlers);
    let url = epidemic_plugin_sdk::redact_url(&cfg.database.url);
    // A daemon may start before its database (boot order, an outage): connection errors
    // are retried with backoff; anything else (bad tables, bad options) is fatal.
    let mut main_conn = until_connected(&stop, &url, || plugins::open_raw(&cfg, &backend_lib))?;
    until_connected(&stop, "install", || {
        reconnect_on_error(&mut main_conn, |c| c.install(&watches))
    })?;
    let handler_count = handlers.len();

    let mut threads: Vec<(String, JoinHandle<()>)> = Vec::new();
    for h in handlers {
        let consumer = Consumer {
            daemon: daemon.clone(),
            handler: h.config.name.clone(),
        };
        let tables = h.tables();
        let registered = until_connected(&stop, "register consumer", || {
            reconnect_on_error(&mut main_conn, |c| {
                c.register(&consumer, &tables, opts.start)
            })
        })?;
        match registered {
            Registered::New => {
                info!(consumer = %consumer, plugin = %h.library.name, tables = ?tables, "new consumer; reading from {}", match opts.start {
                    StartFrom::Now => "now",
                    StartFrom::Oldest => "the oldest retained change",
                })
            }
            Registered::Existing => {
                info!(consumer = %consumer, plugin = %h.library.name, tables = ?tables, "resuming consumer")
            }
        }
        let conn = until_connected(&stop, &url, || plugins::open_raw(&cfg, &backend_lib))?;
        let dispatcher = Dispatcher::new(&cfg, consumer, conn, h, Arc::clone(&stop));
        let name = dispatcher.consumer.handler.clone();
        let handle = std::thread::Builder::new()
            .name(format!("handler-{name}"))
            .spawn(move || dispatcher.run())
            .context("cannot start handler thread")?;
        threads.push((name, handle));
    }

    // Logged once every consumer has a cursor: from here on no change is missed.
    info!(
        daemon = %daemon,
        backend = %backend_lib.name,
        url = %url,
        handlers = handler_count,
        tables = watches.len(),
        "epidemic started"
    );

    let prune_every = Duration::from_millis(cfg.daemon.prune_interval_ms.max(10));
    let mut next_prune = Instant::now() + prune_every;
    let mut prune_outage = false;
    while !stop.load(Ordering::Relaxed) {
        if let Some((name, _)) = threads.iter().find(|(_, t)| t.is_finished()) {
            stop.store(true, Ordering::Relaxed);
            bail!("handler thread {name} stopped unexpectedly");
        }
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + prune_every;
            match main_conn.prune() {
                Ok(n) => {
                    prune_outage = false;
                    if n > 0 {
                        debug!(rows = n, "pruned log rows every consumer has passed");
                    }
                }
                Err(e) if e.is_connection() => {
                    if !prune_outage {
                        prune_outage = true;
                    }
                    let _ = main_conn.reconnect();
                }
                Err(e) => warn!(error = %e, "pruning failed"),
            }
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
    info!("shutting down: finishing the changes in hand");
    for (name, t) in threads {
        if t.join().is_err() {
            error!(handler = %name, "handler thread panicked");
        }
    }
    info!("stopped");
    Ok(())
}

/// Run `f` until it succeeds, retrying connection errors with capped backoff (logged
/// once). Other errors, and a shutdown request, end the wait.
fn until_connected<T>(
    stop: &AtomicBool,
    what: &str,
    mut f: impl FnMut() -> Result<T, BackendError>,
) -> Result<T> {
    let mut backoff = RECONNECT_INITIAL;
    let mut warned = false;
    loop {
        match f() {
            Ok(v) => {
                if warned {
                    info!("{what}: database reachable again");
                }
                return Ok(v);
            }
            Err(e) if e.is_connection() && !stop.load(Ordering::Relaxed) => {
                if !warned {
                    warn!(error = %e, "{what}: database unavailable; retrying until it is back");
                    warned = true;
                }
                let end = Instant::now() + backoff;
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
            Err(e) => bail!("{what}: {e}"),
        }
    }
}

/// Run `f` on the connection; after a connection error, reconnect so the next try has a
/// fresh connection.
fn reconnect_on_error<T>(
    conn: &mut HostBackend,
    f: impl FnOnce(&mut HostBackend) -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    let r = f(conn);
    if matches!(&r, Err(e) if e.is_connection()) {
        let _ = conn.reconnect();
    }
    r
}

enum Delivery {
    /// Handled, skipped (not wanted), or given up on: the cursor may move past it.
    Done,
    /// Shutdown came while retrying: the change was not handled and must come again.
    Abandoned,
}

struct Dispatcher {
    consumer: Consumer,
    backend: HostBackend,
    handler: HostHandler,
    subscriptions: Vec<Subscription>,
    retry: HandlerConfig,
    batch_size: u32,
    idle_check: Duration,
    stop: Arc<AtomicBool>,
}

impl Dispatcher {
    fn new(
        cfg: &Config,
        consumer: Consumer,
        backend: HostBackend,
        h: LoadedHandler,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Dispatcher {
            consumer,
            backend,
            handler: h.instance,
            subscriptions: h.subscriptions,
            retry: h.config,
            batch_size: cfg.daemon.batch_size,
            idle_check: Duration::from_millis(cfg.daemon.idle_check_ms.max(1)),
            stop,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(mut self) {
        let mut outage: Option<Instant> = None;
        let mut backoff = RECONNECT_INITIAL;
        while !self.stopping() {
            match self.step() {
                Ok(()) => {
                    if let Some(since) = outage.take() {
                        info!(consumer = %self.consumer, after = ?since.elapsed(), "database reachable again; catching up");
                    }
                    backoff = RECONNECT_INITIAL;
                }
                Err(e) => {
                    if e.is_connection() {
                        // Log an outage once, not once per attempt.
                        if outage.is_none() {
                            warn!(consumer = %self.consumer, error = %e, "database connection lost; reconnecting");
                            outage = Some(Instant::now());
                        }
                    } else {
                        error!(consumer = %self.consumer, error = %e, "reading changes failed; retrying");
                    }
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    if e.is_connection() {
                        if let Err(e) = self.backend.reconnect() {
                            debug!(consumer = %self.consumer, error = %e, "reconnect failed");
                        }
                    }
                }
            }
        }
        debug!(consumer = %self.consumer, "handler thread stopped");
    }

    /// Sleep up to `d`, waking early on shutdown.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// Read one batch and deliver it; or wait for changes when there are none.
    fn step(&mut self) -> Result<(), BackendError> {
        let batch = self.backend.fetch(&self.consumer, self.batch_size)?;
        if batch.changes.is_empty() {
            let deadline = Instant::now() + self.idle_check;
            while !self.stopping() {
                let now = Instant::now();
                if now >= deadline || self.backend.wait((deadline - now).min(WAIT_SLICE))? {
                    break;
                }
            }
            return Ok(());
        }
        let mut last = None;
        for change in &batch.changes {
            match self.deliver(change) {
                Delivery::Done => last = Some(change.id),
                Delivery::Abandoned => break,
            }
            if self.stopping() {
                break;
            }
        }
        if let Some(id) = last {
            self.backend.ack(&self.consumer, &batch.token, id)?;
        }
        Ok(())
    }

    fn deliver(&mut self, change: &Change) -> Delivery {
        let wanted: Vec<&Subscription> = self
            .subscriptions
            .iter()
            .filter(|s| s.wants(change))
            .collect();
        let projected = match wanted.as_slice() {
            [] => return Delivery::Done,
            [one] => one.project(change),
            many => {
                let mut columns: Vec<String> = Vec::new();
                for c in many.iter().flat_map(|s| &s.columns) {
                    if !columns.contains(c) {
                        columns.push(c.clone());
                    }
                }
                Subscription {
                    table: change.table.clone(),
                    columns,
                    ops: many[0].ops,
                }
                .project(change)
            }
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = self.handler.handle(&projected);
            let err = match result {
                Ok(()) => {
                    debug!(consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id, "delivered");
                    return Delivery::Done;
                }
                Err(e) => e,
            };
            let retryable = matches!(err, HandlerError::Retryable(_) | HandlerError::Panic(_));
            if !retryable || attempt >= self.retry.max_attempts {
                error!(
                    consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id,
                    attempts = attempt, error = %err,
                    "handler failed; giving up on this change"
                );
                return Delivery::Done;
            }
            let delay = backoff_delay(
                attempt,
                self.retry.retry_initial_ms,
                self.retry.retry_max_ms,
            );
            warn!(
                consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id,
                attempt, error = %err, retry_in = ?delay,
                "handler failed; will retry"
            );
            self.sleep(delay);
            if self.stopping() {
                return Delivery::Abandoned;
            }
        }
    }
}

/// Exponential backoff with full jitter: a random delay in [d/2, d] where d doubles per
/// attempt from `initial_ms` up to `max_ms`, so many daemons retrying the same failure
/// do not hit the same resource in lockstep.
fn backoff_delay(attempt: u32, initial_ms: u64, max_ms: u64) -> Duration {
    let exp = initial_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
    let d = exp.min(max_ms).max(1);
    Duration::from_millis(d / 2 + fastrand::u64(0..=d / 2))
}

#[cfg(test)]
mod tests {
    use super::backoff_delay;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        for _ in 0..100 {
            let d1 = backoff_delay(1, 100, 1_000);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = backoff_delay(3, 100, 1_000);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d10 = backoff_delay(10, 100, 1_000);
            assert!(d10 >= Duration::from_millis(500) && d10 <= Duration::from_millis(1_000));
        }
    }
}
