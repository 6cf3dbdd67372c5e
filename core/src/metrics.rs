//! Prometheus metrics, `/healthz` and `/readyz` for `epidemic run`, served on
//! `[metrics] listen`.
//!
//! The exposition is written by `prometheus-client`, the Prometheus project's own Rust
//! client: typed label sets (a series cannot be written with a misspelt label), no global
//! registry (tests and `bench` create none), no async runtime or HTTP server of its own
//! (the small blocking `tiny_http` listener below is all a scrape needs), and it encodes
//! the classic text format (0.0.4) every Prometheus version reads. The `metrics` facade
//! with its exporter would bring a tokio/hyper server into a daemon that has no other use
//! for them.
//!
//! Counters and histograms are updated by the consumer threads; the backlog gauges come
//! from the backend's status report, refreshed by the main thread at start and at each
//! housekeeping tick. A daemon exports only its own consumers' series (another daemon
//! exports its own), each present from the first scrape; only `epidemic_evicted_consumers`
//! counts every daemon's, since an evicted daemon cannot say so itself.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use epidemic_plugin_sdk::backend::Status;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

/// Upper bounds of the handler duration histogram, in seconds: from a no-op call to the
/// exec plugin's default timeout (30 s) and well past it (a handler blocked for minutes).
const BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// How long the main loop may go without a tick before `/healthz` says it is stuck (it
/// ticks every 100 ms).
const LOOP_STALL: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    daemon: String,
    handler: String,
}

type HistogramFamily = Family<HandlerLabels, Histogram, fn() -> Histogram>;

fn handler_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// One handler's counters, shared with its consumer thread.
pub struct HandlerMetrics {
    delivered: Counter,
    failed: Counter,
    dead_lettered: Counter,
    duration: Histogram,
    /// When a handler call last finished, in ms since the daemon started (for `/readyz`).
    last_call_ms: AtomicU64,
    started: Instant,
}

impl HandlerMetrics {
    pub fn delivered(&self) {
        self.delivered.inc();
    }

    pub fn failed(&self) {
        self.failed.inc();
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    pub fn observe(&self, d: Duration) {
        self.duration.observe(d.as_secs_f64());
        self.last_call_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// How long ago a call last finished (or the handler was set up).
    fn since_last_call(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_call_ms.load(Relaxed)))
    }
}

/// The consumer gauges from the backend's status report.
#[derive(Default)]
struct ConsumerGauges {
    backlog: Family<ConsumerLabels, Gauge>,
    oldest_age: Family<ConsumerLabels, Gauge<f64, AtomicU64>>,
    dead_letters: Family<ConsumerLabels, Gauge>,
    evicted: Family<ConsumerLabels, Gauge>,
    evicted_anywhere: Gauge,
}

pub struct Metrics {
    enabled: bool,
    daemon: String,
    started: Instant,
    registry: Registry,
    delivered: Family<HandlerLabels, Counter>,
    failed: Family<HandlerLabels, Counter>,
    dead_lettered: Family<HandlerLabels, Counter>,
    duration: HistogramFamily,
    reconnects: Counter,
    database_up: Gauge,
    gauges: ConsumerGauges,
    handlers: Mutex<Vec<(String, Arc<HandlerMetrics>)>>,
    /// Own consumers' backlogs from the last status, by handler name.
    backlogs: Mutex<Vec<(String, i64)>>,
    /// Readiness: every consumer registered.
    registered: AtomicBool,
    /// Liveness: ms since start of the main loop's last tick; -1 before the loop runs.
    loop_tick_ms: AtomicI64,
    /// A handler with changes waiting whose last call finished longer ago than this is
    /// stuck (`[metrics] handler_stuck_after`).
    stuck_after: Duration,
}

