//! `epidemic wait`: a delivery barrier for front ends. Returns once every chosen consumer
//! has handled every change committed before the call (the Cyrus Murder front end makes
//! sure "all updates have occurred" before it answers), or names the laggards when the
//! timeout passes.
//!
//! The backend gives a fence for "everything committed by now" in the watched tables and
//! says which consumers are still behind it (`epidemic_plugin_sdk::barrier`); this command
//! only chooses the consumers and polls.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use epidemic_plugin_sdk::backend::{BarrierRequest, Consumer, Laggard};

use crate::config::Config;
use crate::exit;
use crate::plugins;

#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Only the consumers of these handlers (by `[[handler]]` name; repeatable).
    #[arg(long = "handler")]
    pub handlers: Vec<String>,
    /// Only the consumers of these daemons (repeatable; default: every daemon's).
    #[arg(long = "daemon")]
    pub daemons: Vec<String>,
    /// Give up after this long and name the consumers still behind ("5s", "2m").
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Polling starts fast (a front end waits on it) and slows down.
const FIRST_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(250);

pub fn run(cfg: &Config, args: &WaitArgs) -> Result<u8> {
    let started = Instant::now();
    let lib = plugins::load_backend(cfg)?;
    let mut conn = plugins::open(cfg, &lib)?;
    let status = conn.status().context("status")?;
    // Every consumer that is not evicted is expected to catch up, running or not: a
    // stopped mail server has not created the Maildir either.
    let chosen: Vec<_> = status
        .consumers
        .iter()
        .filter(|c| !c.evicted)
        .filter(|c| args.handlers.is_empty() || args.handlers.contains(&c.handler))
        .filter(|c| args.daemons.is_empty() || args.daemons.contains(&c.daemon))
        .collect();
    for d in &args.daemons {
        if !status.consumers.iter().any(|c| &c.daemon == d) {
            return Err(exit::config(format!(
                "--daemon {d}: no consumer of that daemon is registered"
            )));
        }
    }
    for h in &args.handlers {
        if !status.consumers.iter().any(|c| &c.handler == h) {
            return Err(exit::config(format!(
                "--handler {h}: no consumer of that handler is registered"
            )));
        }
    }
    if chosen.is_empty() {
        println!("no consumers to wait for");
        return Ok(0);
    }
    let mut tables: Vec<String> = chosen.iter().flat_map(|c| c.tables.clone()).collect();
    tables.sort();
    tables.dedup();
    let consumers: Vec<Consumer> = chosen
        .iter()
        .map(|c| Consumer {
            daemon: c.daemon.clone(),
            handler: c.handler.clone(),
        })
        .collect();
    let fence = conn
        .barrier(&BarrierRequest::Fence { tables })
        .context("epidemic wait")?
        .fence;
    let mut poll = FIRST_POLL;
    loop {
        let laggards = conn
            .barrier(&BarrierRequest::Laggards {
                fence: fence.clone(),
                consumers: consumers.clone(),
            })
            .context("epidemic wait")?
            .laggards;
        if laggards.is_empty() {
            println!(
                "{} consumer(s) have handled every change committed before the call ({:.3}s)",
                consumers.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if started.elapsed() >= args.timeout {
            eprintln!(
                "epidemic: timed out after {}: not yet handled by {}",
                humantime::format_duration(args.timeout),
                describe(&laggards, &status.daemons)
            );
            return Ok(1);
        }
        std::thread::sleep(poll.min(args.timeout.saturating_sub(started.elapsed())));
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// `mx3/maildir (mail_users; daemon mx3 not running), …`
fn describe(laggards: &[Laggard], daemons: &[epidemic_plugin_sdk::backend::LeaseHolder]) -> String {
    laggards
        .iter()
        .map(|l| {
            let running = daemons
                .iter()
                .find(|d| d.daemon == l.consumer.daemon)
                .is_some_and(|d| d.expires_in_ms >= 0);
            format!(
                "{} ({}{})",
                l.consumer,
                l.tables.join(", "),
                if running {
                    String::new()
                } else {
                    format!("; daemon {} not running", l.consumer.daemon)
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
