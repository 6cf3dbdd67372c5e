//! `epidemic run`: one consumer thread per handler (a [`Dispatcher`]), each with its own
//! backend connection and cursor, a heartbeat thread, and the main thread that prunes,
//! evicts stale consumers, refreshes metrics and watches for shutdown.
//!
//! Delivery is at-least-once. A consumer acknowledges after each batch (and, on shutdown,
//! after the handler call in hand), so a crash redelivers at most the batch in flight.
//! One handler's failures or retries never hold up another handler: they do not share a
//! thread, a connection or a cursor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use epidemic_plugin_host::HostBackend;
use epidemic_plugin_sdk::backend::{
    BackendError, BackfillRequest, Consumer, Registered, StartFrom,
};
use tracing::{debug, error, info, warn};

use crate::backoff::{sleep_unless, RECONNECT_INITIAL, RECONNECT_MAX};
use crate::config::{Config, OnEvicted, StartMode};
use crate::dispatch::{DispatchSettings, Dispatcher, RetryPolicy};
use crate::lease::{DaemonLease, Heartbeat};
use crate::metrics::Metrics;
use crate::plugins::{self, LoadedHandler};

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

fn log_registration(
    consumer: &Consumer,
    h: &LoadedHandler,
    tables: &[String],
    r: Registered,
    start: StartFrom,
) {
    let from = match start {
        StartFrom::Now => "now",
        StartFrom::Oldest => "the oldest retained change",
    };
    match r {
        Registered::New => {
            info!(consumer = %consumer, plugin = %h.library.name, tables = ?tables, "new consumer; reading from {from}")
        }
        Registered::Existing => {
            info!(consumer = %consumer, plugin = %h.library.name, tables = ?tables, "resuming consumer")
        }
        Registered::Evicted => error!(
            consumer = %consumer, plugin = %h.library.name, tables = ?tables,
            "this consumer was evicted for being unseen longer than consumer_ttl: changes it had not handled \
             may have been pruned and are MISSED; it restarts from {from}. Reconcile this host by hand."
        ),
    }
}

