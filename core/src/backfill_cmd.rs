//! `epidemic backfill`: ask a consumer's daemon to bring its handler up to the tables'
//! state, then follow the progress until it is done.
//!
//! The command only stores the request in the database (so it needs no running daemon,
//! and a request made while the daemon is down waits for it); the consumer's own daemon
//! carries it out inside its delivery loop (see `backfill.rs`), where a snapshot row can be
//! ordered against the live changes. Progress lives in the database too: this command,
//! `epidemic status` and a restarted daemon all read it there.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use epidemic_plugin_host::HostBackend;
use epidemic_plugin_sdk::backend::{
    BackendError, BackfillProgress, BackfillRequest, BackfillState, Consumer,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::exit;
use crate::plugins;

#[derive(Debug, Clone, clap::Args)]
pub struct BackfillArgs {
    /// The `[[handler]]` whose consumer gets every existing row.
    #[arg(long)]
    pub handler: String,
    /// Only these tables (default: every table the handler watches).
    #[arg(long = "table")]
    pub tables: Vec<String>,
    /// The daemon whose consumer it is (default: this config's `daemon.name`).
    #[arg(long)]
    pub daemon: Option<String>,
    /// Store the request and return at once, without following the progress.
    #[arg(long)]
    pub detach: bool,
    /// Cancel the consumer's backfill that is requested or running, instead.
    #[arg(long, conflicts_with = "detach")]
    pub cancel: bool,
}

/// How often progress is read from the database.
const POLL: Duration = Duration::from_millis(500);
/// Without a terminal, a progress line at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub fn run(cfg: &Config, args: &BackfillArgs) -> Result<u8> {
    let file = cfg.path.display();
    let Some(handler) = cfg.handlers.iter().find(|h| h.name == args.handler) else {
        let names: Vec<&str> = cfg.handlers.iter().map(|h| h.name.as_str()).collect();
        return Err(exit::config(format!(
            "{file}: no handler {:?} (handlers: {})",
            args.handler,
            names.join(", ")
        )));
    };
    let daemon = match &args.daemon {
        Some(d) => d.clone(),
        None => cfg.daemon_name()?,
    };
    let consumer = Consumer {
        daemon: daemon.clone(),
        handler: handler.name.clone(),
    };
    let lib = plugins::load_backend(cfg)?;
    let mut conn = plugins::open(cfg, &lib)?;
    if args.cancel {
        let reply = conn
            .backfills(&BackfillRequest::Cancel {
                consumer: consumer.clone(),
            })
            .map_err(refusal)?;
        println!(
            "cancelled: {} table(s) of consumer {consumer}",
            reply.backfills.len()
        );
        return Ok(0);
    }
    // The handler's tables, in the catalog's spelling and with a usable key each: the
    // same resolution `run` does, so a table without a key is refused here, not later.
    let mut handlers = vec![plugins::load_handler(cfg, handler, &daemon)?];
    let watches =
        plugins::resolve_names(cfg, &mut conn, &mut handlers).context("watched tables")?;
    plugins::check_filters(cfg, &handlers, &watches)?;
    let watched = handlers[0].tables();
    let tables = if args.tables.is_empty() {
        watched.clone()
    } else {
        let mut tables = Vec::new();
        for t in &args.tables {
            let found = watched
                .iter()
                .find(|w| *w == t || w.eq_ignore_ascii_case(t))
                .ok_or_else(|| {
                    exit::config(format!(
                        "--table {t}: handler {:?} does not watch it (it watches {})",
                        handler.name,
                        watched.join(", ")
                    ))
                })?;
            tables.push(found.clone());
        }
        tables
    };
    conn.backfills(&BackfillRequest::Request {
        consumer: consumer.clone(),
        tables: tables.clone(),
        requested_by: "epidemic backfill".into(),
    })
    .map_err(refusal)?;
    println!(
        "backfill of {} requested for consumer {consumer}; its daemon carries it out while it runs",
        tables.join(", ")
    );
    if args.detach {
        println!("follow it with `epidemic status`");
        return Ok(0);
    }
    follow(&mut conn, &consumer, &tables)
}

/// A refusal of the backend (a backfill already running) is the user's input at fault.
fn refusal(e: BackendError) -> anyhow::Error {
    match e {
        BackendError::Invalid(m) => exit::config(m),
        other => anyhow::Error::new(other).context("backfill"),
    }
}

