//! `epidemic bench`: how much the triggers slow writes, and how fast a change reaches a
//! handler, measured against the user's own database on a scratch table
//! ([`SCRATCH_TABLE`]) that the bench creates and removes. The user's tables are never
//! touched.
//!
//! Everything goes through the configured backend library, like the daemon: the core
//! still names no database. The consumer is the daemon's own [`Dispatcher`] (fetch,
//! route, hand over, ack, wait) with a built-in handler that only notes when each change
//! arrived, called through the same boundary adapter a plugin library has; so the
//! figures are the daemon's minus what a plugin's own work costs.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use epidemic_plugin_host::{HostBackend, HostHandler, Library};
use epidemic_plugin_sdk::backend::{
    BackendError, Consumer, Scratch, StartFrom, Watch, SCRATCH_TABLE,
};
use epidemic_plugin_sdk::{
    BatchError, Change, Context as HandlerContext, Handler, HandlerConfig, HandlerError,
    Subscription, Value,
};
use serde::Serialize;

use crate::config::{Config, OnFailure};
use crate::dispatch::{DispatchSettings, Dispatcher, RetryPolicy};
use crate::metrics::Metrics;
use crate::plugins;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Small sizes that finish in seconds (a smoke test of the command, not figures).
    #[arg(long)]
    pub quick: bool,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Changes per second offered during the latency measurement; a list (100,1000,5000)
    /// measures at each rate in turn [default: 1000; quick: 500]
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<u32>,
    /// Changes written at each rate during the latency measurement [default: five
    /// seconds' worth, 500 to 10000; quick: 250]
    #[arg(long)]
    pub latency_changes: Option<u64>,
    /// Backlog to drain; a list (10000,100000,1000000) drains each size in turn and
    /// compares their rates [default: 1000000; quick: 1000,5000]
    #[arg(long, value_delimiter = ',')]
    pub drain: Vec<u64>,
    /// Concurrent writers for the write-overhead measurement; a list (8,32) measures each
    /// [default: 8; quick: 2]
    #[arg(long, value_delimiter = ',')]
    pub writers: Vec<u32>,
    /// Rows each writer inserts, one per transaction [default: 1000; quick: 100]
    #[arg(long)]
    pub rows_per_writer: Option<u64>,
    /// Seconds of idle to measure the reader's CPU use over [default: 10; quick: 1]
    #[arg(long)]
    pub idle_secs: Option<u64>,
    /// Also drain the backlog handing the handler at most this many changes per call, to
    /// compare with whole batches (1: one boundary crossing per change, as SDK 0.1 did)
    #[arg(long)]
    pub compare_handler_batch: Option<u32>,
    /// Also drain a backlog through this row filter over the scratch table's `id` and
    /// `payload` columns, e.g. "id % 10 == 0" (passes 10 % of the changes)
    #[arg(long)]
    pub compare_filter: Option<String>,
}

struct Sizes {
    /// Offered rates of the latency runs, in the order given.
    rates: Vec<u32>,
    /// Changes per latency run, when given; otherwise five seconds' worth.
    latency_changes: Option<u64>,
    /// Backlogs to drain, in the order given.
    drains: Vec<u64>,
    /// Writer counts of the write measurements, in the order given.
    writers: Vec<u32>,
    rows_per_writer: u64,
    idle: Duration,
}

impl Sizes {
    /// Five seconds' worth at `rate`, within 500..=10,000 (a writer that cannot commit
    /// that fast takes longer), unless given.
    fn latency_changes(&self, rate: u32) -> u64 {
        self.latency_changes
            .unwrap_or_else(|| (u64::from(rate) * 5).clamp(500, 10_000))
            .max(1)
    }

    /// The largest backlog: the one the headline figures and the comparisons use.
    fn largest_drain(&self) -> u64 {
        self.drains.iter().copied().max().unwrap_or(1)
    }
}

/// A list option: what was given, or the default; never empty, never a zero.
fn list<T: Copy + PartialEq + From<u8>>(given: &[T], default: &[T]) -> Vec<T> {
    let one = T::from(1);
    let zero = T::from(0);
    let v: Vec<T> = if given.is_empty() { default } else { given }
        .iter()
        .map(|&x| if x == zero { one } else { x })
        .collect();
    v
}