pub fn run(cfg: Config, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<()> {
    // daemon.lease_ttl and every other key were checked by `Config::load`, before
    // anything touched the database: bad input leaves nothing half-done.
    let daemon = cfg.daemon_name()?;
    let backend_lib = plugins::load_backend(&cfg)?;
    let mut handlers = plugins::load_handlers(&cfg, &daemon)?;
    let url = epidemic_plugin_sdk::redact_url(&cfg.database.url);
    let metrics = Metrics::new(
        cfg.metrics.listen.is_some(),
        &daemon,
        cfg.metrics.handler_stuck_after,
    );
    // Every handler's series exist from the first scrape, before the database is reached.
    for h in &handlers {
        metrics.handler(&h.config.name);
    }
    let _server = match &cfg.metrics.listen {
        Some(addr) => Some(crate::metrics::serve(
            addr,
            Arc::clone(&metrics),
            Arc::clone(&stop),
        )?),
        None => None,
    };
    // A daemon may start before its database (boot order, an outage): connection errors
    // are retried with backoff; anything else (bad tables, bad options) is fatal.
    notify_status("connecting to the database");
    let mut main_conn = until_connected(&stop, &url, || plugins::open_raw(&cfg, &backend_lib))?;
    // Say what drifted before install repairs it (a dropped trigger) or refuses to
    // start over it (a dropped or renamed column).
    let mut health = HealthLog::default();
    if let Ok(status) = main_conn.status() {
        health.report(&status);
    }
    // The catalog's spelling of every name, so dispatch matches what the backend reports.
    let watches = until_connected(&stop, "resolve names", || {
        reconnect_on_error(&mut main_conn, |c| {
            plugins::resolve_names(&cfg, c, &mut handlers)
        })
    })?;
    plugins::check_filters(&cfg, &handlers, &watches)?;
    until_connected(&stop, "install", || {
        reconnect_on_error(&mut main_conn, |c| c.install(&watches))
    })?;
    let handler_count = handlers.len();
    notify_status("registering consumers");
    // From here on this daemon changes consumers of its name: hold the name first.
    let lease = DaemonLease::new(&daemon, cfg.daemon.lease_ttl);
    lease.acquire(&stop, |req| {
        until_connected(&stop, "claim the daemon name", || {
            reconnect_on_error(&mut main_conn, |c| c.lease(req))
        })
    })?;
    forget_removed_handlers(&mut main_conn, &daemon, &handlers);

    let mut threads: Vec<(String, JoinHandle<()>)> = Vec::new();
    let mut consumers = Vec::new();
    for h in handlers {
        let consumer = Consumer {
            daemon: daemon.clone(),
            handler: h.config.name.clone(),
        };
        let tables = h.tables();
        let start = match h.config.start {
            StartMode::Now => opts.start,
            StartMode::Oldest => StartFrom::Oldest,
            // The snapshot brings the rows; the log from now on brings what follows.
            StartMode::Snapshot => StartFrom::Now,
        };
        let registered = until_connected(&stop, "register consumer", || {
            reconnect_on_error(&mut main_conn, |c| c.register(&consumer, &tables, start))
        })?;
        log_registration(&consumer, &h, &tables, registered, start);
        let backfill = match registered {
            Registered::New if h.config.start == StartMode::Snapshot => {
                Some("start = \"snapshot\"")
            }
            Registered::Evicted if h.config.on_evicted == OnEvicted::Resync => {
                Some("on_evicted = \"resync\"")
            }
            _ => None,
        };
        if let Some(why) = backfill {
            request_backfill(&mut main_conn, &consumer, &tables, why)?;
        }
        let lost_cursor = Arc::new(AtomicBool::new(false));
        consumers.push((consumer.clone(), Arc::clone(&lost_cursor)));
        let conn = until_connected(&stop, &url, || plugins::open_raw(&cfg, &backend_lib))?;
        let settings = DispatchSettings {
            consumer,
            subscriptions: h.subscriptions,
            retry: RetryPolicy::from(&h.config),
            batch_size: cfg.daemon.batch_size,
            handler_batch: h.config.handler_batch,
            backfill_chunk: cfg.daemon.backfill_chunk,
            resync_on_evicted: h.config.on_evicted == OnEvicted::Resync,
            filter: h
                .filter
                .clone()
                .map(|f| f as Arc<dyn epidemic_plugin_sdk::routing::RowFilter>),
            snapshot_only: if h.config.snapshot_pushdown {
                h.snapshot_only
            } else {
                Default::default()
            },
            idle_check: Duration::from_millis(cfg.daemon.idle_check_ms),
        };
        let dispatcher = Dispatcher::new(
            settings,
            conn,
            h.instance,
            Arc::clone(&metrics),
            Arc::clone(&stop),
        )
        .with_lost_cursor_flag(lost_cursor);
        let name = dispatcher.consumer.handler.clone();
        let handle = std::thread::Builder::new()
            .name(format!("handler-{name}"))
            .spawn(move || dispatcher.run())
            .context("cannot start handler thread")?;
        threads.push((name, handle));
    }

    let heartbeat = Heartbeat::start(
        until_connected(&stop, &url, || plugins::open_raw(&cfg, &backend_lib))?,
        lease.clone(),
        consumers,
        heartbeat_interval(&cfg),
        Arc::clone(&stop),
    )?;

    // Gauges show real values from the first scrape after start-up.
    match main_conn.status() {
        Ok(status) => {
            metrics.set_status(&status);
            metrics.set_connected(true);
        }
        Err(e) => debug!(error = %e, "status after registration"),
    }
    metrics.set_registered();
    // Logged, and told to systemd (Type=notify), once every consumer has a cursor: from
    // here on no change is missed.
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "running: {handler_count} handler(s) on {} table(s)",
            watches.len()
        )),
    ]);
    info!(
        daemon = %daemon,
        backend = %backend_lib.name,
        url = %url,
        handlers = handler_count,
        tables = watches.len(),
        "epidemic started"
    );

    let every = Duration::from_millis(cfg.daemon.prune_interval_ms.max(10));
    let mut next_tick = Instant::now() + every;
    let mut outage = false;
    // systemd's watchdog (WatchdogSec=): pinged from this loop, at half its period.
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut next_ping = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        metrics.tick();
        if let Some(period) = watchdog {
            if Instant::now() >= next_ping {
                next_ping = Instant::now() + period;
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
        if let Some((name, _)) = threads.iter().find(|(_, t)| t.is_finished()) {
            stop.store(true, Ordering::Relaxed);
            bail!("handler thread {name} stopped unexpectedly");
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + every;
            let result = housekeeping(&mut main_conn, &cfg, &metrics, &mut health);
            metrics.set_connected(!matches!(&result, Err(e) if e.is_connection()));
            match result {
                Ok(()) => outage = false,
                Err(e) if e.is_connection() => {
                    // The consumer threads report outages; this one stays quiet.
                    if !outage {
                        debug!(error = %e, "housekeeping: database unavailable");
                        outage = true;
                    }
                    let _ = main_conn.reconnect();
                }
                Err(e) => warn!(error = %e, "housekeeping failed"),
            }
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: finishing the changes in hand"),
    ]);
    info!("shutting down: finishing the changes in hand");
    for (name, t) in threads {
        if t.join().is_err() {
            error!(handler = %name, "handler thread panicked");
        }
    }
    if let Some(holder) = heartbeat.join() {
        bail!("daemon name {daemon:?} was taken over by another daemon ({holder}); stopped");
    }
    // A clean stop frees the name at once, so a restart need not wait for the lease.
    if let Err(e) = lease.release(&mut main_conn) {
        debug!(error = %e, "could not release the daemon name; it expires by itself");
    }
    info!("stopped");
    Ok(())
}