/// Show the progress of the consumer's tables until every one is done.
fn follow(conn: &mut HostBackend, consumer: &Consumer, tables: &[String]) -> Result<u8> {
    let tty = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>20} [{bar:30}] {pos}/{len} rows  {per_sec}  eta {eta}  {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut shown: Vec<(String, ProgressBar)> = Vec::new();
    let started = Instant::now();
    let mut last_plain = Instant::now() - PLAIN_EVERY;
    let mut waiting_said = false;
    loop {
        let all = conn
            .backfills(&BackfillRequest::List)
            .context("backfill progress")?
            .backfills;
        let mine: Vec<&BackfillProgress> = all
            .iter()
            .filter(|p| p.daemon == consumer.daemon && p.handler == consumer.handler)
            .filter(|p| tables.contains(&p.table))
            .collect();
        if mine.is_empty() {
            eprintln!("the backfill of consumer {consumer} is gone (cancelled?)");
            return Ok(1);
        }
        for p in &mine {
            if tty {
                let bar = match shown.iter().find(|(t, _)| *t == p.table) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = bars.add(ProgressBar::new(p.rows_estimate.unwrap_or(0)));
                        b.set_style(style.clone());
                        b.set_prefix(p.table.clone());
                        shown.push((p.table.clone(), b.clone()));
                        b
                    }
                };
                bar.set_length(p.rows_estimate.unwrap_or(0).max(p.rows_done));
                bar.set_position(p.rows_done);
                bar.set_message(state_word(p.state));
            }
        }
        if !tty && last_plain.elapsed() >= PLAIN_EVERY {
            last_plain = Instant::now();
            for p in &mine {
                eprintln!("{}", plain_line(p));
            }
        }
        if mine.iter().all(|p| p.state == BackfillState::Done) {
            for (_, b) in &shown {
                b.finish();
            }
            if !tty {
                for p in &mine {
                    eprintln!("{}", plain_line(p));
                }
            }
            println!("backfill of consumer {consumer} done");
            return Ok(0);
        }
        if !waiting_said
            && started.elapsed() > Duration::from_secs(5)
            && mine.iter().all(|p| p.state == BackfillState::Requested)
        {
            waiting_said = true;
            let _ = bars.println(format!(
                "waiting for daemon {} to start it (is `epidemic run` running for it?); \
                 Ctrl-C leaves the request in place",
                consumer.daemon
            ));
            if !tty {
                eprintln!(
                    "waiting for daemon {} to start it (is `epidemic run` running for it?)",
                    consumer.daemon
                );
            }
        }
        std::thread::sleep(POLL);
    }
}

fn state_word(s: BackfillState) -> String {
    match s {
        BackfillState::Requested => "waiting for the daemon".into(),
        BackfillState::Running => "running".into(),
        BackfillState::Done => "done".into(),
    }
}

/// One line of progress, for logs and pipes.
pub fn plain_line(p: &BackfillProgress) -> String {
    let total = p
        .rows_estimate
        .map_or("?".to_owned(), |t| format!("~{}", t.max(p.rows_done)));
    let mut line = format!(
        "{}/{} {}: {} of {total} rows, {}",
        p.daemon,
        p.handler,
        p.table,
        p.rows_done,
        state_word(p.state)
    );
    if let Some((rate, eta)) = rate_and_eta(p) {
        line.push_str(&format!(", {rate:.0} rows/s"));
        if let Some(eta) = eta {
            line.push_str(&format!(", eta {}", humantime::format_duration(eta)));
        }
    }
    line
}

/// Rows per second since the table's snapshot began, and the time left at that rate.
pub fn rate_and_eta(p: &BackfillProgress) -> Option<(f64, Option<Duration>)> {
    if p.state != BackfillState::Running || p.started_at_us <= 0 {
        return None;
    }
    let secs = (p.updated_at_us - p.started_at_us) as f64 / 1e6;
    if secs <= 0.0 || p.rows_done == 0 {
        return None;
    }
    let rate = p.rows_done as f64 / secs;
    let eta = p.rows_estimate.and_then(|t| {
        let left = t.saturating_sub(p.rows_done) as f64;
        (rate > 0.0).then(|| Duration::from_secs((left / rate).ceil() as u64))
    });
    Some((rate, eta))
}
