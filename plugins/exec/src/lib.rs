//! `exec`: the general-purpose Epidemic handler plugin. It runs a configured command for
//! every change, with the change on its standard input and in its environment.
//!
//! # What the command gets
//!
//! - **stdin**: the change as one line of JSON (the SDK's `Change::to_json`):
//!   `{"id": 42, "stable_id": "9f2c…-42", "table": "users", "op": "UPDATE", "origin": "live", "key": {"id": 7}, "old": {"name": "ann"}, "new": {"name": "anna"}, "changed_at_us": 1700000000000000, "attempt": 1}`
//!   (`old` is `null` for an INSERT, `new` for a DELETE; binary values are lowercase hex;
//!   `old_key`, `schema`, `txid` and `commit_seq` appear where they apply).
//!   The command need not read it.
//! - **environment**: the daemon's environment, minus every variable starting with
//!   `EPIDEMIC_` (those can carry the database URL and its password), plus the `env`
//!   table from the config, plus
//!   - `EPIDEMIC_OP` (`INSERT`, `UPDATE` or `DELETE`), `EPIDEMIC_TABLE`,
//!     `EPIDEMIC_CHANGE_ID` (the position in the table's log), `EPIDEMIC_STABLE_ID` (never
//!     repeats in the database: an idempotency key for what the command does),
//!     `EPIDEMIC_ATTEMPT` (1 on the first try), `EPIDEMIC_DAEMON` and `EPIDEMIC_HANDLER`
//!     (which host and which `[[handler]]` entry runs it);
//!   - unless `column_env = false`: `EPIDEMIC_KEY_<COLUMN>` for each column of the row's
//!     key (after the change; before it for a DELETE);
//!   - unless `column_env = false`: `EPIDEMIC_OLD_<COLUMN>` and `EPIDEMIC_NEW_<COLUMN>` for
//!     each column, the name upper-cased with anything but ASCII letters and digits made
//!     `_`. A NULL leaves the variable unset; binary values are lowercase hex; a value
//!     holding a NUL byte or longer than 64 KiB is left out (it is still in the JSON).
//! - **stdout** is discarded; **stderr** is captured, and its last lines (at most 400
//!   characters) end up in the error message when the command fails.
//! - It runs in a process group of its own, so Ctrl-C on an interactive daemon does not
//!   reach it: the daemon finishes the change in hand.
//!
//! # Outcome
//!
//! | the command | the handler returns |
//! |---|---|
//! | exits 0 | success |
//! | exits with a status in `permanent_exit_codes` | a permanent error: dead-lettered at once |
//! | exits non-zero, no `retry_exit_codes` given | a retryable error: retried with backoff, then dead-lettered |
//! | exits non-zero, `retry_exit_codes` given | retryable if the status is listed, else permanent |
//! | is killed by a signal | a retryable error |
//! | runs past `timeout_secs` | its process group gets SIGTERM, SIGKILL 2 s later; a retryable error |
//! | cannot be started (not found, not executable) | a retryable error naming the command |
//!
//! Retrying by default is deliberate: most failures of a provisioning script (a service
//! down, a lock held, `EX_TEMPFAIL` = 75) clear up, and a change that keeps failing still
//! ends in the dead-letter table, from which `epidemic dead-letters retry` can send it
//! again once the cause is fixed. A script that can tell bad data from a bad moment should
//! say so with `permanent_exit_codes` (for example 65, `EX_DATAERR`), or list the
//! transient statuses in `retry_exit_codes = [75]` and let every other one be permanent.
//!
//! Delivery is at-least-once, so the command should be idempotent.
//!
//! # Config
//!
//! ```toml
//! [[handler]]
//! name = "provision"
//! plugin = "libepidemic_exec.so"
//! [handler.config]
//! table = "accounts"                         # required
//! columns = ["login", "plan"]                # required: what the command needs
//! ops = ["insert", "delete"]                 # default: all three
//! command = ["/usr/local/bin/provision", "--quiet"]  # required; argv form, no shell
//! # command = "provision \"$EPIDEMIC_NEW_LOGIN\" >> /var/log/provision.log"  # a string runs with /bin/sh -c
//! timeout_secs = 30                          # default 30
//! env = { PROVISION_REALM = "example.org" }  # optional; names may not start with EPIDEMIC_
//! column_env = true                          # default true: EPIDEMIC_OLD_*/EPIDEMIC_NEW_*
//! working_dir = "/srv/provision"             # default: the daemon's
//! permanent_exit_codes = [65]                # default none
//! # retry_exit_codes = [75]                  # default: every non-zero status is retryable
//! ```
//!
//! An UPDATE reaches the command only when one of `columns` changed. Unknown keys are
//! errors.
//!
//! # What it does not do
//!
//! It runs one command at a time, waiting for each (the host calls a handler from one
//! thread); it does not batch changes, keep the command's output, or run anything as
//! another user (run the daemon as the user the command needs, or use sudo in the
//! command). A child the command detaches into a new session escapes the timeout's kill.

mod config;
mod error;
mod run;

use std::ffi::OsString;
use std::process::Command;

use epidemic_plugin_sdk::{
    Change, Context, Handler, HandlerConfig, HandlerError, Subscription, Value,
};