/// Tell the service manager (`$NOTIFY_SOCKET`, set by systemd for `Type=notify`; without
/// it this does nothing). A failure to tell is logged, never fatal.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// What `systemctl status` shows while the daemon starts.
fn notify_status(what: &str) {
    notify(&[sd_notify::NotifyState::Status(what)]);
}

/// Ask for a backfill of the consumer's tables (its dispatcher starts it). One already
/// requested or running (a daemon killed during it) is left to go on.
pub fn request_backfill(
    conn: &mut HostBackend,
    consumer: &Consumer,
    tables: &[String],
    why: &str,
) -> Result<()> {
    match conn.backfills(&BackfillRequest::Request {
        consumer: consumer.clone(),
        tables: tables.to_vec(),
        requested_by: why.to_owned(),
    }) {
        Ok(_) => {
            info!(consumer = %consumer, tables = ?tables, "backfill requested ({why})");
            Ok(())
        }
        Err(BackendError::Invalid(m)) => {
            info!(consumer = %consumer, "{m}; it goes on");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("request a backfill ({why})"))),
    }
}

/// Heartbeats renew the lease three times per `lease_ttl`, and touch consumers at least
/// ten times per `consumer_ttl`.
fn heartbeat_interval(cfg: &Config) -> Duration {
    let mut every = cfg.daemon.lease_ttl / 3;
    if !cfg.daemon.consumer_ttl.is_zero() {
        every = every.min(cfg.daemon.consumer_ttl / 10);
    }
    every.clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// This daemon's consumers whose handler is no longer in the config would hold back
/// pruning until `consumer_ttl` evicts them: forget them now, and say so.
fn forget_removed_handlers(conn: &mut HostBackend, daemon: &str, handlers: &[LoadedHandler]) {
    let Ok(status) = conn.status() else { return };
    for c in status.consumers.iter().filter(|c| c.daemon == daemon) {
        if handlers.iter().any(|h| h.config.name == c.handler) {
            continue;
        }
        let consumer = Consumer {
            daemon: c.daemon.clone(),
            handler: c.handler.clone(),
        };
        match conn.unregister(&consumer) {
            Ok(_) => warn!(
                consumer = %consumer,
                "handler no longer in the config: forgot its cursor (it no longer holds back pruning; \
                 its dead letters, if any, stay until dropped)"
            ),
            Err(e) => {
                warn!(consumer = %consumer, error = %e, "could not forget a removed handler's consumer")
            }
        }
    }
}

/// The problems and warnings of `status` this daemon has logged, so that each is logged
/// once when it appears (at start, or later while running: a TRUNCATE noticed on MySQL,
/// a privilege revoked) rather than at every check.
#[derive(Default)]
struct HealthLog {
    logged: std::collections::HashSet<String>,
    next_check: Option<Instant>,
}

impl HealthLog {
    fn report(&mut self, status: &epidemic_plugin_sdk::backend::Status) {
        let now: Vec<String> = status
            .tables
            .iter()
            .flat_map(|t| &t.problems)
            .map(|p| format!("schema drift: {p}"))
            .chain(status.warnings.iter().cloned())
            .collect();
        for line in &now {
            if self.logged.insert(line.clone()) {
                warn!("{line}");
            }
        }
        self.logged.retain(|l| {
            let still = now.contains(l);
            if !still {
                info!("no longer the case: {l}");
            }
            still
        });
    }

    fn due(&mut self, every: Duration) -> bool {
        let now = Instant::now();
        match self.next_check {
            Some(t) if now < t => false,
            _ => {
                self.next_check = Some(now + every);
                true
            }
        }
    }
}

/// Evict stale consumers, prune what every live consumer has passed, refresh gauges, and
/// log what `status` newly finds wrong.
fn housekeeping(
    conn: &mut HostBackend,
    cfg: &Config,
    metrics: &Metrics,
    health: &mut HealthLog,
) -> Result<(), BackendError> {
    if !cfg.daemon.consumer_ttl.is_zero() {
        for c in conn.evict_stale(cfg.daemon.consumer_ttl)? {
            warn!(
                consumer = %c,
                ttl = %humantime::format_duration(cfg.daemon.consumer_ttl),
                "evicted a consumer unseen longer than consumer_ttl: it no longer holds back pruning, \
                 and will be told it missed changes if it comes back"
            );
        }
    }
    let n = conn.prune()?;
    if n > 0 {
        debug!(rows = n, "pruned log rows every live consumer has passed");
    }
    let check = health.due(cfg.daemon.health_check_interval);
    if metrics.enabled() || check {
        let status = conn.status()?;
        if metrics.enabled() {
            metrics.set_status(&status);
        }
        if check {
            health.report(&status);
        }
    }
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
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
            // Kept typed (not formatted) so the exit status can tell its kind.
            Err(e) => return Err(anyhow::Error::new(e).context(what.to_owned())),
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