impl BenchArgs {
    fn sizes(&self) -> Sizes {
        let q = self.quick;
        Sizes {
            rates: list(&self.rate, if q { &[500] } else { &[1000] }),
            latency_changes: self
                .latency_changes
                .or(if q { Some(250) } else { None })
                .map(|n| n.max(1)),
            drains: list(&self.drain, if q { &[1_000, 5_000] } else { &[1_000_000] }),
            writers: list(&self.writers, if q { &[2] } else { &[8] }),
            rows_per_writer: self
                .rows_per_writer
                .unwrap_or(if q { 100 } else { 1_000 })
                .max(1),
            idle: Duration::from_secs(self.idle_secs.unwrap_or(if q { 1 } else { 10 }).max(1)),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteThroughput {
    pub writers: u32,
    pub rows: u64,
    pub rows_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct DrainFiltered {
    pub filter: String,
    /// Changes that passed the filter and reached the handler.
    pub handed: u64,
    pub drain_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct DrainCapped {
    pub handler_batch: u32,
    pub drain_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteVariant {
    pub label: String,
    pub write: WriteThroughput,
    pub ratio: f64,
}

/// The write measurements for one number of writers.
#[derive(Debug, Serialize)]
pub struct WriteRun {
    pub writers: u32,
    pub unwatched: WriteThroughput,
    /// Watched, nobody reading.
    pub watched: WriteThroughput,
    pub ratio: f64,
    /// Watched, with the daemon's dispatcher reading the changes as they come.
    pub with_reader: WriteThroughput,
    pub ratio_with_reader: f64,
    /// How long after the last write the reader had every change.
    pub reader_behind_ms: f64,
    /// Watched, nobody reading, with each option set the backend declares worth comparing.
    pub variants: Vec<WriteVariant>,
}

/// Commit-to-handler latency at one offered rate.
#[derive(Debug, Serialize)]
pub struct LatencyRun {
    pub rate_per_s: u32,
    pub changes: u64,
    /// The rate the writer reached (below the offered one when one connection cannot
    /// commit that fast).
    pub achieved_per_s: f64,
    pub ms_p50: f64,
    pub ms_p95: f64,
    pub ms_p99: f64,
    pub ms_max: f64,
}

/// The drain of one backlog.
#[derive(Debug, Serialize)]
pub struct DrainRun {
    pub changes: u64,
    /// From the dispatcher's start (its connection open) to the handler's last return,
    /// pruning once a second meanwhile.
    pub drain_per_s: f64,
    /// The same, plus the prune that followed: until the log was pruned of them too.
    pub drain_pruned_per_s: f64,
    /// `drain_per_s` over that of the smallest backlog: below 1 where a cost grows
    /// faster than the backlog.
    pub ratio_to_smallest: f64,
    pub pruned_ratio_to_smallest: f64,
    /// Rows pruned while the drain ran, and the seconds the last prune took after it.
    pub pruned_while_draining: u64,
    pub final_prune_s: f64,
    pub peak_rss_mb: Option<f64>,
}

/// The results. The flat fields are the first latency run, the largest drain and the
/// first writer count, as before lists were accepted; the lists hold every run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub url: String,
    pub quick: bool,
    pub latency_changes: u64,
    pub latency_rate_per_s: u32,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub latency_runs: Vec<LatencyRun>,
    pub drain_changes: u64,
    pub drain_per_s: f64,
    pub drain_pruned_per_s: f64,
    pub drains: Vec<DrainRun>,
    /// The same drain with the handler given fewer changes per call, when asked.
    pub drain_capped: Option<DrainCapped>,
    /// The same drain through a row filter, when asked.
    pub drain_filtered: Option<DrainFiltered>,
    pub write_unwatched: WriteThroughput,
    pub write_watched: WriteThroughput,
    pub write_ratio: f64,
    pub write_ratio_with_reader: f64,
    /// Watched, with each option set the backend declares worth comparing (PostgreSQL:
    /// its wake-up notification off).
    pub write_variants: Vec<WriteVariant>,
    pub writes: Vec<WriteRun>,
    pub idle_cpu_percent: f64,
    pub peak_rss_mb_draining: Option<f64>,
}

/// A live progress line on a terminal, plain phase lines otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn phase(&self, what: &str) {
        if self.tty {
            eprint!("\r\x1b[K{what}");
        } else {
            eprintln!("bench: {what}");
        }
    }

    fn update(&self, what: &str, done: u64, total: u64) {
        if self.tty {
            eprint!(
                "\r\x1b[K{what}: {done}/{total} ({:.0}%)",
                done as f64 * 100.0 / total.max(1) as f64
            );
        }
    }

    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

fn be(e: BackendError) -> anyhow::Error {
    anyhow!("{e}")
}

pub fn run(cfg: &Config, args: &BenchArgs) -> Result<BenchReport> {
    let sizes = args.sizes();
    let lib = plugins::load_backend(cfg)?;
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
    };
    let mut admin = plugins::open(cfg, &lib)?;
    // Leave the database as it was: if Epidemic was not installed, remove what installing
    // the scratch table's capture created.
    let was_installed = {
        let s = admin.status().map_err(be)?;
        !s.tables.is_empty() || !s.consumers.is_empty()
    };
    progress.phase("creating the scratch table");
    admin
        .scratch(&Scratch::Create {
            table: SCRATCH_TABLE.into(),
        })
        .map_err(be)
        .context("bench needs the backend's scratch-table support")?;
    let filter = match &args.compare_filter {
        Some(expr) => {
            let f = crate::filter::CelFilter::compile(expr, &cfg.daemon_name()?)
                .map_err(|e| crate::exit::config(format!("--compare-filter {expr:?}: {e}")))?;
            let columns = ["id".to_owned(), "payload".to_owned()];
            f.check_types(SCRATCH_TABLE, &columns, &[])
                .map_err(|e| crate::exit::config(format!("--compare-filter {expr:?}: {e}")))?;
            Some(Arc::new(f))
        }
        None => None,
    };
    let result = measure(
        cfg,
        &lib,
        &mut admin,
        &sizes,
        args.quick,
        args.compare_handler_batch,
        filter,
        &progress,
    );
    progress.phase("dropping the scratch table");
    let dropped = admin.scratch(&Scratch::Drop {
        table: SCRATCH_TABLE.into(),
    });
    let dropped = dropped.and_then(|()| {
        if was_installed {
            Ok(())
        } else {
            admin.uninstall().map(drop)
        }
    });
    progress.finish();
    let report = result?;
    dropped.map_err(be).context("removing the scratch table")?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn measure(
    cfg: &Config,
    lib: &Library,
    admin: &mut HostBackend,
    sizes: &Sizes,
    quick: bool,
    compare_handler_batch: Option<u32>,
    filter: Option<Arc<crate::filter::CelFilter>>,
    progress: &Progress,
) -> Result<BenchReport> {
    let watch = Watch {
        table: SCRATCH_TABLE.into(),
        columns: vec!["id".into(), "payload".into()],
        key: vec!["id".into()],
        ..Watch::default()
    };
    let mut next_id = 1i64;

    // Writes: every writer count unwatched first (the table is watched from the install
    // on), then watched with nobody reading, watched with the dispatcher reading, and
    // watched with each option set the backend itself says is worth comparing
    // (PostgreSQL: NOTIFY off, since it takes a database-wide lock at commit). The core
    // names none of them.
    let mut unwatched = Vec::new();
    for &k in &sizes.writers {
        progress.phase(&format!("write throughput, {k} writers, table not watched"));
        unwatched.push(write_throughput(cfg, lib, None, k, sizes, &mut next_id)?);
    }
    admin.install(std::slice::from_ref(&watch)).map_err(be)?;
    let bench_variants = admin.capabilities().bench_variants;
    let mut writes = Vec::new();
    for (&k, unwatched) in sizes.writers.iter().zip(unwatched) {
        let ratio =
            |w: &WriteThroughput| w.rows_per_s / unwatched.rows_per_s.max(f64::MIN_POSITIVE);
        progress.phase(&format!("write throughput, {k} writers, table watched"));
        let watched = write_throughput(cfg, lib, None, k, sizes, &mut next_id)?;
        progress.phase(&format!(
            "write throughput, {k} writers, table watched, a reader keeping up"
        ));
        let (with_reader, behind) =
            write_with_reader(cfg, lib, None, admin, k, sizes, &mut next_id)?;
        let mut variants = Vec::new();
        for v in &bench_variants {
            let mut options = cfg.backend_options();
            if let (Some(o), Some(extra)) = (options.as_object_mut(), v.options.as_object()) {
                for (key, x) in extra {
                    o.insert(key.clone(), x.clone());
                }
            }
            let mut conn = lib.open_backend(&cfg.database.url, &options).map_err(be)?;
            conn.install(std::slice::from_ref(&watch)).map_err(be)?;
            progress.phase(&format!(
                "write throughput, {k} writers, table watched, a reader keeping up, {}",
                v.label
            ));
            let (write, _) =
                write_with_reader(cfg, lib, Some(&options), &mut conn, k, sizes, &mut next_id)?;
            drop(conn);
            admin.install(std::slice::from_ref(&watch)).map_err(be)?;
            variants.push(WriteVariant {
                label: v.label.clone(),
                ratio: ratio(&write),
                write,
            });
        }
        writes.push(WriteRun {
            writers: k,
            ratio: ratio(&watched),
            ratio_with_reader: ratio(&with_reader),
            reader_behind_ms: behind.as_secs_f64() * 1e3,
            unwatched,
            watched,
            with_reader,
            variants,
        });
    }

    // Latency: a consumer from now on, a writer at a steady rate on its own connection,
    // one run per offered rate.
    let consumer = Consumer {
        daemon: format!("epidemic-bench-{}", std::process::id()),
        handler: "noop".into(),
    };
    admin
        .register(&consumer, &[SCRATCH_TABLE.to_owned()], StartFrom::Now)
        .map_err(be)?;
    let reader = Reader::start(cfg, lib, None, &consumer, true, 0, None)?;
    let mut writer = plugins::open(cfg, lib)?;
    let mut latency_runs = Vec::new();
    for &rate in &sizes.rates {
        let what = format!("commit-to-handler latency at {rate}/s");
        progress.phase(&what);
        let n = sizes.latency_changes(rate);
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let mut sent: Vec<(i64, Instant)> = Vec::with_capacity(n as usize);
        let start = Instant::now();
        for i in 0..n {
            let due = start + interval.mul_f64(i as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let id = next_id;
            next_id += 1;
            writer
                .scratch(&Scratch::Insert {
                    table: SCRATCH_TABLE.into(),
                    first_id: id,
                    count: 1,
                    per_tx: 1,
                })
                .map_err(be)?;
            // Measured from the moment COMMIT returned to the writer: the change cannot
            // be read before it is committed, and the writer's own fsync is not the
            // reader's latency. (A reader that sees the row before the writer's call
            // returns counts 0.)
            sent.push((id, Instant::now()));
            if i % 100 == 0 {
                progress.update(&what, i, n);
            }
        }
        let achieved_per_s = n as f64 / start.elapsed().as_secs_f64();
        let last = sent.last().map(|(id, _)| *id).unwrap_or(0);
        reader.wait_for(last, Duration::from_secs(60))?;
        let mut latencies: Vec<f64> = {
            let seen = reader.probe.seen.lock().unwrap_or_else(|p| p.into_inner());
            sent.iter()
                .filter_map(|(id, t)| {
                    seen.get(id)
                        .map(|r| r.saturating_duration_since(*t).as_secs_f64() * 1e3)
                })
                .collect()
        };
        latencies.sort_by(|a, b| a.total_cmp(b));
        latency_runs.push(LatencyRun {
            rate_per_s: rate,
            changes: n,
            achieved_per_s,
            ms_p50: percentile(&latencies, 50.0),
            ms_p95: percentile(&latencies, 95.0),
            ms_p99: percentile(&latencies, 99.0),
            ms_max: latencies.last().copied().unwrap_or(0.0),
        });
    }

    // Idle CPU: the reader waits for changes that do not come.
    progress.phase(&format!("idle CPU over {} s", sizes.idle.as_secs()));
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    std::thread::sleep(sizes.idle);
    let idle_cpu_percent = (cpu_time() - cpu0).as_secs_f64() * 100.0 / t0.elapsed().as_secs_f64();
    reader.stop();

    // Drains: a backlog written while nobody reads, then read as fast as possible,
    // pruning as the daemon does; one per size, each compared with the smallest.
    let mut drains: Vec<DrainRun> = Vec::new();
    for &n in &sizes.drains {
        reset_peak_rss();
        let d = drain(
            cfg,
            lib,
            admin,
            &mut writer,
            &consumer,
            n,
            &mut next_id,
            0,
            None,
            progress,
        )?;
        drains.push(DrainRun {
            changes: n,
            drain_per_s: n as f64 / d.secs,
            drain_pruned_per_s: n as f64 / d.total_secs,
            ratio_to_smallest: 1.0,
            pruned_ratio_to_smallest: 1.0,
            pruned_while_draining: d.pruned_while_draining,
            final_prune_s: d.final_prune_s,
            peak_rss_mb: peak_rss_mb(),
        });
    }
    if let Some(smallest) = drains
        .iter()
        .min_by_key(|d| d.changes)
        .map(|d| (d.drain_per_s, d.drain_pruned_per_s))
    {
        for d in &mut drains {
            d.ratio_to_smallest = d.drain_per_s / smallest.0.max(f64::MIN_POSITIVE);
            d.pruned_ratio_to_smallest = d.drain_pruned_per_s / smallest.1.max(f64::MIN_POSITIVE);
        }
    }
    let largest = sizes.largest_drain();
    let drain_capped = match compare_handler_batch {
        Some(cap) => {
            let d = drain(
                cfg,
                lib,
                admin,
                &mut writer,
                &consumer,
                largest,
                &mut next_id,
                cap,
                None,
                progress,
            )?;
            Some(DrainCapped {
                handler_batch: cap,
                drain_per_s: largest as f64 / d.secs,
            })
        }
        None => None,
    };
    let drain_filtered = match filter {
        Some(f) => {
            let source = f.source().to_owned();
            let d = drain(
                cfg,
                lib,
                admin,
                &mut writer,
                &consumer,
                largest,
                &mut next_id,
                0,
                Some(f),
                progress,
            )?;
            Some(DrainFiltered {
                filter: source,
                handed: d.handed,
                drain_per_s: largest as f64 / d.secs,
            })
        }
        None => None,
    };

    let first_latency = latency_runs
        .first()
        .ok_or_else(|| anyhow!("no latency run"))?;
    let headline_drain = drains
        .iter()
        .rev()
        .find(|d| d.changes == largest)
        .ok_or_else(|| anyhow!("no drain"))?;
    let first_write = writes.first().ok_or_else(|| anyhow!("no write run"))?;
    Ok(BenchReport {
        backend: lib.name.clone(),
        url: epidemic_plugin_sdk::redact_url(&cfg.database.url),
        quick,
        latency_changes: first_latency.changes,
        latency_rate_per_s: first_latency.rate_per_s,
        latency_ms_p50: first_latency.ms_p50,
        latency_ms_p95: first_latency.ms_p95,
        latency_ms_p99: first_latency.ms_p99,
        latency_ms_max: first_latency.ms_max,
        drain_changes: headline_drain.changes,
        drain_per_s: headline_drain.drain_per_s,
        drain_pruned_per_s: headline_drain.drain_pruned_per_s,
        peak_rss_mb_draining: headline_drain.peak_rss_mb,
        drain_capped,
        drain_filtered,
        write_unwatched: first_write.unwatched.clone(),
        write_watched: first_write.watched.clone(),
        write_ratio: first_write.ratio,
        write_ratio_with_reader: first_write.ratio_with_reader,
        write_variants: first_write.variants.clone(),
        idle_cpu_percent,
        latency_runs,
        drains,
        writes,
    })
}

/// K writers, each on its own connection, one row per transaction.
fn write_throughput(
    cfg: &Config,
    lib: &Library,
    options: Option<&serde_json::Value>,
    writers: u32,
    sizes: &Sizes,
    next_id: &mut i64,
) -> Result<WriteThroughput> {
    let options = options.cloned().unwrap_or_else(|| cfg.backend_options());
    let mut conns = Vec::new();
    for _ in 0..writers {
        conns.push(lib.open_backend(&cfg.database.url, &options).map_err(be)?);
    }
    let base = *next_id;
    *next_id += writers as i64 * sizes.rows_per_writer as i64;
    let t0 = Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, mut conn)| {
            let rows = sizes.rows_per_writer;
            std::thread::spawn(move || {
                conn.scratch(&Scratch::Insert {
                    table: SCRATCH_TABLE.into(),
                    first_id: base + (k as u64 * rows) as i64,
                    count: rows,
                    per_tx: 1,
                })
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow!("writer thread panicked"))?
            .map_err(be)?;
    }
    let rows = writers as u64 * sizes.rows_per_writer;
    Ok(WriteThroughput {
        writers,
        rows,
        rows_per_s: rows as f64 / t0.elapsed().as_secs_f64(),
    })
}

/// [`write_throughput`] with the daemon's dispatcher reading the table meanwhile, as a
/// consumer of its own; also how long after the last write the reader had every change.
/// `options`: the backend options of writers and reader, instead of the configured ones.
fn write_with_reader(
    cfg: &Config,
    lib: &Library,
    options: Option<&serde_json::Value>,
    admin: &mut HostBackend,
    writers: u32,
    sizes: &Sizes,
    next_id: &mut i64,
) -> Result<(WriteThroughput, Duration)> {
    let consumer = Consumer {
        daemon: format!("epidemic-bench-{}-writes", std::process::id()),
        handler: "noop".into(),
    };
    admin
        .register(&consumer, &[SCRATCH_TABLE.to_owned()], StartFrom::Now)
        .map_err(be)?;
    let reader = Reader::start(cfg, lib, options, &consumer, false, 0, None)?;
    let measured = write_throughput(cfg, lib, options, writers, sizes, next_id).and_then(|write| {
        let t = Instant::now();
        reader.wait_count(write.rows, Duration::from_secs(120))?;
        Ok((write, t.elapsed()))
    });
    reader.stop();
    admin.unregister(&consumer).map_err(be)?;
    admin.prune().map_err(be)?;
    measured
}

/// How a drain went.
struct Drained {
    /// Until the handler had every change.
    secs: f64,
    /// Changes the handler was given.
    handed: u64,
    pruned_while_draining: u64,
    /// The prune after the reader stopped: what the last second's prunes left.
    final_prune_s: f64,
    /// `secs` and `final_prune_s`: until the log was pruned of the backlog too.
    total_secs: f64,
}

/// Write a backlog of `n` changes while nobody reads, then drain it through the
/// dispatcher (handing the handler at most `handler_batch` per call; 0: no limit),
/// pruning every second as the daemon does.
#[allow(clippy::too_many_arguments)]
fn drain(
    cfg: &Config,
    lib: &Library,
    admin: &mut HostBackend,
    writer: &mut HostBackend,
    consumer: &Consumer,
    n: u64,
    next_id: &mut i64,
    handler_batch: u32,
    filter: Option<Arc<crate::filter::CelFilter>>,
    progress: &Progress,
) -> Result<Drained> {
    progress.phase(&format!("writing a backlog of {n} changes"));
    let first = *next_id;
    *next_id += n as i64;
    let chunk = 10_000u64;
    let mut done = 0;
    while done < n {
        let k = chunk.min(n - done);
        writer
            .scratch(&Scratch::Insert {
                table: SCRATCH_TABLE.into(),
                first_id: first + done as i64,
                count: k,
                per_tx: 1_000,
            })
            .map_err(be)?;
        done += k;
        progress.update("writing the backlog", done, n);
    }
    let what = match handler_batch {
        0 => format!("draining a backlog of {n}"),
        k => format!("draining a backlog of {n}, at most {k} per handler call"),
    };
    progress.phase(&what);
    let filtered = filter.is_some();
    let drainer = Reader::start(cfg, lib, None, consumer, false, handler_batch, filter)?;
    let mut last_prune = Instant::now();
    let mut pruned_while_draining = 0;
    loop {
        // Through a filter most changes never reach the handler: the consumer's backlog
        // in the database says when it is through (read less often: it counts rows).
        let drained = if filtered {
            std::thread::sleep(Duration::from_millis(20));
            let status = admin.status().map_err(be)?;
            let backlog = status
                .consumers
                .iter()
                .find(|c| c.daemon == consumer.daemon && c.handler == consumer.handler)
                .map_or(n as i64, |c| c.backlog);
            n.saturating_sub(backlog.max(0) as u64)
        } else {
            drainer.probe.count.load(Ordering::Relaxed)
        };
        if drained >= n {
            break;
        }
        drainer.check()?;
        if last_prune.elapsed() >= Duration::from_secs(1) {
            pruned_while_draining += admin.prune().map_err(be)?;
            last_prune = Instant::now();
            progress.update(&what, drained, n);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // From the dispatcher's start (its connection open) to the handler's last return;
    // through a filter, to when the backlog was seen gone.
    let now = Instant::now();
    let started = drainer.probe.started.get().copied().unwrap_or(now);
    let last = if filtered {
        now
    } else {
        drainer
            .probe
            .last_handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(now)
    };
    let secs = last
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-6);
    let handed = drainer.probe.count.load(Ordering::Relaxed);
    // Stopping lets the dispatcher finish its step: the last batch is acknowledged.
    drainer.stop();
    let t1 = Instant::now();
    admin.prune().map_err(be)?;
    let final_prune_s = t1.elapsed().as_secs_f64();
    Ok(Drained {
        secs,
        handed,
        pruned_while_draining,
        final_prune_s,
        total_secs: secs + final_prune_s,
    })
}

/// What the bench's handler saw: when each scratch row's change arrived (when asked to
/// note it), the highest row id, and how many changes.
#[derive(Default)]
struct ProbeState {
    note_times: bool,
    seen: Mutex<HashMap<i64, Instant>>,
    max_seen: AtomicU64,
    count: AtomicU64,
    /// When the reader's thread started the dispatcher (its connection already open).
    started: OnceLock<Instant>,
    /// When the handler last returned.
    last_handled: Mutex<Option<Instant>>,
}

/// Probes by number: the handler is built from its config like any handler (through the
/// SDK's adapter), and finds its state here.
fn probes() -> &'static Mutex<HashMap<u64, Arc<ProbeState>>> {
    static PROBES: OnceLock<Mutex<HashMap<u64, Arc<ProbeState>>>> = OnceLock::new();
    PROBES.get_or_init(Mutex::default)
}

/// The bench's handler: notes arrivals, does nothing else.
struct Probe(Arc<ProbeState>);

impl Handler for Probe {
    const NAME: &'static str = "bench-probe";

    fn new(config: &HandlerConfig, _: &HandlerContext) -> Result<Self, HandlerError> {
        let n = config.json()["probe"].as_u64().unwrap_or_default();
        let map = probes().lock().unwrap_or_else(|p| p.into_inner());
        map.get(&n)
            .cloned()
            .map(Probe)
            .ok_or_else(|| HandlerError::permanent(format!("no bench probe {n}")))
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(SCRATCH_TABLE, ["id", "payload"])]
    }

    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        let now = Instant::now();
        let mut seen = self
            .0
            .note_times
            .then(|| self.0.seen.lock().unwrap_or_else(|p| p.into_inner()));
        for c in changes {
            if let Some(Value::Int(id)) = c.value("id") {
                if let Some(seen) = seen.as_mut() {
                    seen.entry(*id).or_insert(now);
                }
                self.0.max_seen.fetch_max(*id as u64, Ordering::Relaxed);
            }
        }
        self.0
            .count
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        *self
            .0
            .last_handled
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Ok(())
    }
}

/// The daemon's dispatcher on its own thread and connection, with the probe handler.
struct Reader {
    probe: Arc<ProbeState>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    /// `options`: the backend options to read with, instead of the configured ones.
    fn start(
        cfg: &Config,
        lib: &Library,
        options: Option<&serde_json::Value>,
        consumer: &Consumer,
        note_times: bool,
        handler_batch: u32,
        filter: Option<Arc<crate::filter::CelFilter>>,
    ) -> Result<Reader> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let probe = Arc::new(ProbeState {
            note_times,
            ..ProbeState::default()
        });
        probes()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, Arc::clone(&probe));
        let handler = HostHandler::in_process::<Probe>(
            &serde_json::json!({ "probe": n }),
            &consumer.daemon,
            &consumer.handler,
        )
        .map_err(|e| anyhow!("bench handler: {e}"))?;
        let settings = DispatchSettings {
            consumer: consumer.clone(),
            subscriptions: handler
                .subscriptions()
                .map_err(|e| anyhow!("bench handler: {e}"))?,
            retry: RetryPolicy {
                max_attempts: 1,
                retry_initial_ms: 1,
                retry_max_ms: 1,
                on_failure: OnFailure::DeadLetter,
            },
            batch_size: cfg.daemon.batch_size,
            handler_batch,
            backfill_chunk: 1,
            resync_on_evicted: false,
            filter: filter.map(|f| f as Arc<dyn epidemic_plugin_sdk::routing::RowFilter>),
            // The bench drains a log; it reads no snapshot.
            snapshot_only: Default::default(),
            idle_check: Duration::from_millis(cfg.daemon.idle_check_ms),
        };
        let conn = match options {
            None => plugins::open(cfg, lib)?,
            Some(o) => lib.open_backend(&cfg.database.url, o).map_err(be)?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let dispatcher = Dispatcher::new(
            settings,
            conn,
            handler,
            Metrics::new(false, "bench", Duration::from_secs(300)),
            Arc::clone(&stop),
        );
        let thread = std::thread::Builder::new()
            .name("bench-reader".into())
            .spawn({
                let probe = Arc::clone(&probe);
                move || {
                    let _ = probe.started.set(Instant::now());
                    dispatcher.run();
                }
            })
            .context("cannot start the bench's reader thread")?;
        Ok(Reader {
            probe,
            stop,
            thread: Some(thread),
        })
    }

    /// An error when the reader's thread ended early.
    fn check(&self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return Err(anyhow!("the reader stopped early"));
        }
        Ok(())
    }

    fn wait_count(&self, n: u64, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        while self.probe.count.load(Ordering::Relaxed) < n {
            if Instant::now() > end {
                return Err(anyhow!(
                    "the reader did not get {n} changes within {timeout:?}"
                ));
            }
            self.check()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn wait_for(&self, id: i64, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        while (self.probe.max_seen.load(Ordering::Relaxed) as i64) < id {
            if Instant::now() > end {
                return Err(anyhow!(
                    "the reader did not see change {id} within {timeout:?}"
                ));
            }
            self.check()?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Reset the kernel's peak-RSS mark (Linux `clear_refs` 5) so it covers only what follows.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn render(r: &BenchReport) -> String {
    let w = |t: &WriteThroughput| {
        format!(
            "{:.0} rows/s ({} writers x {} rows)",
            t.rows_per_s,
            t.writers,
            t.rows / t.writers.max(1) as u64
        )
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for l in &r.latency_runs {
        rows.push((
            format!(
                "commit->handler latency p50 / p95 / p99 / max ({} at {}/s, reached {:.0}/s)",
                l.changes, l.rate_per_s, l.achieved_per_s
            ),
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} ms",
                l.ms_p50, l.ms_p95, l.ms_p99, l.ms_max
            ),
        ));
    }
    let several = r.drains.len() > 1;
    for d in &r.drains {
        let mut v = format!(
            "{:.0} changes/s; {:.0}/s with the last prune ({} pruned while draining, last prune {:.2} s)",
            d.drain_per_s, d.drain_pruned_per_s, d.pruned_while_draining, d.final_prune_s
        );
        if several {
            v.push_str(&format!(
                "; x{:.2} / x{:.2} of the smallest",
                d.ratio_to_smallest, d.pruned_ratio_to_smallest
            ));
        }
        rows.push((
            format!("drain rate ({} changes, pruning once a second)", d.changes),
            v,
        ));
    }
    if let Some(f) = &r.drain_filtered {
        rows.push((
            format!("drain rate through filter {:?}", f.filter),
            format!(
                "{:.0} changes/s, {} handed over (whole stream: {:.2}x that)",
                f.drain_per_s,
                f.handed,
                r.drain_per_s / f.drain_per_s.max(f64::MIN_POSITIVE)
            ),
        ));
    }
    if let Some(c) = &r.drain_capped {
        rows.push((
            format!(
                "drain rate, at most {} change(s) per handler call",
                c.handler_batch
            ),
            format!(
                "{:.0} changes/s (whole batches: {:.2}x that)",
                c.drain_per_s,
                r.drain_per_s / c.drain_per_s.max(f64::MIN_POSITIVE)
            ),
        ));
    }
    for run in &r.writes {
        let k = run.writers;
        rows.extend([
            (
                format!("write throughput, {k} writers, unwatched"),
                w(&run.unwatched),
            ),
            (
                format!("write throughput, {k} writers, watched"),
                format!("{}  ratio {:.2}", w(&run.watched), run.ratio),
            ),
            (
                format!("write throughput, {k} writers, watched, a reader keeping up"),
                format!(
                    "{}  ratio {:.2} (reader {:.0} ms behind at the end)",
                    w(&run.with_reader),
                    run.ratio_with_reader,
                    run.reader_behind_ms
                ),
            ),
        ]);
        for v in &run.variants {
            rows.push((
                format!(
                    "write throughput, {k} writers, watched, a reader keeping up, {}",
                    v.label
                ),
                format!("{}  ratio {:.2}", w(&v.write), v.ratio),
            ));
        }
    }
    rows.push((
        "idle CPU of the reader".into(),
        format!("{:.2} %", r.idle_cpu_percent),
    ));
    rows.push((
        format!("peak RSS while draining {}", r.drain_changes),
        r.peak_rss_mb_draining
            .map_or("n/a".into(), |m| format!("{m:.1} MB")),
    ));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!(
        "epidemic bench: {} ({}){}\n",
        r.backend,
        r.url,
        if r.quick {
            ", quick mode: sizes too small for real figures"
        } else {
            ""
        }
    );
    for (k, v) in rows {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out
}
