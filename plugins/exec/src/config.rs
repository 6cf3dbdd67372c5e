//! The `[handler.config]` table of an exec handler, and its checks at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use epidemic_plugin_sdk::{HandlerConfig, Op};
use serde::Deserialize;

use crate::error::ExecError;

/// The config table as written in the file. See the crate docs for each key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecConfigFile {
    table: String,
    columns: Vec<String>,
    ops: Option<Vec<OpName>>,
    command: CommandSpec,
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "default_column_env")]
    column_env: bool,
    working_dir: Option<PathBuf>,
    retry_exit_codes: Option<Vec<i32>>,
    #[serde(default)]
    permanent_exit_codes: Vec<i32>,
}

fn default_timeout_secs() -> u64 {
    30
}

fn default_column_env() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpName {
    #[serde(alias = "INSERT")]
    Insert,
    #[serde(alias = "UPDATE")]
    Update,
    #[serde(alias = "DELETE")]
    Delete,
}

impl From<OpName> for Op {
    fn from(op: OpName) -> Op {
        match op {
            OpName::Insert => Op::Insert,
            OpName::Update => Op::Update,
            OpName::Delete => Op::Delete,
        }
    }
}

/// What to run: a program and its arguments, or a script for `/bin/sh -c`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of strings (program and arguments) or a string (a script for /bin/sh -c)"
)]
pub enum CommandSpec {
    Argv(Vec<String>),
    Shell(String),
}

impl CommandSpec {
    /// The program and its arguments.
    pub fn argv(&self) -> Vec<&str> {
        match self {
            CommandSpec::Argv(argv) => argv.iter().map(String::as_str).collect(),
            CommandSpec::Shell(script) => vec!["/bin/sh", "-c", script],
        }
    }

    /// A short form for error messages.
    pub fn display(&self) -> String {
        const MAX_CHARS: usize = 120;
        let full = self.argv().join(" ");
        if full.chars().count() <= MAX_CHARS {
            full
        } else {
            let short: String = full.chars().take(MAX_CHARS).collect();
            format!("{short}…")
        }
    }
}

/// Which non-zero exit statuses are worth retrying.
///
/// A status in `permanent` is a permanent error. Otherwise, without a `retry` list every
/// non-zero status is retryable; with one, only the statuses in it are, and the rest are
/// permanent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitPolicy {
    pub retry: Option<BTreeSet<i32>>,
    pub permanent: BTreeSet<i32>,
}

impl ExitPolicy {
    pub fn is_permanent(&self, code: i32) -> bool {
        if self.permanent.contains(&code) {
            return true;
        }
        match &self.retry {
            None => false,
            Some(retry) => !retry.contains(&code),
        }
    }
}

/// The checked config.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub table: String,
    pub columns: Vec<String>,
    pub ops: Vec<Op>,
    pub command: CommandSpec,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    /// Each column's environment variable suffix, when `column_env` is on.
    pub column_env: Option<Vec<(String, String)>>,
    pub working_dir: Option<PathBuf>,
    pub exit_policy: ExitPolicy,
}

/// The prefix of the variables the handler sets itself; the daemon's own variables with
/// this prefix (which can hold the database URL and its password) are not passed on.
pub const ENV_PREFIX: &str = "EPIDEMIC_";

