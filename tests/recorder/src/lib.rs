//! `recorder`: a handler plugin for Epidemic's own tests. It appends every change it
//! handles to a JSON-lines file, one `write` per line (atomic with `O_APPEND`, so a
//! SIGKILL never leaves half a line), and can be told to fail or panic so delivery
//! guarantees can be tested through the real plugin boundary.
//!
//! It is not shipped as a product plugin; the shipped ones live under `plugins/`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;

use epidemic_plugin_sdk::{
    BatchError, Change, Context, Handler, HandlerConfig, HandlerError, Op, Subscription,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecorderConfig {
    /// JSON-lines output file.
    file: String,
    table: String,
    columns: Vec<String>,
    /// Subset of "insert", "update", "delete"; default all.
    #[serde(default)]
    ops: Option<Vec<String>>,
    /// Fail the first N attempts of every change, then succeed.
    #[serde(default)]
    fail_first: u32,
    /// Fail every attempt while this file exists (delete it to "fix" the handler).
    #[serde(default)]
    fail_while_exists: Option<String>,
    /// Failures are permanent instead of retryable.
    #[serde(default)]
    permanent: bool,
    /// Panic when any new or old value, as text, equals this.
    #[serde(default)]
    panic_on: Option<String>,
}

pub struct Recorder {
    cfg: RecorderConfig,
    /// Which daemon and `[[handler]]` entry this is, from the host's context.
    daemon: String,
    handler: String,
    out: File,
    attempts: HashMap<(String, i64), u32>,
    /// Handler calls so far, and the size of the one in hand: each line says which call
    /// delivered it, so tests can see batches.
    calls: u64,
    call_size: usize,
}

impl Recorder {
    fn fail(&self, msg: String) -> HandlerError {
        if self.cfg.permanent {
            HandlerError::Permanent(msg)
        } else {
            HandlerError::Retryable(msg)
        }
    }
}

impl Handler for Recorder {
    const NAME: &'static str = "recorder";

    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        let cfg: RecorderConfig = config.parse()?;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.file)
            .map_err(|e| HandlerError::Permanent(format!("cannot open {}: {e}", cfg.file)))?;
        // Through the SDK's bridge, this reaches the daemon's log in the daemon's format.
        epidemic_plugin_sdk::tracing::debug!(file = %cfg.file, daemon = ctx.daemon(), "recorder ready");
        Ok(Recorder {
            daemon: ctx.daemon().to_owned(),
            handler: ctx.handler().to_owned(),
            cfg,
            out,
            attempts: HashMap::new(),
            calls: 0,
            call_size: 0,
        })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        let sub = Subscription::new(&self.cfg.table, &self.cfg.columns);
        match &self.cfg.ops {
            None => vec![sub],
            Some(ops) => {
                let ops: Vec<Op> = ops
                    .iter()
                    .filter_map(|o| match o.to_ascii_lowercase().as_str() {
                        "insert" => Some(Op::Insert),
                        "update" => Some(Op::Update),
                        "delete" => Some(Op::Delete),
                        _ => None,
                    })
                    .collect();
                vec![sub.ops(&ops)]
            }
        }
    }

    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        self.calls += 1;
        self.call_size = changes.len();
        for (i, change) in changes.iter().enumerate() {
            self.handle(change).map_err(|e| BatchError::new(i, e))?;
        }
        Ok(())
    }

    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        if let Some(p) = &self.cfg.panic_on {
            let hit = change
                .old
                .iter()
                .chain(change.new.iter())
                .flatten()
                .any(|v| v.to_string() == *p);
            if hit {
                panic!("recorder told to panic on {p}");
            }
        }
        let n = self
            .attempts
            .entry((change.table.clone(), change.id))
            .or_insert(0);
        *n += 1;
        let attempt = *n;
        if attempt <= self.cfg.fail_first {
            epidemic_plugin_sdk::tracing::warn!(id = change.id, attempt, "recorder told to fail");
            return Err(self.fail(format!("failing attempt {attempt} of change {}", change.id)));
        }
        if let Some(f) = &self.cfg.fail_while_exists {
            if std::path::Path::new(f).exists() {
                return Err(self.fail(format!("{f} exists")));
            }
        }
        let mut line = change.to_json();
        // The recorder's own count of calls for this change (it survives no restart),
        // and the host's attempt number (which does not survive one either).
        line["attempt"] = attempt.into();
        line["host_attempt"] = change.attempt.into();
        line["daemon"] = self.daemon.as_str().into();
        line["handler"] = self.handler.as_str().into();
        line["call"] = self.calls.into();
        line["call_size"] = self.call_size.into();
        let mut bytes =
            serde_json::to_vec(&line).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        bytes.push(b'\n');
        self.out.write_all(&bytes)?;
        self.attempts.remove(&(change.table.clone(), change.id));
        Ok(())
    }
}

epidemic_plugin_sdk::export_handler!(Recorder);
