//! `epidemic run`: one consumer thread per handler, each with its own backend
//! connection and cursor, plus the main thread that prunes, evicts stale consumers,
//! refreshes metrics and watches for shutdown.
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
    BackendError, Change, Consumer, DeadLetter, DeadLetterQuery, DeadLetterUpdate, HandlerError,
    Registered, Router, StartFrom,
};
use tracing::{debug, error, info, warn};

use crate::config::{Config, HandlerConfig, OnFailure};
use crate::lease::{DaemonLease, Heartbeat};
use crate::metrics::{HandlerMetrics, Metrics};
use crate::plugins::{self, LoadedHandler};

/// Longest single block in the backend's `wait`, so a shutdown request is seen quickly.
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// Reconnect backoff after a lost connection: starts here, doubles, capped.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// How often a consumer looks for dead letters that `epidemic dead-letters retry` marked.
const RETRY_CHECK: Duration = Duration::from_secs(1);

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
    let mut handlers = plugins::load_handlers(&cfg)?;
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
        reconnect_on_error(&mut main_conn, |c| plugins::resolve_names(c, &mut handlers))
    })?;
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
        let registered = until_connected(&stop, "register consumer", || {
            reconnect_on_error(&mut main_conn, |c| {
                c.register(&consumer, &tables, opts.start)
            })
        })?;
        log_registration(&consumer, &h, &tables, registered, opts.start);
        let lost_cursor = Arc::new(AtomicBool::new(false));
        consumers.push((consumer.clone(), Arc::clone(&lost_cursor)));
        let conn = until_connected(&stop, &url, || plugins::open_raw(&cfg, &backend_lib))?;
        let handler_metrics = metrics.handler(&consumer.handler);
        let dispatcher = Dispatcher::new(
            &cfg,
            consumer,
            conn,
            h,
            handler_metrics,
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
    fn report(&mut self, status: &epidemic_plugin_sdk::Status) {
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

/// Sleep up to `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
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
    /// Handled, skipped (not wanted), or dead-lettered: the cursor may move past it.
    Done,
    /// Shutdown came while retrying: the change was not handled and must come again.
    Abandoned,
}

/// How one change fared with the handler after retries.
enum Outcome {
    Handled,
    GaveUp { error: HandlerError, attempts: u32 },
    Abandoned,
}

struct Dispatcher {
    consumer: Consumer,
    backend: HostBackend,
    handler: HostHandler,
    /// The same routing as `epidemic_plugin_sdk::testing::Harness`.
    router: Router,
    tables: Vec<String>,
    retry: HandlerConfig,
    batch_size: u32,
    idle_check: Duration,
    metrics: Arc<HandlerMetrics>,
    all_metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Set by the heartbeat when touching this consumer updated no cursor.
    lost_cursor: Arc<AtomicBool>,
}

impl Dispatcher {
    fn new(
        cfg: &Config,
        consumer: Consumer,
        backend: HostBackend,
        h: LoadedHandler,
        metrics: Arc<HandlerMetrics>,
        all_metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Dispatcher {
            tables: h.tables(),
            consumer,
            backend,
            handler: h.instance,
            router: Router::new(h.subscriptions),
            retry: h.config,
            batch_size: cfg.daemon.batch_size,
            idle_check: Duration::from_millis(cfg.daemon.idle_check_ms.max(1)),
            metrics,
            all_metrics,
            stop,
            lost_cursor: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag the heartbeat sets when touching this consumer updated no cursor.
    fn with_lost_cursor_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.lost_cursor = flag;
        self
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(mut self) {
        let mut outage: Option<Instant> = None;
        let mut backoff = RECONNECT_INITIAL;
        let mut next_retry_check = Instant::now();
        while !self.stopping() {
            let mut result = if self.lost_cursor.swap(false, Ordering::Relaxed) {
                Err(BackendError::Evicted(format!(
                    "consumer {}: the heartbeat found no live cursor",
                    self.consumer
                )))
            } else {
                self.step()
            };
            if result.is_ok() {
                if let Some(since) = outage.take() {
                    info!(consumer = %self.consumer, after = ?since.elapsed(), "database reachable again; catching up");
                }
                backoff = RECONNECT_INITIAL;
            }
            if result.is_ok() && Instant::now() >= next_retry_check {
                next_retry_check = Instant::now() + RETRY_CHECK;
                result = self.redeliver_requested();
            }
            if let Err(e) = result {
                if e.is_connection() {
                    // Log an outage once, not once per attempt.
                    if outage.is_none() {
                        warn!(consumer = %self.consumer, error = %e, "database connection lost; reconnecting");
                        outage = Some(Instant::now());
                    }
                } else {
                    error!(consumer = %self.consumer, error = %e, "reading changes failed; retrying");
                }
                sleep_unless(&self.stop, backoff);
                backoff = (backoff * 2).min(RECONNECT_MAX);
                if e.is_connection() {
                    self.all_metrics.reconnect();
                    if let Err(e) = self.backend.reconnect() {
                        debug!(consumer = %self.consumer, error = %e, "reconnect failed");
                    }
                } else if e.is_evicted() {
                    // The consumer was evicted while this daemon was cut off: register
                    // again (which says loudly what was missed).
                    match self
                        .backend
                        .register(&self.consumer, &self.tables, StartFrom::Now)
                    {
                        Ok(Registered::Evicted) => error!(
                            consumer = %self.consumer,
                            "this consumer had been evicted (unseen longer than consumer_ttl); changes it had not \
                             handled may have been pruned and are MISSED; continuing from now"
                        ),
                        Ok(Registered::New) => error!(
                            consumer = %self.consumer,
                            "this consumer's cursor had vanished (deleted by hand?); registered again from now: \
                             changes committed since it vanished may be MISSED"
                        ),
                        Ok(Registered::Existing) => {}
                        Err(e) => {
                            debug!(consumer = %self.consumer, error = %e, "re-register failed")
                        }
                    }
                }
            }
        }
        debug!(consumer = %self.consumer, "handler thread stopped");
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
        let mut result = Ok(());
        for change in &batch.changes {
            match self.deliver(change) {
                Ok(Delivery::Done) => last = Some(change.id),
                Ok(Delivery::Abandoned) => break,
                // Could not record a dead letter: do not move past this change.
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if self.stopping() {
                break;
            }
        }
        if let Some(id) = last {
            self.backend.ack(&self.consumer, &batch.token, id)?;
        }
        result
    }

    fn deliver(&mut self, change: &Change) -> Result<Delivery, BackendError> {
        let Some(projected) = self.router.route(change) else {
            return Ok(Delivery::Done);
        };
        match self.attempt(&projected) {
            Outcome::Handled => Ok(Delivery::Done),
            Outcome::Abandoned => Ok(Delivery::Abandoned),
            Outcome::GaveUp { error, attempts } => {
                let letter = DeadLetter::new(
                    &self.consumer,
                    &projected,
                    &error.to_string(),
                    attempts,
                    now_us(),
                );
                let id = self.backend.add_dead_letter(&letter)?;
                self.metrics.dead_lettered();
                error!(
                    consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id,
                    attempts, error = %error, dead_letter = id,
                    "handler failed; giving up on this change and moving it to the dead letters \
                     (`epidemic dead-letters list`)"
                );
                Ok(Delivery::Done)
            }
        }
    }

    /// Call the handler, retrying as configured.
    fn attempt(&mut self, change: &Change) -> Outcome {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = self.handler.handle(change);
            self.metrics.observe(started.elapsed());
            let err = match result {
                Ok(()) => {
                    self.metrics.delivered();
                    debug!(consumer = %self.consumer, table = %change.table, op = %change.op, id = change.id, "delivered");
                    return Outcome::Handled;
                }
                Err(e) => e,
            };
            self.metrics.failed();
            let block = self.retry.on_failure == OnFailure::Block;
            let retryable = matches!(err, HandlerError::Retryable(_) | HandlerError::Panic(_));
            if !block && (!retryable || attempt >= self.retry.max_attempts) {
                return Outcome::GaveUp {
                    error: err,
                    attempts: attempt,
                };
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
            sleep_unless(&self.stop, delay);
            if self.stopping() {
                return Outcome::Abandoned;
            }
        }
    }

    /// Deliver the dead letters `epidemic dead-letters retry` marked for this consumer.
    fn redeliver_requested(&mut self) -> Result<(), BackendError> {
        let letters = self
            .backend
            .dead_letters(&DeadLetterQuery::RetryRequested(self.consumer.clone()))?;
        for letter in letters {
            if self.stopping() {
                break;
            }
            let change = match letter.change() {
                Ok(c) => c,
                Err(e) => {
                    error!(consumer = %self.consumer, dead_letter = letter.id, error = %e, "cannot retry");
                    continue;
                }
            };
            match self.attempt(&change) {
                Outcome::Handled => {
                    self.backend
                        .update_dead_letters(&DeadLetterUpdate::Delete(vec![letter.id]))?;
                    info!(consumer = %self.consumer, dead_letter = letter.id, id = change.id, "dead letter redelivered");
                }
                Outcome::GaveUp { error, attempts } => {
                    self.backend
                        .update_dead_letters(&DeadLetterUpdate::Failed {
                            id: letter.id,
                            error: error.to_string(),
                            attempts: letter.attempts + attempts,
                            failed_at_us: now_us(),
                        })?;
                    warn!(consumer = %self.consumer, dead_letter = letter.id, error = %error, "dead letter failed again");
                }
                Outcome::Abandoned => break,
            }
        }
        Ok(())
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Exponential backoff with jitter: a random delay in [d/2, d] where d doubles per
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