impl ExecConfig {
    pub fn from_handler_config(config: &HandlerConfig) -> Result<ExecConfig, ExecError> {
        let file: ExecConfigFile = config
            .parse()
            .map_err(|e| ExecError::Config(e.to_string()))?;
        let bad = |msg: String| Err(ExecError::Config(msg));

        if file.table.is_empty() {
            return bad("table is empty".to_owned());
        }
        if file.columns.is_empty() {
            return bad("columns is empty: list the columns the command needs".to_owned());
        }
        let mut seen = BTreeSet::new();
        for column in &file.columns {
            if column.is_empty() {
                return bad("columns holds an empty name".to_owned());
            }
            if !seen.insert(column) {
                return bad(format!("columns names {column} twice"));
            }
        }

        let ops: Vec<Op> = match file.ops {
            None => vec![Op::Insert, Op::Update, Op::Delete],
            Some(ops) if ops.is_empty() => return bad("ops is empty".to_owned()),
            Some(ops) => ops.into_iter().map(Op::from).collect(),
        };

        match &file.command {
            CommandSpec::Argv(argv) if argv.is_empty() || argv[0].is_empty() => {
                return bad("command must name a program first".to_owned())
            }
            CommandSpec::Shell(script) if script.trim().is_empty() => {
                return bad("command is empty".to_owned())
            }
            _ => {}
        }
        // Command would refuse these at every spawn; say so once, now.
        if file.command.argv().iter().any(|a| a.contains('\0')) {
            return bad("command contains a NUL byte".to_owned());
        }

        if file.timeout_secs == 0 {
            return bad("timeout_secs must be at least 1".to_owned());
        }

        for (name, value) in &file.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return bad(format!("env name {name:?} is not a valid variable name"));
            }
            if name.starts_with(ENV_PREFIX) {
                return bad(format!(
                    "env name {name} uses the {ENV_PREFIX} prefix, which the handler sets itself"
                ));
            }
            if value.contains('\0') {
                return bad(format!("env value of {name} contains a NUL byte"));
            }
        }

        let column_env = if file.column_env {
            let mut names: BTreeMap<String, &str> = BTreeMap::new();
            let mut pairs = Vec::new();
            for column in &file.columns {
                let var = env_suffix(column);
                if let Some(other) = names.insert(var.clone(), column) {
                    return bad(format!(
                        "columns {other} and {column} both map to the variable suffix {var}; set column_env = false"
                    ));
                }
                pairs.push((column.clone(), var));
            }
            Some(pairs)
        } else {
            None
        };

        for code in file
            .permanent_exit_codes
            .iter()
            .chain(file.retry_exit_codes.iter().flatten())
        {
            if !(1..=255).contains(code) {
                return bad(format!("exit code {code} is not between 1 and 255"));
            }
        }
        let permanent: BTreeSet<i32> = file.permanent_exit_codes.into_iter().collect();
        let retry: Option<BTreeSet<i32>> = file.retry_exit_codes.map(|c| c.into_iter().collect());
        if let Some(both) = retry.iter().flatten().find(|c| permanent.contains(c)) {
            return bad(format!(
                "exit code {both} is in both retry_exit_codes and permanent_exit_codes"
            ));
        }

        Ok(ExecConfig {
            table: file.table,
            columns: file.columns,
            ops,
            command: file.command,
            timeout: Duration::from_secs(file.timeout_secs),
            env: file.env,
            column_env,
            working_dir: file.working_dir,
            exit_policy: ExitPolicy { retry, permanent },
        })
    }
}

/// A column name as an environment variable suffix: ASCII letters upper-cased, digits
/// kept, anything else `_` (`quota-bytes` gives `QUOTA_BYTES`).
pub fn env_suffix(column: &str) -> String {
    column
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_policy_defaults_to_retrying() {
        let policy = ExitPolicy::default();
        assert!(!policy.is_permanent(1));
        assert!(!policy.is_permanent(75));
        let policy = ExitPolicy {
            retry: None,
            permanent: [65].into(),
        };
        assert!(policy.is_permanent(65));
        assert!(!policy.is_permanent(75));
        let policy = ExitPolicy {
            retry: Some([75].into()),
            permanent: [65].into(),
        };
        assert!(policy.is_permanent(65));
        assert!(policy.is_permanent(1));
        assert!(!policy.is_permanent(75));
    }

    #[test]
    fn column_names_become_variable_suffixes() {
        assert_eq!(env_suffix("quota_bytes"), "QUOTA_BYTES");
        assert_eq!(env_suffix("user-name"), "USER_NAME");
        assert_eq!(env_suffix("Größe"), "GR__E");
    }
}