impl Metrics {
    pub fn new(enabled: bool, daemon: &str, stuck_after: Duration) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let delivered = Family::<HandlerLabels, Counter>::default();
        let failed = Family::<HandlerLabels, Counter>::default();
        let dead_lettered = Family::<HandlerLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(handler_histogram);
        let reconnects = Counter::default();
        let database_up = Gauge::default();
        let gauges = ConsumerGauges::default();
        registry.register(
            "epidemic_changes_delivered",
            "Changes a handler handled successfully",
            delivered.clone(),
        );
        registry.register(
            "epidemic_handler_failures",
            "Failed handler calls (each failed attempt)",
            failed.clone(),
        );
        registry.register(
            "epidemic_changes_dead_lettered",
            "Changes given up on and moved to the dead-letter table",
            dead_lettered.clone(),
        );
        registry.register(
            "epidemic_handler_duration_seconds",
            "Time spent in handler calls",
            duration.clone(),
        );
        registry.register(
            "epidemic_reconnects",
            "Reconnect attempts after a lost database connection",
            reconnects.clone(),
        );
        registry.register(
            "epidemic_database_up",
            "1 when the daemon's last look at the database succeeded, else 0",
            database_up.clone(),
        );
        registry.register(
            "epidemic_consumer_backlog",
            "Changes in the log not yet handled by the consumer",
            gauges.backlog.clone(),
        );
        registry.register(
            "epidemic_consumer_oldest_change_age_seconds",
            "Age of the oldest change the consumer has not handled (0 when caught up)",
            gauges.oldest_age.clone(),
        );
        registry.register(
            "epidemic_dead_letters",
            "Dead letters waiting, per consumer",
            gauges.dead_letters.clone(),
        );
        registry.register(
            "epidemic_consumer_evicted",
            "1 when this consumer is marked evicted (unseen longer than consumer_ttl)",
            gauges.evicted.clone(),
        );
        registry.register(
            "epidemic_evicted_consumers",
            "Evicted consumers of any daemon in this database",
            gauges.evicted_anywhere.clone(),
        );
        registry.register(
            "epidemic_build",
            "Version of this epidemic and of its plugin SDK",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("sdk", epidemic_plugin_sdk::SDK_VERSION),
            ]),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Arc::new(Metrics {
            enabled,
            daemon: daemon.to_owned(),
            started: Instant::now(),
            registry,
            delivered,
            failed,
            dead_lettered,
            duration,
            reconnects,
            database_up,
            gauges,
            handlers: Mutex::default(),
            backlogs: Mutex::default(),
            registered: AtomicBool::new(false),
            loop_tick_ms: AtomicI64::new(-1),
            stuck_after,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// This handler's counters, every series of it created now so that a scrape shows
    /// it (at zero) before the first change.
    pub fn handler(&self, name: &str) -> Arc<HandlerMetrics> {
        let mut handlers = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = handlers.iter().find(|(n, _)| n == name) {
            return Arc::clone(m);
        }
        let h = HandlerLabels {
            handler: name.to_owned(),
        };
        let c = self.consumer_labels(name);
        let _ = self.gauges.backlog.get_or_create(&c);
        let _ = self.gauges.oldest_age.get_or_create(&c);
        let _ = self.gauges.dead_letters.get_or_create(&c);
        let _ = self.gauges.evicted.get_or_create(&c);
        let m = Arc::new(HandlerMetrics {
            delivered: self.delivered.get_or_create_owned(&h),
            failed: self.failed.get_or_create_owned(&h),
            dead_lettered: self.dead_lettered.get_or_create_owned(&h),
            duration: self.duration.get_or_create_owned(&h),
            last_call_ms: AtomicU64::new(self.started.elapsed().as_millis() as u64),
            started: self.started,
        });
        handlers.push((name.to_owned(), Arc::clone(&m)));
        m
    }

    fn consumer_labels(&self, handler: &str) -> ConsumerLabels {
        ConsumerLabels {
            daemon: self.daemon.clone(),
            handler: handler.to_owned(),
        }
    }

    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// Whether the main thread's last look at the database succeeded.
    pub fn set_connected(&self, up: bool) {
        self.database_up.set(i64::from(up));
    }

    /// Every consumer has its cursor: from here on no change is missed.
    pub fn set_registered(&self) {
        self.registered.store(true, Relaxed);
    }

    /// The main loop is alive.
    pub fn tick(&self) {
        self.loop_tick_ms
            .store(self.started.elapsed().as_millis() as i64, Relaxed);
    }

    /// Refresh the consumer gauges of this daemon's handlers from a status report.
    pub fn set_status(&self, status: &Status) {
        let handlers: Vec<String> = self
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let mut backlogs = Vec::new();
        for c in status
            .consumers
            .iter()
            .filter(|c| c.daemon == self.daemon && handlers.contains(&c.handler))
        {
            let l = self.consumer_labels(&c.handler);
            self.gauges.backlog.get_or_create(&l).set(c.backlog);
            self.gauges
                .oldest_age
                .get_or_create(&l)
                .set(c.oldest_pending_age_s.unwrap_or(0.0));
            self.gauges
                .dead_letters
                .get_or_create(&l)
                .set(c.dead_letters);
            self.gauges
                .evicted
                .get_or_create(&l)
                .set(i64::from(c.evicted));
            backlogs.push((c.handler.clone(), c.backlog));
        }
        self.gauges
            .evicted_anywhere
            .set(status.consumers.iter().filter(|c| c.evicted).count() as i64);
        *self.backlogs.lock().unwrap_or_else(|p| p.into_inner()) = backlogs;
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// `/healthz`: `Err(reason)` when the main loop has not ticked for a while. During
    /// start-up (waiting for the database, say) the process is alive.
    pub fn health(&self) -> Result<(), String> {
        let tick = self.loop_tick_ms.load(Relaxed);
        if tick < 0 {
            return Ok(());
        }
        let since = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(tick as u64));
        if since > LOOP_STALL {
            return Err(format!("main loop stalled for {}s", since.as_secs()));
        }
        Ok(())
    }

    /// `/readyz`: connected, every consumer registered, and no handler with changes
    /// waiting whose last call finished longer ago than `handler_stuck_after`.
    pub fn readiness(&self) -> Result<(), String> {
        self.health()?;
        if !self.registered.load(Relaxed) {
            return Err("starting: consumers not registered yet".into());
        }
        if self.database_up.get() == 0 {
            return Err("database unreachable".into());
        }
        let backlogs = self
            .backlogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let handlers = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
        let stuck: Vec<String> = handlers
            .iter()
            .filter(|(name, m)| {
                backlogs.iter().any(|(h, b)| h == name && *b > 0)
                    && m.since_last_call() > self.stuck_after
            })
            .map(|(name, m)| {
                format!(
                    "handler {name} stuck: changes waiting, no call finished for {}s",
                    m.since_last_call().as_secs()
                )
            })
            .collect();
        if !stuck.is_empty() {
            return Err(stuck.join("; "));
        }
        Ok(())
    }
}

/// The standard `process_*` metrics (as the Go and Python clients export them), read
/// from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let Ok(stat) = me.stat() else {
            return Ok(());
        };
        let ticks = procfs::ticks_per_second() as f64;
        let page = procfs::page_size();
        let mut gauge = |name: &str, help: &str, value: f64| -> Result<(), std::fmt::Error> {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(m)
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            (stat.rss * page) as f64,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            stat.vsize as f64,
        )?;
        gauge(
            "process_threads",
            "Number of OS threads",
            stat.num_threads as f64,
        )?;
        if let Ok(boot) = procfs::boot_time_secs() {
            gauge(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                boot as f64 + stat.starttime as f64 / ticks,
            )?;
        }
        if let Ok(n) = me.fd_count() {
            gauge(
                "process_open_fds",
                "Number of open file descriptors",
                n as f64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                gauge(
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max as f64,
                )?;
            }
        }
        let m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new((stat.utime + stat.stime) as f64 / ticks).encode(m)
    }
}

