//! Prometheus metrics for `epidemic run`, served as text on `[metrics] listen`.
//!
//! Counters are plain atomics updated by the consumer threads; backlog gauges come from
//! the backend's status report, refreshed by the main thread at each housekeeping tick.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use epidemic_plugin_sdk::backend::Status;
use tracing::{info, warn};

/// Upper bounds of the handler duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct HandlerMetrics {
    delivered: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl HandlerMetrics {
    pub fn delivered(&self) {
        self.delivered.fetch_add(1, Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
}

pub struct Metrics {
    enabled: bool,
    handlers: Mutex<BTreeMap<String, Arc<HandlerMetrics>>>,
    reconnects: AtomicU64,
    status: Mutex<Option<Status>>,
}

impl Metrics {
    pub fn new(enabled: bool) -> Arc<Metrics> {
        Arc::new(Metrics {
            enabled,
            handlers: Mutex::default(),
            reconnects: AtomicU64::new(0),
            status: Mutex::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn handler(&self, name: &str) -> Arc<HandlerMetrics> {
        let mut map = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(name.to_owned()).or_default())
    }

    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    pub fn set_status(&self, status: &Status) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let handlers = self
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let counter =
            |out: &mut String, name: &str, help: &str, get: &dyn Fn(&HandlerMetrics) -> u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (h, m) in &handlers {
                    let _ = writeln!(out, "{name}{{handler=\"{}\"}} {}", escape(h), get(m));
                }
            };
        counter(
            &mut out,
            "epidemic_changes_delivered_total",
            "Changes a handler handled successfully.",
            &|m| m.delivered.load(Relaxed),
        );
        counter(
            &mut out,
            "epidemic_handler_failures_total",
            "Failed handler calls (each failed attempt).",
            &|m| m.failed.load(Relaxed),
        );
        counter(
            &mut out,
            "epidemic_changes_dead_lettered_total",
            "Changes given up on and moved to the dead-letter table.",
            &|m| m.dead_lettered.load(Relaxed),
        );
        let name = "epidemic_handler_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time spent in handler calls.\n# TYPE {name} histogram"
        );
        for (h, m) in &handlers {
            let h = escape(h);
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += m.buckets[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{handler=\"{h}\",le=\"{b}\"}} {cumulative}"
                );
            }
            let count = m.count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{handler=\"{h}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "{name}_sum{{handler=\"{h}\"}} {}",
                m.sum_ns.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(out, "{name}_count{{handler=\"{h}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP epidemic_reconnects_total Reconnect attempts after a lost database connection.\n\
             # TYPE epidemic_reconnects_total counter\nepidemic_reconnects_total {}",
            self.reconnects.load(Relaxed)
        );
        if let Some(status) = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let gauge = |out: &mut String, name: &str, help: &str| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            };
            gauge(
                &mut out,
                "epidemic_consumer_backlog",
                "Changes in the log not yet handled by the consumer.",
            );
            for c in &status.consumers {
                let _ = writeln!(
                    out,
                    "epidemic_consumer_backlog{{daemon=\"{}\",handler=\"{}\"}} {}",
                    escape(&c.daemon),
                    escape(&c.handler),
                    c.backlog
                );
            }
            gauge(
                &mut out,
                "epidemic_consumer_oldest_change_age_seconds",
                "Age of the oldest change the consumer has not handled (0 when caught up).",
            );
            for c in &status.consumers {
                let _ = writeln!(
                    out,
                    "epidemic_consumer_oldest_change_age_seconds{{daemon=\"{}\",handler=\"{}\"}} {}",
                    escape(&c.daemon),
                    escape(&c.handler),
                    c.oldest_pending_age_s.unwrap_or(0.0)
                );
            }
            gauge(
                &mut out,
                "epidemic_dead_letters",
                "Dead letters waiting, per consumer.",
            );
            for c in &status.consumers {
                let _ = writeln!(
                    out,
                    "epidemic_dead_letters{{daemon=\"{}\",handler=\"{}\"}} {}",
                    escape(&c.daemon),
                    escape(&c.handler),
                    c.dead_letters
                );
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serve `GET /metrics` on `addr` until `stop` is set.
pub fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<JoinHandle<()>> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
    info!(listen = %addr, "serving Prometheus metrics on /metrics");
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
                let resp = if req.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4"[..],
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(metrics.render()).with_header(header)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .context("cannot start the metrics thread")
}