pub use config::{CommandSpec, ExecConfig, ExitPolicy};
pub use error::{ExecError, StderrTail};

use config::ENV_PREFIX;
use run::{run, RunError};

/// The handler: one per `[[handler]]` entry.
pub struct ExecHandler {
    config: ExecConfig,
    daemon: String,
    handler: String,
}

impl ExecHandler {
    pub fn from_config(config: ExecConfig) -> ExecHandler {
        ExecHandler {
            config,
            daemon: String::new(),
            handler: String::new(),
        }
    }

    /// Which daemon and `[[handler]]` entry runs the commands (`EPIDEMIC_DAEMON`,
    /// `EPIDEMIC_HANDLER`).
    pub fn with_context(mut self, ctx: &Context) -> ExecHandler {
        self.daemon = ctx.daemon().to_owned();
        self.handler = ctx.handler().to_owned();
        self
    }

    fn command_for(&self, change: &Change) -> Command {
        let argv = self.config.command.argv();
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        if let Some(dir) = &self.config.working_dir {
            command.current_dir(dir);
        }
        for name in inherited_epidemic_vars(std::env::vars_os().map(|(name, _)| name)) {
            command.env_remove(name);
        }
        command.envs(&self.config.env);
        command
            .env("EPIDEMIC_OP", change.op.as_str())
            .env("EPIDEMIC_TABLE", &change.table)
            .env("EPIDEMIC_CHANGE_ID", change.id.to_string())
            .env("EPIDEMIC_STABLE_ID", &change.stable_id)
            .env("EPIDEMIC_ATTEMPT", change.attempt.to_string())
            .env("EPIDEMIC_DAEMON", &self.daemon)
            .env("EPIDEMIC_HANDLER", &self.handler);
        if self.config.column_env.is_some() {
            for (column, value) in change.key_columns.iter().zip(&change.key) {
                if let Some(text) = env_value(value) {
                    command.env(
                        format!("{ENV_PREFIX}KEY_{}", config::env_suffix(column)),
                        text,
                    );
                }
            }
        }
        if let Some(columns) = &self.config.column_env {
            for (column, suffix) in columns {
                for (prefix, value) in [
                    ("OLD", change.old_value(column)),
                    ("NEW", change.new_value(column)),
                ] {
                    if let Some(text) = value.and_then(env_value) {
                        command.env(format!("{ENV_PREFIX}{prefix}_{suffix}"), text);
                    }
                }
            }
        }
        command
    }

    fn run_for(&self, change: &Change) -> Result<(), ExecError> {
        let display = self.config.command.display();
        let mut input = serde_json::to_vec(&change.to_json()).map_err(|e| ExecError::Io {
            command: display.clone(),
            action: "encode the change for",
            source: e.into(),
        })?;
        input.push(b'\n');
        let mut command = self.command_for(change);
        let output = run(&mut command, input, self.config.timeout).map_err(|e| match e {
            RunError::Spawn(source) => ExecError::Spawn {
                command: display.clone(),
                working_dir: self.config.working_dir.clone(),
                source,
            },
            RunError::Other(action, source) => ExecError::Io {
                command: display.clone(),
                action,
                source,
            },
        })?;
        let stderr = StderrTail::from_bytes(&output.stderr_tail);
        if output.timed_out {
            return Err(ExecError::TimedOut {
                command: display,
                secs: self.config.timeout.as_secs(),
                escaped: !output.stderr_closed,
                stderr,
            });
        }
        if output.status.success() {
            return Ok(());
        }
        if let Some(code) = output.status.code() {
            return Err(ExecError::Exit {
                command: display,
                code,
                stderr,
                permanent: self.config.exit_policy.is_permanent(code),
            });
        }
        use std::os::unix::process::ExitStatusExt;
        Err(ExecError::Signal {
            command: display,
            signal: output.status.signal().unwrap_or(0),
            stderr,
        })
    }
}

/// The inherited variables to remove: every name starting with `EPIDEMIC_`.
fn inherited_epidemic_vars(names: impl Iterator<Item = OsString>) -> Vec<OsString> {
    names
        .filter(|name| name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes()))
        .collect()
}

/// The longest column value passed in the environment, in bytes. Linux refuses to start a
/// program with one environment string over 128 KiB (`MAX_ARG_STRLEN`), and a few large
/// values together can pass the total limit too; the JSON on stdin has no such limit.
const MAX_ENV_VALUE: usize = 64 * 1024;

/// A column value as an environment variable's value; `None` leaves the variable unset.
fn env_value(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::Text(s) if s.contains('\0') => return None,
        Value::Text(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Bytes(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    };
    (text.len() <= MAX_ENV_VALUE).then_some(text)
}

impl Handler for ExecHandler {
    const NAME: &'static str = "exec";

    fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
        Ok(ExecHandler::from_config(ExecConfig::from_handler_config(config)?).with_context(ctx))
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new(&self.config.table, &self.config.columns).ops(&self.config.ops)]
    }

    fn handle(&mut self, change: &Change) -> Result<(), HandlerError> {
        Ok(self.run_for(change)?)
    }
}

epidemic_plugin_sdk::export_handler!(ExecHandler);

#[cfg(test)]
mod tests;