/// Serve `GET /metrics`, `/healthz` and `/readyz` on `addr` until `stop` is set. Query
/// strings are ignored (`/metrics?name[]=…` as some scrapers send it).
pub fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<JoinHandle<()>> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| crate::exit::config(format!("metrics.listen {addr}: cannot listen: {e}")))?;
    info!(listen = %addr, "serving Prometheus metrics on /metrics, health on /healthz and /readyz");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !stop.load(Relaxed) {
                let req = match server.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(error = %e, "metrics server");
                        continue;
                    }
                };
                let path = req.url().split('?').next().unwrap_or("").to_owned();
                let text = |body: String, code: u16, content_type: &str| {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        content_type.as_bytes(),
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(body)
                        .with_status_code(code)
                        .with_header(header)
                };
                let plain = "text/plain; charset=utf-8";
                let probe = |r: Result<(), String>| match r {
                    Ok(()) => text("ok\n".into(), 200, plain),
                    Err(why) => text(format!("{why}\n"), 503, plain),
                };
                let resp = match path.as_str() {
                    "/metrics" => text(
                        metrics.render(),
                        200,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    ),
                    "/healthz" => probe(metrics.health()),
                    "/readyz" => probe(metrics.readiness()),
                    _ => text("see /metrics, /healthz, /readyz\n".into(), 404, plain),
                };
                let _ = req.respond(resp);
            }
        })
        .context("cannot start the metrics thread")
}
