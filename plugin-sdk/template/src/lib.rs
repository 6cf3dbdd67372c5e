//! `hello`: a minimal Epidemic handler plugin to copy and adapt.
//!
//! It appends one line per change to a file:
//!
//! ```text
//! INSERT users #17 name=ann@example.org
//! UPDATE users #18 name: ann@example.org -> ann@example.com
//! DELETE users #19 name=ann@example.com
//! ```
//!
//! Config (`[handler.config]` in epidemic.toml):
//!
//! ```toml
//! [[handler]]
//! name = "hello"
//! plugin = "/usr/local/lib/epidemic/libepidemic_hello.so"
//! [handler.config]
//! table = "users"          # the table to watch
//! columns = ["name"]       # the columns this handler needs
//! file = "/var/log/hello.log"
//! ```
//!
//! What matters when you write your own:
//! - `subscriptions` says which table, columns and operations you want; an UPDATE that
//!   changes none of your columns (nor the row's key) never reaches you.
//! - Every change carries the row's primary key (`change.key`, `change.key_value("id")`)
//!   and a `stable_id` that never repeats: use it as an idempotency key downstream.
//! - Delivery is at-least-once: after a crash the changes in hand may come again, so make
//!   `handle` idempotent (creating something that exists is success).
//! - Implement `handle` (or `insert`/`update`/`delete`) for one change at a time; also
//!   implement `handle_batch` when a batch is cheaper as a whole, as this one does (one
//!   `open` per batch). On failure say which change failed: the host keeps the ones
//!   before it, retries that one alone and then goes on.
//! - `tracing::info!` (re-exported as `epidemic_plugin_sdk::tracing`) and
//!   `ctx.logger()` write into the daemon's own log.
//! - Return `HandlerError::Retryable` for what may work later (the host retries with
//!   backoff, then dead-letters), `HandlerError::Permanent` for what never will.
//! - A panic is caught by the SDK and counts as a failed delivery; it never takes the
//!   daemon down. Still, prefer returning errors.

use std::fs::{File, OpenOptions};
use std::io::Write;

use epidemic_plugin_sdk::{
    BatchError, Change, Context, Handler, HandlerConfig, HandlerError, Op, Subscription,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    table: String,
    columns: Vec<String>,
    file: String,
}

pub struct Hello {
    config: Config,
}

impl Hello {
    fn open(&self) -> Result<File, HandlerError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.config.file)
            .map_err(|e| HandlerError::retryable(format!("{}: {e}", self.config.file)))
    }

    fn describe(change: &Change) -> String {
        let cols = change.columns.iter();
        let fields: Vec<String> = match change.op {
            Op::Update => cols
                .filter(|c| change.changed(c))
                .map(|c| {
                    let old = change.old_value(c).map(|v| v.to_string()).unwrap_or_default();
                    let new = change.new_value(c).map(|v| v.to_string()).unwrap_or_default();
                    format!("{c}: {old} -> {new}")
                })
                .collect(),
            _ => cols
                .map(|c| format!("{c}={}", change.value(c).map(|v| v.to_string()).unwrap_or_default()))
                .collect(),
        };
        format!("{} {} #{} {}", change.op, change.table, change.id, fields.join(" "))
    }
}

impl Handler for Hello {
    const NAME: &'static str = "hello";

    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        let config: Config = config.parse()?;
        if config.columns.is_empty() {
            return Err(HandlerError::permanent("hello: `columns` must name at least one column"));
        }
        // This line appears in the daemon's log, in the daemon's format.
        ctx.logger().info(&format!(
            "hello ({} on {}): writing to {}",
            ctx.handler(),
            ctx.daemon(),
            config.file
        ));
        Ok(Hello { config })
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(&self.config.table, &self.config.columns)]
    }

    /// One `open` for the whole batch; a failed write names the change it was for.
    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        let mut f = self.open().map_err(|e| BatchError::new(0, e))?;
        for (i, change) in changes.iter().enumerate() {
            writeln!(f, "{}", Self::describe(change)).map_err(|e| BatchError::new(i, e.into()))?;
        }
        Ok(())
    }

    /// One change (the host's retries of a failed change come this way).
    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        writeln!(self.open()?, "{}", Self::describe(change))?;
        Ok(())
    }
}

epidemic_plugin_sdk::export_handler!(Hello);

#[cfg(test)]
mod tests {
    use super::*;
    use epidemic_plugin_sdk::testing::{self, Harness};

    #[test]
    fn writes_one_line_per_change_it_wants() {
        let dir = std::env::temp_dir().join(format!("hello-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("out.log");
        let mut h = Harness::<Hello>::new(serde_json::json!({
            "table": "users", "columns": ["name"], "file": file.to_str().unwrap(),
        }))
        .unwrap();
        h.send(testing::insert("users", &[("name", "ann".into())])).unwrap();
        // Another table: not delivered.
        assert!(!h.send(testing::insert("groups", &[("name", "x".into())])).unwrap());
        // A batch goes through `handle_batch`, routed as the daemon routes it.
        let n = h
            .send_batch(&[
                testing::update("users", &[("name", "ann".into())], &[("name", "bob".into())]),
                testing::insert("groups", &[("name", "y".into())]),
            ])
            .unwrap();
        assert_eq!(n, 1);
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("INSERT users #") && lines[0].ends_with("name=ann"));
        assert!(lines[1].ends_with("name: ann -> bob"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_an_unknown_config_key() {
        let err = Harness::<Hello>::new(serde_json::json!({
            "table": "users", "columns": ["name"], "file": "/dev/null", "colour": "blue",
        }))
        .err()
        .unwrap();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
